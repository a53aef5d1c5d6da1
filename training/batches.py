"""Which samples each optimizer step and each rank's micro-batches see, reproducibly.

``EpochSampler`` fixes the order of an epoch from (seed, epoch), cuts it into global batches of
``train_batch_size`` samples (an incomplete last batch is dropped, so every step has the same
size), and can start from any step: a resumed run sees exactly the batches it had not yet seen.
``split_global_batch`` gives every rank the same number of micro-batches, either by count or, with
packing, by token budget (``models.packing.balanced_micro_batches``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from models.packing import balanced_micro_batches
from training.config import ConfigError


def check_fills_a_batch(num_samples: int, train_batch_size: int, what: str = "training samples") -> None:
    """Every step takes a full global batch: the data must fill one (checked before the model loads)."""
    if num_samples < train_batch_size:
        raise ConfigError(f"{num_samples} usable {what} cannot fill one global batch of --train_batch_size "
                          f"{train_batch_size}: lower it or add data")


@dataclass
class EpochSampler:
    num_samples: int
    train_batch_size: int
    seed: int

    def __post_init__(self):
        check_fills_a_batch(self.num_samples, self.train_batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.train_batch_size

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def global_batches(self, epoch: int, start_step: int = 0) -> Iterator[list[int]]:
        order = self.order(epoch)
        for step in range(start_step, self.steps_per_epoch):
            yield order[step * self.train_batch_size : (step + 1) * self.train_batch_size]


    def batches_from(
        self, position: tuple[int, int], max_epochs: int, limit: int
    ) -> Iterator[tuple[int, list[int], tuple[int, int]]]:
        """``(epoch, indices, position after it)`` for the global batches from ``position``
        = (epoch, batch index in that epoch) on, at most ``limit`` of them: the loop of a trainer,
        which checkpoints the position after each step to resume exactly there."""
        epoch, first = position
        for epoch in range(epoch, max_epochs):
            for b, indices in enumerate(self.global_batches(epoch, first), start=first):
                if limit <= 0:
                    return
                limit -= 1
                after = (epoch, b + 1) if b + 1 < self.steps_per_epoch else (epoch + 1, 0)
                yield epoch, indices, after
            first = 0


def split_global_batch(
    indices: Sequence[int],
    lengths: Sequence[int],
    world_size: int,
    micro_batch_size: int | None = None,
    token_budget: int | None = None,
) -> list[list[list[int]]]:
    """``plan[rank][micro_batch] -> sample indices`` (into the dataset).

    By count (``micro_batch_size``): rank r takes samples r, r+W, ... and cuts them into
    micro-batches of that size. By tokens (``token_budget``, ``lengths[i]`` per dataset index): as
    many balanced micro-batches as the budget needs, the same number on every rank; the count
    need not divide by the world size (evaluation sets have any size).
    """
    if token_budget is not None:  # any count: ranks may differ by samples, not by micro-batches
        plan = balanced_micro_batches([lengths[i] for i in indices], token_budget, world_size)
        return [[[indices[j] for j in mb] for mb in rank_plan] for rank_plan in plan]
    if micro_batch_size is None:
        raise ValueError("give micro_batch_size or token_budget")
    if len(indices) % world_size:
        raise ValueError(f"global batch of {len(indices)} is not divisible by world size {world_size}")
    per_rank = len(indices) // world_size
    if per_rank % micro_batch_size:
        raise ValueError(
            f"train_batch_size {len(indices)} / world size {world_size} = {per_rank} samples per rank "
            f"is not a multiple of micro_train_batch_size {micro_batch_size}"
        )
    plan = []
    for r in range(world_size):
        mine = list(indices[r::world_size])
        plan.append([mine[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)])
    return plan
