"""Micro-batches of tokenized samples -> the batch layouts of ``models`` (packed or padded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from models.packing import PackedBatch, PaddedBatch
from rlhf_data.tokenize import PreferencePair


def response_mask(length: int, prompt_len: int) -> torch.Tensor:
    return torch.arange(length) >= prompt_len


def layout_mask(batch: PackedBatch | PaddedBatch, per_sample: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample boolean masks laid out like ``batch.input_ids`` (False on padding)."""
    if isinstance(batch, PackedBatch):
        return torch.cat(list(per_sample)).unsqueeze(0)
    out = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    for i, m in enumerate(per_sample):
        out[i, : m.numel()] = m
    return out


def make_batch(sequences: Sequence[Sequence[int]], packing: bool, pad_token_id: int | None) -> PackedBatch | PaddedBatch:
    """Packed rows, or right padding with ``pad_token_id``. Every mask of a padded batch (attention,
    loss, the RM's last token) comes from the sequence lengths, never from ``!= pad_token_id``: a
    pad that is also EOS (SmolLM2: ``<|im_end|>``) ends real samples, and a mask from the pad id
    would drop it. The pad value is therefore never read, and a tokenizer without one pads with 0."""
    if packing:
        return PackedBatch.from_sequences(sequences)
    return PaddedBatch.from_sequences(sequences, 0 if pad_token_id is None else pad_token_id)


@dataclass
class PairBatch:
    """n pairs as one batch: samples 0..n-1 are the chosen responses, n..2n-1 the rejected."""

    batch: PackedBatch | PaddedBatch
    chosen_response_mask: torch.Tensor  # like batch.input_ids: response tokens of chosen samples
    margins: torch.Tensor  # (n,)
    num_pairs: int

    def to(self, device) -> "PairBatch":
        return PairBatch(self.batch.to(device), self.chosen_response_mask.to(device), self.margins.to(device), self.num_pairs)


def collate_pairs(pairs: Sequence[PreferencePair], packing: bool, pad_token_id: int) -> PairBatch:
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = make_batch(seqs, packing, pad_token_id)
    masks = [response_mask(len(p.chosen), p.chosen_prompt_len) for p in pairs]
    masks += [torch.zeros(len(p.rejected), dtype=torch.bool) for p in pairs]
    return PairBatch(
        batch,
        layout_mask(batch, masks),
        torch.tensor([p.margin for p in pairs], dtype=torch.float32),
        len(pairs),
    )
