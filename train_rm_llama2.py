"""Reward-model training with FSDP2 and sample packing.

    torchrun --nproc_per_node 8 train_rm_llama2.py --pretrain PATH --dataset D1,D2 --dataset_probs 0.7,0.3 \
        --train_batch_size 256 --micro_train_batch_size 4 --loss logexpwithlm --packing_samples ...
    python train_rm_llama2.py --config configs/rm_tiny.yaml          # one process works too

Each step: the global batch of ``train_batch_size`` pairs is split over ranks into micro-batches
(by count, or by token budget with ``--packing_samples``); every micro-batch scores its chosen and
rejected responses in one forward, and its loss is scaled by its share of the global batch, so the
accumulated gradient is that of the global mean whatever the split. Saves a plain HF
``AutoModelForSequenceClassification`` folder to ``--save_path``; ``--ckpt_path`` makes a killed
run resume where it stopped with the same command.

Every response is scored at its end-of-turn token: ``rlhf_data.tokenize.end_response`` ends it with
exactly one EOS and nothing after (ChatML's trailing ``"\\n"`` dropped, EOS appended to a cut
response), the same function RL scoring uses (``rl.trainer.reward_inputs``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoTokenizer

from models.distributed import init_distributed, is_rank0
from models.lora import lora_spec
from models.value_model import RewardModel
from rlhf_data import PreferenceKeys, validate_preference
from rlhf_data.collate import collate_pairs
from training.batches import split_global_batch
from training.cli import run_cli
from training.config import (
    CheckpointArgs, DistributedArgs, LoggingArgs, LoraArgs, TrainDataArgs, TrainLoopArgs, check_trainer_config,
    parse_config,
)
from training.reward_losses import LOSS_NAMES, pairwise_logistic_loss
from training.preference_pairs import load_preference_pairs
from training.run import TrainingRun, optim_spec, training_steps
from training.sharded_model import ShardedModel


@dataclass
class RMConfig(DistributedArgs, LoggingArgs, TrainDataArgs, TrainLoopArgs, CheckpointArgs, LoraArgs):
    """Train a reward model on preference pairs."""

    pretrain: str = field(default="", metadata={"help": "HF folder: a causal LM (new score head) or a reward model", "path": "model"})
    prompt_key: str = "message"
    chosen_key: str = "chose"
    rejected_key: str = "reject"
    margin_key: str = "margin"
    loss: str = field(default="sigmoid", metadata={"help": "sigmoid | logexp | logexpwithlm", "check": LOSS_NAMES})
    lm_loss_coef: float = field(default=1.0, metadata={"help": "weight of the LM term of logexpwithlm", "check": ">= 0"})
    use_margin: bool = field(default=False, metadata={"help": "require r_chosen - r_rejected >= margin (from --margin_key)"})

    def __post_init__(self):
        check_trainer_config(self)


def pair_loss(model, pb, cfg: RMConfig, n_pairs: int, n_lm_tokens: int, world: int):
    """This micro-batch's share of the global-batch loss, and its statistics (sums over pairs)."""
    with_lm = cfg.loss == "logexpwithlm"
    out = model(pb.batch, pb.chosen_response_mask if with_lm else None)
    rewards, token_log_probs = out if with_lm else (out, None)
    chosen, rejected = rewards[: pb.num_pairs], rewards[pb.num_pairs:]
    margin = pb.margins if cfg.use_margin else None
    rm_loss = pairwise_logistic_loss(chosen, rejected, margin)
    loss = rm_loss * (pb.num_pairs * world / n_pairs)
    stats = {
        "rm_loss": rm_loss.detach() * pb.num_pairs,
        "acc": (chosen > rejected).float().sum(),
        "reward_chosen": chosen.detach().sum(),
        "reward_rejected": rejected.detach().sum(),
    }
    if with_lm:
        nll = -(token_log_probs * pb.chosen_response_mask).sum()
        loss = loss + cfg.lm_loss_coef * nll * (world / n_lm_tokens)
        stats["lm_loss"] = nll.detach() * (n_pairs / max(n_lm_tokens, 1))  # sums to the token mean
    return loss, stats


def scored_response_tokens(pair) -> int:
    return len(pair.chosen) - max(pair.chosen_prompt_len, 1)


