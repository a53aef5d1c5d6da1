"""Scalar heads on a decoder backbone: the reward model and the critic.

Both are a plain HF ``AutoModelForSequenceClassification`` with ``num_labels=1`` (backbone + a
bias-free linear ``score`` head), so a saved folder is an ordinary HF checkpoint: for one unpadded
sequence ``AutoModelForSequenceClassification.from_pretrained(d)(ids).logits[0, 0]`` is our reward,
unless pad == eos (SmolLM2): HF then reads the last token that is not the pad id, the one before
the final end-of-turn token, while these classes read each sample's last token by its length.
We call the backbone and the score head ourselves so that packed rows work and so that no
vocabulary-size logits are ever computed.

* ``RewardModel``: the score at each sample's last token (one scalar per sample).
* ``Critic``: the score at every token (a value per state).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from models.actor import Batch, load_hf_model, score_tokens


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


def load_output_embedding(path: str) -> nn.Linear:
    """The LM head of the causal LM at ``path`` as a standalone ``nn.Linear`` (tied embeddings
    included), read from its safetensors files without building the whole model."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    head = lm.get_output_embeddings()
    name = next(n for n, p in lm.named_parameters() if p is head.weight)
    files = sorted(Path(path).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            if name in st.keys():
                weight = st.get_tensor(name).float()
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                return linear
    raise ValueError(
        f"{path}: no LM head weight {name!r} in its safetensors files; --loss logexpwithlm needs "
        "--pretrain to be a causal LM checkpoint"
    )


class _ScalarHeadModel(nn.Module):
    """Backbone + score head over a packed row; subclasses choose which positions to read."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        _score_head(model)

    @classmethod
    def from_pretrained(cls, path: str, with_lm_head: bool = False, **kwargs):
        model = load_value_model(path, **kwargs)
        return cls(model, load_output_embedding(path)) if with_lm_head else cls(model)

    def _hidden(self, batch: Batch) -> torch.Tensor:
        return self.model.base_model(input_ids=batch.input_ids, **batch.attention_kwargs()).last_hidden_state

    def _score(self, hidden: torch.Tensor) -> torch.Tensor:
        # a fresh tensor, not a view: FSDP2 warns that in-place ops on a view skip its hooks
        return _score_head(self.model)(hidden).squeeze(-1).float().clone()


class RewardModel(_ScalarHeadModel):
    """``lm_head`` (optional) scores tokens for the LM term of ``logexpwithlm``; it lives beside the
    HF model, so the saved reward model stays a plain sequence-classification folder."""

    def __init__(self, model: PreTrainedModel, lm_head: nn.Linear | None = None):
        super().__init__(model)
        self.lm_head = lm_head

    def forward(self, batch: Batch, lm_token_mask: torch.Tensor | None = None):
        """``(n,)`` rewards: the score head at each sample's last token (only those n hidden states
        go through the head). With ``lm_token_mask``: ``(rewards, token_log_probs)``, the log-probs
        of the masked tokens from the same backbone pass (see ``models.actor.score_tokens``)."""
        hidden = self._hidden(batch)
        rewards = self._score(batch.gather_last(hidden))
        if lm_token_mask is None:
            return rewards
        if self.lm_head is None:
            raise ValueError("this reward model has no LM head; load it with with_lm_head=True")
        return rewards, score_tokens(hidden, batch, self.lm_head, lm_token_mask).log_probs


class Critic(_ScalarHeadModel):
    def forward(self, batch: Batch) -> torch.Tensor:
        """Values ``V(x_<=t)`` at every token, shaped like ``batch.input_ids``."""
        return self._score(self._hidden(batch))
