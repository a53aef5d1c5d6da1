"""What travels between the driver and the workers: sequences to score, and the experience a
policy / critic update trains on. Plain dataclasses of lists and 1-D CPU tensors (one per sample,
response tokens only, no padding), so Ray pickles them once (``ray.put``) and every rank reads
the same object; the per-token ``(B, T)`` algorithms of ``rl.advantages`` get a right-padded view
through ``pad_responses`` / ``unpad_responses``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from models.packing import PackedBatch


@dataclass
class SequenceBatch:
    """Prompt + response token ids of each sample; ``prompt_lens[i]`` tokens of ``sequences[i]``
    are the prompt, the rest the response (at least one token)."""

    sequences: list[list[int]]
    prompt_lens: list[int]

    def __post_init__(self):
        if len(self.sequences) != len(self.prompt_lens):
            raise ValueError(f"{len(self.sequences)} sequences but {len(self.prompt_lens)} prompt lengths")
        for i, (s, p) in enumerate(zip(self.sequences, self.prompt_lens)):
            if not 1 <= p < len(s):
                raise ValueError(f"sample {i}: prompt length {p} of a {len(s)}-token sequence leaves no response")

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.sequences]

    @property
    def response_lens(self) -> list[int]:
        return [len(s) - p for s, p in zip(self.sequences, self.prompt_lens)]

    @classmethod
    def from_rollouts(cls, rollouts) -> "SequenceBatch":
        """From ``rl.rollout.Rollout``s (a flat list). Every response has at least one token: the
        engines keep the stop token in ``response_ids``."""
        return cls([r.prompt_ids + r.response_ids for r in rollouts], [len(r.prompt_ids) for r in rollouts])

    def packed(self, indices: Sequence[int]) -> tuple[PackedBatch, torch.Tensor]:
        """One packed row of the samples ``indices`` and the mask of their response tokens."""
        batch = PackedBatch.from_sequences([self.sequences[i] for i in indices])
        mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for j, i in enumerate(indices):
            start = int(batch.cu_seqlens[j]) + self.prompt_lens[i]
            mask[0, start:int(batch.cu_seqlens[j + 1])] = True
        return batch, mask

    def split_responses(self, indices: Sequence[int], flat: torch.Tensor) -> list[torch.Tensor]:
        """A packed row's values at the response-token mask (``flat``, in order) -> one tensor
        per sample of ``indices``."""
        sizes = [len(self.sequences[i]) - self.prompt_lens[i] for i in indices]
        return list(flat.split(sizes))


@dataclass
class Experience(SequenceBatch):
    """A rollout batch ready to train on. Per-sample 1-D float32 tensors over response tokens:

    ``old_logprobs``  log-probs of the policy that sampled the tokens (the PPO ratio's denominator)
    ``advantages``    policy-gradient weights
    ``returns``       the critic's regression targets (PPO only)
    ``old_values``    the critic's values when the advantages were computed (value clipping)
    """

    old_logprobs: list[torch.Tensor] = field(default_factory=list)
    advantages: list[torch.Tensor] = field(default_factory=list)
    returns: list[torch.Tensor] | None = None
    old_values: list[torch.Tensor] | None = None

    def gather(self, name: str, indices: Sequence[int]) -> torch.Tensor:
        """The response-token values of ``indices``, concatenated in order (matches ``packed``'s mask)."""
        return torch.cat([getattr(self, name)[i] for i in indices])


def pad_responses(rows: Sequence[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D tensors -> right-padded ``(B, T)`` float32 and its 0/1 mask (``rl.advantages`` layout)."""
    T = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), T), value, dtype=torch.float32)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r.float()
        mask[i, : len(r)] = True
    return out, mask


def unpad_responses(padded: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """The inverse of ``pad_responses``: row i's first ``lengths[i]`` values (copies)."""
    return [padded[i, :n].clone() for i, n in enumerate(lengths)]
