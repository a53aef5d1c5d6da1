"""The sampler's log-probs against the trainer's: ``logprob_gap`` is the stale-weights detector
(about 1e-5 in fp32 when the engine holds the trainer's weights, large when a sync was missed),
``actor_logprobs`` the trainer's side of it, for tests and benchmarks."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from rl.rollout.sampling import Rollout, flatten


def logprob_gap(
    rollouts: Sequence[Rollout] | Sequence[Sequence[Rollout]],
    trainer_logprobs: Sequence[Sequence[float] | torch.Tensor],
) -> float:
    """Mean |sampler log-prob - trainer log-prob| over all sampled tokens: the stale-weights
    detector. ``trainer_logprobs[i]`` scores the response tokens of the i-th rollout (flattened
    order), e.g. from ``actor_logprobs``. NaN when there is no token to compare."""
    flat = flatten(rollouts)
    if len(flat) != len(trainer_logprobs):
        raise ValueError(f"{len(flat)} rollouts but {len(trainer_logprobs)} trainer log-prob rows")
    total, count = 0.0, 0
    for i, (r, t) in enumerate(zip(flat, trainer_logprobs)):
        if r.response_logprobs is None:
            raise ValueError(f"rollout {i} has no sampler log-probs")
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if t.numel() != len(r.response_ids) or len(r.response_logprobs) != len(r.response_ids):
            raise ValueError(f"rollout {i}: {len(r.response_ids)} response tokens, {len(r.response_logprobs)} "
                             f"sampler and {t.numel()} trainer log-probs")
        total += float((torch.tensor(r.response_logprobs, dtype=torch.float64) - t).abs().sum())
        count += t.numel()
    return total / count if count else math.nan


@torch.no_grad()
def actor_logprobs(
    actor, rollouts: Sequence[Rollout] | Sequence[Sequence[Rollout]], temperature: float = 1.0,
    token_budget: int = 16384,
) -> list[torch.Tensor]:
    """The trainer's log-probs of each rollout's response tokens (flattened order), from a
    ``models.actor.Actor`` on packed rows of prompt + response (at most ``token_budget`` tokens a
    row, one forward each) with ``token_mask`` on the response tokens. fp32 CPU tensors."""
    from models.packing import PackedBatch, pack_sequences

    flat = flatten(rollouts)
    seqs = [r.prompt_ids + r.response_ids for r in flat]
    out: list[torch.Tensor | None] = [None] * len(flat)
    device = next(actor.parameters()).device
    for row in pack_sequences([len(s) for s in seqs], max(token_budget, max(map(len, seqs)))):
        batch = PackedBatch.from_sequences([seqs[i] for i in row])
        mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for j, i in enumerate(row):
            start = int(batch.cu_seqlens[j]) + len(flat[i].prompt_ids)
            mask[0, start:int(batch.cu_seqlens[j + 1])] = True
        lp = actor(batch.to(device), token_mask=mask.to(device), temperature=temperature).log_probs
        for j, piece in enumerate(batch.split(lp.float().cpu())):
            i = row[j]
            out[i] = piece[len(flat[i].prompt_ids):].clone()
    return out  # type: ignore[return-value]