@torch.no_grad()
def evaluate(model, pairs, cfg: RMConfig, env, pad_id: int, token_budget: int) -> tuple[dict, list]:
    """Accuracy, loss and mean rewards over all eval pairs (every rank takes its share of balanced
    micro-batches: the same count on each rank, as FSDP needs); also every pair's rewards."""
    model.eval()
    plan = split_global_batch(list(range(len(pairs))), [p.num_tokens for p in pairs], env.world_size,
                              token_budget=token_budget)[env.rank]
    mine = []
    for micro in plan:
        pb = collate_pairs([pairs[i] for i in micro], cfg.packing_samples, pad_id).to(env.device)
        rewards = model(pb.batch)
        for i, c, r in zip(micro, rewards[: pb.num_pairs].tolist(), rewards[pb.num_pairs:].tolist()):
            mine.append((i, c, r))
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, mine)
    scores = sorted(x for part in gathered for x in part)
    chosen = torch.tensor([c for _, c, _ in scores])
    rejected = torch.tensor([r for _, _, r in scores])
    model.train()
    metrics = {
        "eval_acc": (chosen > rejected).float().mean().item(),
        "eval_loss": F.softplus(rejected - chosen).mean().item(),
        "eval_reward_chosen": chosen.mean().item(),
        "eval_reward_rejected": rejected.mean().item(),
    }
    return metrics, [[c, r] for _, c, r in scores]


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(RMConfig, argv)
    log = print if is_rank0() else (lambda *a, **k: None)

    # ---- data: files -> validated rows -> token ids (every error stops here, before training)
    tokenizer = AutoTokenizer.from_pretrained(cfg.pretrain)
    keys = PreferenceKeys(cfg.prompt_key, cfg.chosen_key, cfg.rejected_key, cfg.margin_key)
    train_pairs, eval_pairs = load_preference_pairs(cfg, tokenizer, partial(validate_preference, keys=keys), log)

    # ---- processes join only now: every mistake above stopped the run before a process group
    env = init_distributed()

    # ---- model: sharded, with optimizer and schedule (the seed gives every rank the same fresh score head)
    def build():
        rm = RewardModel.from_pretrained(cfg.pretrain, with_lm_head=cfg.loss == "logexpwithlm", flash_attn=cfg.flash_attn or None)
        return rm, rm.model

    token_budget = cfg.packing_max_tokens or 2 * cfg.micro_train_batch_size * cfg.max_len
    model = ShardedModel(build, env, zero_stage=cfg.zero_stage, bf16=cfg.bf16, seed=cfg.seed,
                         gradient_checkpointing=cfg.gradient_checkpointing, lora=lora_spec(cfg),
                         optim=optim_spec(cfg, training_steps(cfg, len(train_pairs)), token_budget))
    run = TrainingRun(cfg, env, model, tokenizer, num_samples=len(train_pairs), name="rm", log=log)
    pad_id = tokenizer.pad_token_id
    lengths = [p.num_tokens for p in train_pairs]

    # ---- train
    for epoch, indices in run.global_batches():
        n_lm = sum(scored_response_tokens(train_pairs[i]) for i in indices)

        def micro_loss(micro):
            pb = collate_pairs([train_pairs[i] for i in micro], cfg.packing_samples, pad_id).to(env.device)
            loss, stats = pair_loss(model, pb, cfg, len(indices), n_lm, env.world_size)
            return loss, stats, pb.batch.num_tokens

        totals, grad_norm, processed = model.step(model.plan(indices, lengths), micro_loss)
        run.step_done(totals, len(indices), grad_norm, epoch, sum(lengths[i] for i in indices), processed,
                      derive=lambda m: {"loss": m["rm_loss"] + cfg.lm_loss_coef * m.get("lm_loss", 0.0)})
        if eval_pairs and run.every(cfg.eval_steps):
            run.logger.log(run.step, evaluate(model, eval_pairs, cfg, env, pad_id, token_budget)[0])
        if run.every(cfg.save_steps):
            run.save()

    # ---- final evaluation and save
    result = {"steps": run.step}
    if eval_pairs:
        eval_metrics, rewards = evaluate(model, eval_pairs, cfg, env, pad_id, token_budget)
        run.logger.log(run.step, eval_metrics)
        result |= eval_metrics
        if env.is_main and cfg.logging_path:
            Path(cfg.logging_path, "eval_rewards.json").write_text(json.dumps(rewards))
        log("[eval] " + "  ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    run.finish()
    if cfg.save_path:
        log(f"[save] reward model -> {cfg.save_path}")
    return result


if __name__ == "__main__":
    run_cli(main)
