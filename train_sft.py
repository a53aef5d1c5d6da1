"""Supervised fine-tuning on chat conversations with FSDP2 and sample packing.

    torchrun --nproc_per_node 8 train_sft.py --pretrain PATH --dataset chats.jsonl --input_key messages \
        --train_batch_size 128 --micro_train_batch_size 4 --packing_samples --save_path OUT ...
    python train_sft.py --config configs/sft_tiny.yaml --pretrain DIR --dataset models/assets/tiny_chat_corpus.jsonl

The loss is the token-level mean negative log-likelihood of what the assistant says (its turns
and their EOS), over the global batch, whatever the split into micro-batches and ranks. Saves a
plain ``AutoModelForCausalLM`` folder: the policy that reward modelling and RL start from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import AutoTokenizer

from models.actor import Actor
from models.distributed import all_reduce_mean, init_distributed, is_rank0
from models.lora import lora_spec
from rlhf_data import validate_conversation
from rlhf_data.collate import layout_mask, make_batch
from rlhf_data.mixing import train_eval_rows
from rlhf_data.tokenize import tokenize_conversation, tokenize_train_eval
from training.batches import check_fills_a_batch, split_global_batch
from training.cli import run_cli
from training.config import (
    CheckpointArgs, ConfigError, DistributedArgs, LoggingArgs, LoraArgs, TrainDataArgs, TrainLoopArgs,
    check_trainer_config, parse_config,
)
from training.run import TrainingRun, optim_spec, training_steps
from training.sharded_model import ShardedModel


@dataclass
class SFTConfig(DistributedArgs, LoggingArgs, TrainDataArgs, TrainLoopArgs, CheckpointArgs, LoraArgs):
    """Supervised fine-tuning on chat conversations (loss on assistant tokens only)."""

    pretrain: str = field(default="", metadata={"help": "HF causal LM folder", "path": "model"})
    input_key: str = field(default="messages", metadata={"help": "column holding the list of chat turns"})

    def __post_init__(self):
        check_trainer_config(self)


def trained_tokens(mask: list[bool]) -> int:
    return sum(mask[1:])  # the first token is never predicted


def micro_batch(convs, indices, packing: bool, pad_id: int, device):
    batch = make_batch([convs[i].input_ids for i in indices], packing, pad_id)
    mask = layout_mask(batch, [torch.tensor(convs[i].loss_mask) for i in indices])
    return batch.to(device), mask.to(device)


@torch.no_grad()
def evaluate(model, convs, cfg: SFTConfig, env, pad_id: int, token_budget: int) -> dict:
    """Token-mean NLL of the assistant tokens of the eval set (and its perplexity)."""
    model.eval()
    plan = split_global_batch(list(range(len(convs))), [len(c.input_ids) for c in convs], env.world_size,
                              token_budget=token_budget)[env.rank]
    nll, tokens = torch.zeros(()), torch.zeros(())
    for micro in plan:
        batch, mask = micro_batch(convs, micro, cfg.packing_samples, pad_id, env.device)
        nll += -(model(batch, token_mask=mask).log_probs * mask).sum().cpu()
        tokens += sum(trained_tokens(convs[i].loss_mask) for i in micro)
    model.train()
    loss = (all_reduce_mean(nll) / all_reduce_mean(tokens).clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(SFTConfig, argv)
    log = print if is_rank0() else (lambda *a, **k: None)

    # ---- data: files -> validated conversations -> ids + assistant masks
    tokenizer = AutoTokenizer.from_pretrained(cfg.pretrain)
    train_rows, eval_rows, skipped = train_eval_rows(
        cfg.dataset, cfg.dataset_probs, partial(validate_conversation, key=cfg.input_key),
        eval_dataset=cfg.eval_dataset, eval_split=cfg.eval_split, skip_bad_rows=cfg.skip_bad_rows, seed=cfg.seed,
    )
    for line in skipped:
        log(f"[data] {line}")

    def tokenize(row):
        return tokenize_conversation(tokenizer, row["messages"], cfg.max_len, row.get("_source", ""), row.get("_row", 0))

    def unusable(conv):
        if trained_tokens(conv.loss_mask):
            return None
        return (f"no assistant token within --max_len {cfg.max_len} (the conversation before the first "
                "reply fills it): nothing to train on")

    train_convs, eval_convs = tokenize_train_eval(train_rows, eval_rows, tokenize, unusable, cfg.input_key,
                                                  cfg.skip_bad_rows, log)
    check_fills_a_batch(len(train_convs), cfg.train_batch_size, "training conversations")
    log(f"[data] {len(train_convs)} training conversations, {len(eval_convs)} eval, "
        f"{sum(c.truncated for c in train_convs)} truncated to {cfg.max_len} tokens")

    # ---- processes join only now: every mistake above stopped the run before a process group
    env = init_distributed()

    # ---- model: sharded, with optimizer and schedule
    def build():
        actor = Actor.from_pretrained(cfg.pretrain, flash_attn=cfg.flash_attn or None)
        return actor, actor.model

    token_budget = cfg.packing_max_tokens or cfg.micro_train_batch_size * cfg.max_len
    model = ShardedModel(build, env, zero_stage=cfg.zero_stage, bf16=cfg.bf16, seed=cfg.seed,
                         gradient_checkpointing=cfg.gradient_checkpointing, lora=lora_spec(cfg),
                         optim=optim_spec(cfg, training_steps(cfg, len(train_convs)), token_budget))
    run = TrainingRun(cfg, env, model, tokenizer, num_samples=len(train_convs), name="sft", log=log)
    pad_id = tokenizer.pad_token_id
    lengths = [len(c.input_ids) for c in train_convs]

    # ---- train
    for epoch, indices in run.global_batches():
        n_tokens = sum(trained_tokens(train_convs[i].loss_mask) for i in indices)
        if n_tokens == 0:  # unreachable after tokenize_rows; a zero-loss step must never pass silently
            raise ConfigError(f"step {run.step + 1}: no assistant token in the global batch")

        def micro_loss(micro):
            batch, mask = micro_batch(train_convs, micro, cfg.packing_samples, pad_id, env.device)
            nll = -(model(batch, token_mask=mask).log_probs * mask).sum()
            # this micro-batch's share of the global token mean; the stat sums to it over the batch
            return nll * (env.world_size / n_tokens), {"loss": nll.detach() * (len(indices) / n_tokens)}, batch.num_tokens

        totals, grad_norm, processed = model.step(model.plan(indices, lengths), micro_loss)
        run.step_done(totals, len(indices), grad_norm, epoch, sum(lengths[i] for i in indices), processed)
        if eval_convs and run.every(cfg.eval_steps):
            run.logger.log(run.step, evaluate(model, eval_convs, cfg, env, pad_id, token_budget))
        if run.every(cfg.save_steps):
            run.save()

    result = {"steps": run.step}
    if eval_convs:
        eval_metrics = evaluate(model, eval_convs, cfg, env, pad_id, token_budget)
        run.logger.log(run.step, eval_metrics)
        result |= eval_metrics
        log(f"[eval] eval_loss={result['eval_loss']:.4f} eval_ppl={result['eval_ppl']:.2f}")
    run.finish()
    if cfg.save_path:
        log(f"[save] policy -> {cfg.save_path}")
    return result


if __name__ == "__main__":
    run_cli(main)
