"""Direct preference optimisation with FSDP2 and sample packing, on self-reference preferences.

    torchrun --nproc_per_node 8 train_dpo.py --pretrain SFT_DIR --dataset prefs.jsonl --loss strength \
        --beta 0.1 --train_batch_size 64 --micro_train_batch_size 4 --packing_samples --save_path out/dpo
    python train_dpo.py --config configs/dpo_tiny.yaml          # one process works too

Losses (``training.dpo_losses``): ``sigmoid`` (DPO, with ``--label_smoothing``: conservative DPO),
``ipo``, and ``strength``: the sigmoid loss with each pair's label smoothing 1 - strength, where
strength is the self-reference judge's own preference strength (``self_ref.label``'s
``strength`` field, ``--strength_key``), so that uncertain judgements pull less.

The reference policy is the initial one (``--pretrain``). By default its log-probs of every pair are
computed once, by the freshly loaded model before any update (no second model in memory; a resumed
run recomputes them the same way before loading its checkpoint); ``--ref_on_the_fly`` keeps a frozen
copy and scores each micro-batch with it instead. A pair's chosen and rejected responses travel in
the same micro-batch (one packed row with ``--packing_samples``), as for the reward model. Eval:
preference accuracy (the implicit reward of the chosen response above the rejected one's) and the
mean reward margin on held-out pairs. Saves a plain HF causal-LM folder to ``--save_path``;
``--ckpt_path`` makes a killed run resume where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from models.actor import Actor
from models.distributed import all_reduce_sum, init_distributed, is_rank0
from models.lora import lora_spec
from models.packing import PackedBatch
from rlhf_data import PreferenceKeys, validate_preference
from rlhf_data.collate import layout_mask, make_batch, response_mask
from rlhf_data.errors import DataError
from training.batches import split_global_batch
from training.cli import run_cli
from training.config import (
    CheckpointArgs, ConfigError, DistributedArgs, LoggingArgs, LoraArgs, TrainDataArgs, TrainLoopArgs,
    check_trainer_config, parse_config,
)
from training.dpo_losses import DPO_LOSSES, dpo_loss, needs_mean_logprobs
from training.preference_pairs import load_preference_pairs
from training.run import TrainingRun, optim_spec, training_steps
from training.sharded_model import ShardedModel


@dataclass
class DPOConfig(DistributedArgs, LoggingArgs, TrainDataArgs, TrainLoopArgs, CheckpointArgs, LoraArgs):
    """Train a policy directly on preference pairs (DPO, IPO, strength-aware DPO)."""

    pretrain: str = field(default="", metadata={"help": "HF causal LM folder: the initial policy and the reference", "path": "model"})
    prompt_key: str = "message"
    chosen_key: str = "chose"
    rejected_key: str = "reject"
    strength_key: str = field(default="strength", metadata={"help": "the judge's preference strength in [0.5, 1] (--loss strength)"})
    loss: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) | ipo | strength (DPO with label smoothing 1 - strength)", "check": DPO_LOSSES})
    beta: float = field(default=0.1, metadata={"help": "strength of the tie to the reference policy", "check": "> 0"})
    label_smoothing: float = field(default=0.0, metadata={"help": "--loss sigmoid: the probability that a label is wrong (conservative DPO)", "check": "[0, 0.5)"})
    ref_on_the_fly: bool = field(default=False, metadata={"help": "score each micro-batch with a frozen reference copy instead of once before training"})

    def __post_init__(self):
        check_trainer_config(self)
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"--label_smoothing is for --loss sigmoid (--loss {self.loss} "
                              + ("takes each pair's from --strength_key)" if self.loss == "strength" else "has none)"))


def validate_dpo_pair(record: dict, keys: PreferenceKeys, strength_needed: bool) -> dict:
    """A preference row whose ``margin`` field carries the judge's strength (``keys.margin_key`` is
    ``--strength_key``), required in [0.5, 1] for the strength loss."""
    row = validate_preference(record, keys)
    if strength_needed:
        if record.get(keys.margin_key) is None:
            raise DataError(None, None, keys.margin_key, "missing: --loss strength needs each pair's strength")
        if not 0.5 <= row["margin"] <= 1.0:
            raise DataError(None, None, keys.margin_key, f"a strength must lie in [0.5, 1], got {row['margin']}")
    return row


class DPOBatch:
    """A micro-batch of pairs: the chosen responses, then the rejected ones, in one batch (one
    packed row with packing), with the mask of every response token and each pair's strength."""

    def __init__(self, pairs, indices, packing: bool, pad_id: int, device):
        self.indices = list(indices)
        mine = [pairs[i] for i in self.indices]
        self.num_pairs = len(mine)
        samples = [(p.chosen, p.chosen_prompt_len) for p in mine] + [(p.rejected, p.rejected_prompt_len) for p in mine]
        batch = make_batch([ids for ids, _ in samples], packing, pad_id)
        masks = [response_mask(len(ids), plen) for ids, plen in samples]
        self.batch = batch.to(device)
        self.token_mask = layout_mask(batch, masks).to(device)
        self.response_tokens = torch.tensor([float(m.sum()) for m in masks], device=device).clamp(min=1.0)
        self.strength = torch.tensor([p.margin for p in mine], dtype=torch.float32, device=device)


