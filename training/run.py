"""The scaffolding every trainer puts around its model: the step count, resuming, metrics, the
progress bar and saving (the model itself, with its optimizer and schedule, is a
``training.sharded_model.ShardedModel``, as in the RL workers). The recipes keep what differs
(data, loss, evaluation) and their loop in plain sight:

    total = training_steps(cfg, len(data))
    model = ShardedModel(build, env, ..., optim=optim_spec(cfg, total, token_budget))
    run = TrainingRun(cfg, env, model, tokenizer, num_samples=len(data), name="rm")
    for epoch, indices in run.global_batches():
        totals, grad_norm, processed = model.step(model.plan(indices, lengths), micro_loss)
        run.step_done(totals, len(indices), grad_norm, epoch, real_tokens, processed)
        ...
    run.finish()
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Iterator

import torch
import torch.distributed as dist

from models.distributed import all_reduce_mean
from training.batches import EpochSampler
from training.checkpoint import resume_position, save_checkpoint
from training.metrics_logger import MetricsLogger
from training.progress import progress_bar
from training.sharded_model import OptimSpec, ShardedModel
from training.step import global_means


def training_steps(cfg, num_samples: int) -> int:
    """Optimizer steps of the whole run: ``--max_epochs`` over the data, capped by ``--max_steps``."""
    total = EpochSampler(num_samples, cfg.train_batch_size, cfg.seed).steps_per_epoch * cfg.max_epochs
    return min(total, cfg.max_steps) if cfg.max_steps > 0 else total


def optim_spec(cfg, total_steps: int, token_budget: int) -> OptimSpec:
    """The trainer flags' ``OptimSpec``: micro-batches by ``--micro_train_batch_size``, or by
    ``token_budget`` tokens with ``--packing_samples``."""
    return OptimSpec(learning_rate=cfg.learning_rate, total_steps=total_steps, l2=cfg.l2,
                     lr_warmup_ratio=cfg.lr_warmup_ratio, max_norm=cfg.max_norm,
                     micro_batch_size=cfg.micro_train_batch_size, packing_samples=cfg.packing_samples,
                     token_budget=token_budget)


class TrainingRun:
    def __init__(self, cfg, env, model: ShardedModel, tokenizer, *, num_samples: int, name: str, log=print):
        self.cfg, self.env, self.model, self.tokenizer = cfg, env, model, tokenizer
        self.sampler = EpochSampler(num_samples, cfg.train_batch_size, cfg.seed)
        self.total_steps = training_steps(cfg, num_samples)
        if model.optim_spec.total_steps != self.total_steps:
            raise ValueError(f"the model's schedule has {model.optim_spec.total_steps} steps, the run {self.total_steps}")

        resumed = resume_position(cfg.ckpt_path, model.module, model.optimizer, model.scheduler, log)
        self.step, epoch, in_epoch = resumed or (0, 0, 0)
        self.position = (epoch, in_epoch)  # of the next global batch
        self.logger = MetricsLogger(
            cfg.logging_path, enabled=env.is_main, use_wandb=cfg.use_wandb, use_tensorboard=cfg.use_tensorboard,
            wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name, config=asdict(cfg),
            resume_step=self.step if resumed else None,
        )
        lora = f"LoRA r={model.lora_config.r}: " if model.lora_config is not None else ""
        log(f"[model] {lora}{model.num_trainable_parameters:,} trainable parameters of {model.num_parameters:,} "
            f"({100 * model.num_trainable_parameters / model.num_parameters:.2f}%)")
        self.bar = progress_bar(self.total_steps, name, env.is_main, initial=self.step, unit="step")
        self._t_last, self._real_tokens, self._processed_tokens, self._steps = time.perf_counter(), 0, 0, 0

    def global_batches(self) -> Iterator[tuple[int, list[int]]]:
        """``(epoch, sample indices)`` of the global batches still to train, from the resume point."""
        todo = self.total_steps - self.step
        for epoch, indices, after in self.sampler.batches_from(self.position, self.cfg.max_epochs, todo):
            self.position = after  # what a checkpoint taken after this step resumes from
            yield epoch, indices

    def step_done(self, totals: dict, n_samples: int, grad_norm: float, epoch: int, real_tokens: int,
                  processed_tokens: int, derive=None) -> dict | None:
        """Count the step; every ``--logging_steps`` log global-batch means of ``totals`` (plus
        ``derive(means)``, grad norm, lr, tokens/s) and return them. ``real_tokens``: the global
        batch's tokens; ``processed_tokens``: what this rank's forward passes took in (+ padding)."""
        self.step += 1
        self._steps += 1
        self.bar.update(1)
        self._real_tokens += real_tokens
        self._processed_tokens += processed_tokens
        if self.step % self.cfg.logging_steps and self.step != self.total_steps:
            return None
        now = time.perf_counter()
        metrics = global_means(totals, n_samples, self.env.world_size)
        if derive is not None:
            metrics |= derive(metrics)
        processed = all_reduce_mean(torch.tensor(float(self._processed_tokens))).item() * self.env.world_size
        seconds = now - self._t_last
        metrics |= {"grad_norm": grad_norm, "lr": self.model.lr, "epoch": epoch,
                    "tokens_per_s": self._real_tokens / seconds, "processed_tokens_per_s": processed / seconds,
                    "step_seconds": seconds / self._steps}
        self._t_last, self._real_tokens, self._processed_tokens, self._steps = now, 0, 0, 0
        self.logger.log(self.step, metrics)
        self.bar.set_postfix({k: f"{metrics[k]:.4f}" for k in ("loss", "acc") if k in metrics})
        return metrics

    def every(self, n: int) -> bool:
        """True every ``n`` steps (n > 0), except at the last step (the recipe's finale covers it)."""
        return n > 0 and self.step % n == 0 and self.step < self.total_steps

    def save(self) -> None:
        """HF folder to ``--save_path`` and resumable state to ``--ckpt_path``. Collective."""
        cfg = self.cfg
        if cfg.save_path:
            self.model.save_pretrained(cfg.save_path, self.tokenizer, adapter=getattr(cfg, "save_adapter", False))
        if cfg.ckpt_path:
            m = self.model
            save_checkpoint(cfg.ckpt_path, self.step, m.module, m.optimizer, m.scheduler,
                            {"epoch": self.position[0], "step_in_epoch": self.position[1]}, keep=cfg.max_ckpt_num)

    def finish(self) -> None:
        """Final save, then close the logger and the process group."""
        self.bar.close()
        self.save()
        self.logger.close()
        dist.destroy_process_group()
