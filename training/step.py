"""One optimizer step over a rank's micro-batches, shared by the trainers."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.distributed.fsdp import FSDPModule

from models.distributed import all_reduce_mean

MicroLoss = Callable[[Sequence[int]], tuple[torch.Tensor, dict[str, torch.Tensor], int]]


def train_step(model, plan: Sequence[Sequence[int]], micro_loss: MicroLoss, optimizer, scheduler, max_norm: float):
    """Forward + backward of every micro-batch in ``plan`` (this rank's), then clip and step.

    ``micro_loss(indices) -> (loss, stats, processed_tokens)``: the loss must already be this
    micro-batch's share of the global-batch objective (then the summed gradients are exact under
    any split), ``stats`` are sums to be averaged over the global batch by ``global_means``.
    FSDP reduce-scatters gradients once, after the last micro-batch.
    Returns ``(summed stats, grad norm, processed tokens)``.
    """
    totals: dict[str, torch.Tensor] = {}
    processed = 0
    for m, micro in enumerate(plan):
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(m == len(plan) - 1)
        loss, stats, tokens = micro_loss(micro)
        loss.backward()
        processed += tokens
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return totals, float(grad_norm), processed


def global_means(totals: dict[str, torch.Tensor], n_global: int, world_size: int) -> dict[str, float]:
    """Per-rank sums -> sums over ranks -> means over the ``n_global`` samples of the batch."""
    return {k: (all_reduce_mean(v) * world_size / n_global).item() for k, v in totals.items()}
