"""Sample packing: many variable-length samples in one row, no padding.

A packed row concatenates samples ``s_1 .. s_n`` into one ``(1, T)`` tensor. Attention must stay
inside each sample, so every packed forward carries the segment boundaries:

* ``position_ids`` restart at 0 for every sample (rotary embeddings see per-sample positions);
* ``cu_seqlens`` (int32, ``[0, L_1, L_1+L_2, ..., T]``) and ``max_seqlen``, the arguments of
  flash-attention's varlen kernels and of our CPU fallback (``models.varlen_attention``).

Also here: which samples go into which row (``pack_sequences``: best-fit decreasing) and how a
global batch is cut into micro-batches of similar token counts for data-parallel ranks
(``balanced_micro_batches``).
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import torch


def pack_sequences(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Assign samples to rows holding at most ``budget`` tokens each; returns sample indices per row.

    Best-fit decreasing: take samples longest first and put each in the open row whose free space
    is smallest but still large enough (a sorted list of free spaces makes this O(n log n)).
    BFD uses at most 11/9 OPT + 1 rows (Dósa 2007) and in practice fills rows almost fully, which
    first-come packing does not. Rows are returned in creation order, indices inside a row ascending.
    """
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > budget]
    if too_long:
        i, n = too_long[0]
        raise ValueError(
            f"sample {i} has {n} tokens, more than the packing budget of {budget} "
            f"({len(too_long)} such samples); truncate samples (max_len) or raise the budget"
        )
    if any(n <= 0 for n in lengths):
        raise ValueError("cannot pack empty samples (length 0)")

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free_space, row_id)
    for i in order:
        n = lengths[i]
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            rows.append([i])
            bisect.insort(free, (budget - n, len(rows) - 1))
        else:
            space, row = free.pop(pos)
            rows[row].append(i)
            bisect.insort(free, (space - n, row))
    return [sorted(r) for r in rows]


def balanced_micro_batches(
    lengths: Sequence[int], budget: int, num_ranks: int = 1
) -> list[list[list[int]]]:
    """Split a global batch into micro-batches for ``num_ranks`` data-parallel ranks.

    Every rank gets the **same number** of micro-batches (FSDP ranks must run the same number of
    forward/backward passes or the collectives hang), each micro-batch holds at most ``budget``
    tokens, and token counts are balanced so no rank waits long for another.
    Start from the fewest micro-batches the budget allows, ``k = ceil(sum / budget)`` rounded up
    to a multiple of ``num_ranks``; assign samples longest-first to the lightest micro-batch
    (LPT scheduling, Graham 1969) and add micro-batches until none exceeds the budget.
    Returns ``result[rank][micro_batch] -> sample indices`` (ascending).
    """
    if num_ranks < 1:
        raise ValueError("num_ranks must be >= 1")
    if len(lengths) < num_ranks:
        raise ValueError(f"{len(lengths)} samples cannot feed {num_ranks} ranks")
    pack_sequences(lengths, budget)  # validates lengths against the budget
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    k = max(1, math.ceil(sum(lengths) / budget))
    k = math.ceil(k / num_ranks) * num_ranks
    k_max = len(lengths) - len(lengths) % num_ranks  # no micro-batch may be empty
    while True:
        k = min(k, k_max)
        heap = [(0, b) for b in range(k)]
        bins: list[list[int]] = [[] for _ in range(k)]
        for i in order:
            load, b = heapq.heappop(heap)
            bins[b].append(i)
            heapq.heappush(heap, (load + lengths[i], b))
        if max(load for load, _ in heap) <= budget:
            break
        if k == k_max:
            raise ValueError(
                f"cannot split {len(lengths)} samples into an equal number of micro-batches "
                f"per rank for {num_ranks} ranks under {budget} tokens; raise the token budget"
            )
        k += num_ranks
    bins = [sorted(b) for b in bins]
    # Heaviest first, dealt round-robin, so each rank's i-th micro-batch is of similar size.
    bins.sort(key=lambda b: -sum(lengths[i] for i in b))
    return [bins[r::num_ranks] for r in range(num_ranks)]