def response_logps(model, db: DPOBatch, mean: bool) -> torch.Tensor:
    """``(2n,)`` log-probabilities of each sample's response tokens (chosen samples first): their
    sum, or their per-token mean with ``mean``."""
    lp = model(db.batch, token_mask=db.token_mask).log_probs * db.token_mask
    if isinstance(db.batch, PackedBatch):
        sums = torch.stack([piece.sum() for piece in db.batch.split(lp)])
    else:
        sums = lp.sum(-1)
    return sums / db.response_tokens if mean else sums


@torch.no_grad()
def reference_logps(model, pairs, cfg: DPOConfig, env, pad_id: int, token_budget: int) -> torch.Tensor:
    """``(n, 2)`` reference log-probs (chosen, rejected) of every pair, each rank scoring its share
    of balanced micro-batches (the same count on every rank, as FSDP needs), then gathered."""
    was_training = model.module.training  # the frozen --ref_on_the_fly copy stays in eval mode
    model.eval()
    plan = split_global_batch(list(range(len(pairs))), [p.num_tokens for p in pairs], env.world_size,
                              token_budget=token_budget)[env.rank]
    mine = []
    for micro in plan:
        db = DPOBatch(pairs, micro, cfg.packing_samples, pad_id, env.device)
        lp = response_logps(model, db, needs_mean_logprobs(cfg.loss)).float().cpu()
        mine += [(i, float(c), float(r)) for i, c, r in zip(micro, lp[: db.num_pairs], lp[db.num_pairs:])]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, mine)
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for i, c, r in (x for part in gathered for x in part):
        out[i, 0], out[i, 1] = c, r
    model.train(was_training)
    return out


def pair_losses(model, db: DPOBatch, ref: torch.Tensor, cfg: DPOConfig):
    """Per-pair losses and implicit rewards of one micro-batch; ``ref`` is ``(n, 2)``."""
    policy = response_logps(model, db, needs_mean_logprobs(cfg.loss))
    ref = ref.to(policy)
    return dpo_loss(cfg.loss, policy[: db.num_pairs], policy[db.num_pairs:], ref[:, 0], ref[:, 1],
                    beta=cfg.beta, label_smoothing=cfg.label_smoothing, strength=db.strength)


