"""The scaffolding every trainer puts around its model: the step count, optimizer and schedule,
resuming, metrics, the progress bar and saving. The recipes keep what differs (data, loss,
evaluation) and their loop in plain sight:

    run = TrainingRun(cfg, env, model, model.model, tokenizer, num_samples=len(data), name="rm")
    for epoch, indices in run.global_batches():
        plan = run.plan(indices, lengths, token_budget)
        totals, grad_norm, processed = train_step(model, plan, micro_loss, run.optimizer, run.scheduler, cfg.max_norm)
        run.step_done(totals, len(indices), grad_norm, epoch, real_tokens, processed)
        ...
    run.finish()
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from models.distributed import all_reduce_mean
from models.fsdp import save_hf_pretrained
from training.batches import EpochSampler, split_global_batch
from training.checkpoint import resume_position, save_checkpoint
from training.metrics_logger import MetricsLogger
from training.optim import build_optimizer, build_scheduler
from training.progress import progress_bar
from training.step import global_means


class TrainingRun:
    def __init__(self, cfg, env, model, hf_model, tokenizer, *, num_samples: int, name: str, log=print):
        self.cfg, self.env, self.model, self.hf_model, self.tokenizer = cfg, env, model, hf_model, tokenizer
        self.sampler = EpochSampler(num_samples, cfg.train_batch_size, cfg.seed)
        self.total_steps = self.sampler.steps_per_epoch * cfg.max_epochs
        if cfg.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.optimizer = build_optimizer(model, cfg.learning_rate, cfg.l2)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.lr_warmup_ratio)

        resumed = resume_position(cfg.ckpt_path, model, self.optimizer, self.scheduler, log)
        self.step, epoch, in_epoch = resumed or (0, 0, 0)
        self.position = (epoch, in_epoch)  # of the next global batch
        self.logger = MetricsLogger(
            cfg.logging_path, enabled=env.is_main, use_wandb=cfg.use_wandb, use_tensorboard=cfg.use_tensorboard,
            wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name, config=asdict(cfg),
            resume_step=self.step if resumed else None,
        )
        self.bar = progress_bar(self.total_steps, name, env.is_main, initial=self.step, unit="step")
        self._t_last, self._real_tokens, self._processed_tokens = time.perf_counter(), 0, 0

    def global_batches(self) -> Iterator[tuple[int, list[int]]]:
        """``(epoch, sample indices)`` of the global batches still to train, from the resume point."""
        todo = self.total_steps - self.step
        for epoch, indices, after in self.sampler.batches_from(self.position, self.cfg.max_epochs, todo):
            self.position = after  # what a checkpoint taken after this step resumes from
            yield epoch, indices

    def plan(self, indices: Sequence[int], lengths: Sequence[int], token_budget: int) -> list[list[int]]:
        """This rank's micro-batches: by count, or by token budget with ``--packing_samples``."""
        cfg = self.cfg
        return split_global_batch(
            indices, lengths, self.env.world_size,
            micro_batch_size=None if cfg.packing_samples else cfg.micro_train_batch_size,
            token_budget=token_budget if cfg.packing_samples else None,
        )[self.env.rank]

    def step_done(self, totals: dict, n_samples: int, grad_norm: float, epoch: int, real_tokens: int,
                  processed_tokens: int, derive=None) -> dict | None:
        """Count the step; every ``--logging_steps`` log global-batch means of ``totals`` (plus
        ``derive(means)``, grad norm, lr, tokens/s) and return them. ``real_tokens``: the global
        batch's tokens; ``processed_tokens``: what this rank's forward passes took in (+ padding)."""
        self.step += 1
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
        metrics |= {"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "epoch": epoch,
                    "tokens_per_s": self._real_tokens / seconds, "processed_tokens_per_s": processed / seconds}
        self._t_last, self._real_tokens, self._processed_tokens = now, 0, 0
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
            save_hf_pretrained(self.hf_model, cfg.save_path, self.tokenizer)
        if cfg.ckpt_path:
            save_checkpoint(cfg.ckpt_path, self.step, self.model, self.optimizer, self.scheduler,
                            {"epoch": self.position[0], "step_in_epoch": self.position[1]}, keep=cfg.max_ckpt_num)

    def finish(self) -> None:
        """Final save, then close the logger and the process group."""
        self.bar.close()
        self.save()
        self.logger.close()
        dist.destroy_process_group()