@dataclass
class PackedBatch:
    """Samples concatenated into one row, with what attention and the heads need to stay per sample.

    ``input_ids`` and ``position_ids`` are ``(1, T)``; ``cu_seqlens`` is int32 ``(n + 1,)``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int] | torch.Tensor]) -> "PackedBatch":
        if len(sequences) == 0:
            raise ValueError("cannot pack an empty list of sequences")
        tensors = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
        lengths = torch.tensor([t.numel() for t in tensors], dtype=torch.int32)
        if (lengths == 0).any():
            raise ValueError(f"sequence {int((lengths == 0).nonzero()[0])} is empty")
        cu = torch.zeros(len(tensors) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        return cls(
            input_ids=torch.cat(tensors).unsqueeze(0),
            position_ids=position_ids_from_cu_seqlens(cu).unsqueeze(0),
            cu_seqlens=cu,
            max_seqlen=int(lengths.max()),
        )

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def seq_lens(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.cu_seqlens.to(device),
            self.max_seqlen,
        )

    def attention_kwargs(self) -> dict:
        """Keyword arguments for an HF model forward: transformers routes them to the attention
        function (flash-attn varlen on CUDA, ``models.varlen_attention`` elsewhere)."""
        return {
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
            "use_cache": False,  # a cache (the config default) makes HF build a cross-sample mask
        }

    def flat_token_mask(self) -> torch.Tensor:
        return torch.ones(self.num_tokens, dtype=torch.bool, device=self.input_ids.device)

    def sample_starts(self) -> torch.Tensor:
        return self.cu_seqlens[:-1].long()

    def last_token_indices(self) -> torch.Tensor:
        """Index in the row of each sample's last token (where a reward model reads its score)."""
        return self.cu_seqlens[1:].long() - 1

    def gather_last(self, per_token: torch.Tensor) -> torch.Tensor:
        """``(1, T, ...)`` per-token outputs -> ``(n, ...)`` values at each sample's last token."""
        return per_token.flatten(0, 1)[self.last_token_indices()]

    def split(self, per_token: torch.Tensor) -> list[torch.Tensor]:
        """``(1, T, ...)`` per-token outputs -> one ``(L_i, ...)`` tensor per sample."""
        if per_token.dim() < 2 or per_token.shape[0] != 1 or per_token.shape[1] != self.num_tokens:
            raise ValueError(f"expected shape (1, {self.num_tokens}, ...), got {tuple(per_token.shape)}")
        return list(torch.split(per_token[0], self.seq_lens, dim=0))

    def next_token_targets(self, ignore_index: int = -100) -> torch.Tensor:
        """``(1, T)`` labels for next-token prediction that never cross a sample boundary:
        position t predicts token t+1 of the same sample; each sample's last position is ignored."""
        targets = torch.full_like(self.input_ids, ignore_index)
        targets[0, :-1] = self.input_ids[0, 1:]
        targets[0, self.last_token_indices()] = ignore_index
        return targets


@dataclass
class PaddedBatch:
    """Right-padded ``(B, L)`` batch with the same interface as ``PackedBatch`` for the heads: the
    reference that packing must match, and the layout for models without a packed path."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int] | torch.Tensor], pad_token_id: int) -> "PaddedBatch":
        tensors = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
        if any(t.numel() == 0 for t in tensors):
            raise ValueError("cannot pad an empty sequence")
        width = max(t.numel() for t in tensors)
        ids = torch.full((len(tensors), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(tensors), width), dtype=torch.long)
        for i, t in enumerate(tensors):
            ids[i, : t.numel()] = t
            mask[i, : t.numel()] = 1
        return cls(ids, mask)

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_lens(self) -> list[int]:
        return self.attention_mask.sum(-1).tolist()

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()  # processed tokens, padding included

    def to(self, device) -> "PaddedBatch":
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def attention_kwargs(self) -> dict:
        return {"attention_mask": self.attention_mask, "use_cache": False}

    def flat_token_mask(self) -> torch.Tensor:
        """``(B*L,)`` True at real (non-pad) tokens, in the flattened layout of ``flat_index``."""
        return self.attention_mask.reshape(-1).bool()

    def sample_starts(self) -> torch.Tensor:
        """Flat index of each sample's first token."""
        return torch.arange(self.num_samples, device=self.input_ids.device) * self.input_ids.shape[1]

    def last_token_indices(self) -> torch.Tensor:
        """Flat index (into ``(B*L)``) of each sample's last real token."""
        return self.sample_starts() + self.attention_mask.sum(-1) - 1

    def gather_last(self, per_token: torch.Tensor) -> torch.Tensor:
        return per_token.flatten(0, 1)[self.last_token_indices()]


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[0, .., L_1-1, 0, .., L_2-1, ...]`` as int64 ``(T,)``, without a Python loop."""
    cu = cu_seqlens.long()
    total = int(cu[-1])
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return torch.arange(total, device=cu.device) - starts