@torch.no_grad()
def evaluate(model, pairs, ref: torch.Tensor, cfg: DPOConfig, env, pad_id: int, token_budget: int) -> dict:
    """Preference accuracy, loss and reward margin over all eval pairs (means)."""
    model.eval()
    plan = split_global_batch(list(range(len(pairs))), [p.num_tokens for p in pairs], env.world_size,
                              token_budget=token_budget)[env.rank]
    sums = torch.zeros(4, dtype=torch.float64)  # loss, correct, margin, pairs
    for micro in plan:
        db = DPOBatch(pairs, micro, cfg.packing_samples, pad_id, env.device)
        losses, chosen, rejected = pair_losses(model, db, ref[micro], cfg)
        sums += torch.tensor([losses.sum().item(), (chosen > rejected).sum().item(),
                              (chosen - rejected).sum().item(), len(micro)], dtype=torch.float64)
    loss, correct, margin, n = all_reduce_sum(sums).tolist()
    model.train()
    return {"eval_loss": loss / n, "eval_acc": correct / n, "eval_reward_margin": margin / n}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(DPOConfig, argv)
    log = print if is_rank0() else (lambda *a, **k: None)

    # ---- data: files -> validated pairs -> token ids (every error stops here, before training)
    tokenizer = AutoTokenizer.from_pretrained(cfg.pretrain)
    keys = PreferenceKeys(cfg.prompt_key, cfg.chosen_key, cfg.rejected_key, cfg.strength_key)
    validate = partial(validate_dpo_pair, keys=keys, strength_needed=cfg.loss == "strength")
    train_pairs, eval_pairs = load_preference_pairs(cfg, tokenizer, validate, log)

    # ---- processes join only now: every mistake above stopped the run before a process group
    env = init_distributed()

    # ---- model: sharded, with optimizer and schedule; the reference is the model as loaded
    def build():
        actor = Actor.from_pretrained(cfg.pretrain, flash_attn=cfg.flash_attn or None)
        return actor, actor.model

    token_budget = cfg.packing_max_tokens or 2 * cfg.micro_train_batch_size * cfg.max_len
    sharding = dict(zero_stage=cfg.zero_stage, bf16=cfg.bf16, seed=cfg.seed)
    model = ShardedModel(build, env, gradient_checkpointing=cfg.gradient_checkpointing, lora=lora_spec(cfg), **sharding,
                         optim=optim_spec(cfg, training_steps(cfg, len(train_pairs)), token_budget))
    pad_id = tokenizer.pad_token_id
    if cfg.ref_on_the_fly:
        reference = ShardedModel(build, env, **sharding)  # frozen: eval mode, no optimizer
        ref_train = ref_eval = None
    else:  # before TrainingRun loads a checkpoint: these weights are still --pretrain's
        ref_train = reference_logps(model, train_pairs, cfg, env, pad_id, token_budget)
        ref_eval = reference_logps(model, eval_pairs, cfg, env, pad_id, token_budget) if eval_pairs else None
        log(f"[reference] log-probs of {len(train_pairs) + len(eval_pairs)} pairs from the initial policy")
    run = TrainingRun(cfg, env, model, tokenizer, num_samples=len(train_pairs), name="dpo", log=log)
    if cfg.ref_on_the_fly:
        ref_eval = reference_logps(reference, eval_pairs, cfg, env, pad_id, token_budget) if eval_pairs else None
    lengths = [p.num_tokens for p in train_pairs]

    def ref_of(db: DPOBatch) -> torch.Tensor:
        if not cfg.ref_on_the_fly:
            return ref_train[db.indices]
        with torch.no_grad():
            lp = response_logps(reference, db, needs_mean_logprobs(cfg.loss))
        return torch.stack([lp[: db.num_pairs], lp[db.num_pairs:]], dim=1)

    # ---- train
    for epoch, indices in run.global_batches():

        def micro_loss(micro):
            db = DPOBatch(train_pairs, micro, cfg.packing_samples, pad_id, env.device)
            losses, chosen, rejected = pair_losses(model, db, ref_of(db), cfg)
            stats = {"dpo_loss": losses.detach().sum(), "acc": (chosen > rejected).float().sum(),
                     "reward_chosen": chosen.sum(), "reward_rejected": rejected.sum(),
                     "reward_margin": (chosen - rejected).sum()}
            # this micro-batch's share of the global batch mean (FSDP averages gradients over ranks)
            return losses.sum() * (env.world_size / len(indices)), stats, db.batch.num_tokens

        totals, grad_norm, processed = model.step(model.plan(indices, lengths), micro_loss)
        run.step_done(totals, len(indices), grad_norm, epoch, sum(lengths[i] for i in indices), processed,
                      derive=lambda m: {"loss": m["dpo_loss"]})
        if eval_pairs and run.every(cfg.eval_steps):
            run.logger.log(run.step, evaluate(model, eval_pairs, ref_eval, cfg, env, pad_id, token_budget))
        if run.every(cfg.save_steps):
            run.save()

    # ---- final evaluation and save
    result = {"steps": run.step}
    if eval_pairs:
        eval_metrics = evaluate(model, eval_pairs, ref_eval, cfg, env, pad_id, token_budget)
        run.logger.log(run.step, eval_metrics)
        result |= eval_metrics
        log("[eval] " + "  ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    run.finish()
    if cfg.save_path:
        log(f"[save] policy -> {cfg.save_path}")
    return result


if __name__ == "__main__":
    run_cli(main)
