"""Scalar heads on a decoder backbone: the reward model and the critic.

Both are a plain HF ``AutoModelForSequenceClassification`` with ``num_labels=1`` (backbone + a
bias-free linear ``score`` head), so a saved folder is an ordinary HF checkpoint: for one unpadded
sequence ``AutoModelForSequenceClassification.from_pretrained(d)(ids).logits[0, 0]`` is our reward.
We call the backbone and the score head ourselves so that packed rows work and so that no
vocabulary-size logits are ever computed.

* ``RewardModel``: the score at each sample's last token (one scalar per sample).
* ``Critic``: the score at every token (a value per state).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from models.actor import load_hf_model
from models.packing import PackedBatch


def load_value_model(path: str, init_head_std: float | None = None, **kwargs) -> PreTrainedModel:
    """Load a sequence-classification model with one output from ``path``.

    ``path`` may be a causal LM (an SFT policy): the backbone is reused and the new ``score`` head
    is drawn from N(0, std) with std = 1/sqrt(hidden+1) unless given (a small head keeps the
    initial rewards near 0). A folder already holding a score head keeps it.
    """
    model, info = load_hf_model(
        AutoModelForSequenceClassification, path, num_labels=1, output_loading_info=True, **kwargs
    )
    if model.config.pad_token_id is None:
        raise ValueError(f"{path}: config has no pad_token_id; set one distinct from eos for reward models")
    head = _score_head(model)
    # a head missing from the checkpoint was freshly initialised by transformers: re-draw it
    if any(k.split(".")[-2] in ("score", "classifier") for k in info.get("missing_keys", [])):
        std = init_head_std if init_head_std is not None else 1.0 / math.sqrt(model.config.hidden_size + 1)
        with torch.no_grad():
            head.weight.normal_(0.0, std)
    return model


def _score_head(model: PreTrainedModel) -> nn.Linear:
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise ValueError(f"{type(model).__name__} has no single-output linear score head")
    return head


class _ScalarHeadModel(nn.Module):
    """Backbone + score head over a packed row; subclasses choose which positions to read."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        _score_head(model)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs):
        return cls(load_value_model(path, **kwargs))

    def _hidden(self, packed: PackedBatch) -> torch.Tensor:
        return self.model.base_model(input_ids=packed.input_ids, **packed.attention_kwargs()).last_hidden_state

    def _score(self, hidden: torch.Tensor) -> torch.Tensor:
        return _score_head(self.model)(hidden).squeeze(-1).float()


class RewardModel(_ScalarHeadModel):
    def forward(self, packed: PackedBatch) -> torch.Tensor:
        """``(n,)`` rewards: the score head at each sample's last token (only those n hidden
        states go through the head)."""
        hidden = self._hidden(packed)
        return self._score(packed.gather_last(hidden))


class Critic(_ScalarHeadModel):
    def forward(self, packed: PackedBatch) -> torch.Tensor:
        """``(1, T)`` values: ``V(x_<=t)`` at every token of the row."""
        return self._score(self._hidden(packed))
