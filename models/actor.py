"""The policy (actor) head: per-token log-probabilities and entropy of chosen tokens in a packed row.

``Actor`` wraps an HF causal LM (``self.model``) and owns no parameters of its own, so FSDP can
shard the wrapper as the root and ``save_hf_pretrained(actor.model, ...)`` writes a plain
``AutoModelForCausalLM`` folder. Vocabulary logits are computed only at the positions asked for
(response tokens), in chunks, never for the whole row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from models.packing import PackedBatch
from models.varlen_attention import select_attn_implementation


@dataclass
class ActorOutput:
    log_probs: torch.Tensor  # (1, T): log pi(x_t | x_<t) where the mask is set, 0 elsewhere
    entropy: torch.Tensor | None  # (1, T): H(pi(. | x_<t)) where the mask is set, 0 elsewhere


def load_hf_model(auto_class, path: str, *, flash_attn: bool | None = None, dtype=torch.float32, device=None, **kwargs) -> PreTrainedModel:
    """``auto_class.from_pretrained`` with the packed-attention implementation for this machine."""
    attn = select_attn_implementation(flash_attn, device)
    if attn == "flash_attention_2" and dtype == torch.float32:
        dtype = torch.bfloat16  # flash-attn kernels take half precision only
    return auto_class.from_pretrained(path, attn_implementation=attn, dtype=dtype, **kwargs)


def token_log_probs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(logits)[target]`` and ``-sum p log p`` per row of ``logits`` (N, V), in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return chosen, entropy


class Actor(nn.Module):
    def __init__(self, model: PreTrainedModel, chunk_size: int = 2048):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size  # tokens per lm_head call: bounds the (chunk, vocab) logits

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "Actor":
        return cls(load_hf_model(AutoModelForCausalLM, path, **kwargs))

    def forward(
        self,
        packed: PackedBatch,
        token_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ) -> ActorOutput:
        """Log-probs of the tokens where ``token_mask`` (1, T) is true (e.g. response tokens).

        Outputs are aligned with the tokens they score: ``log_probs[0, t] = log pi(x_t | x_<t)``,
        read from the hidden state at ``t - 1`` of the same sample. A sample's first token has no
        prediction and is never scored. ``temperature`` divides the logits, as the sampler did.
        """
        T = packed.num_tokens
        device = packed.input_ids.device
        scorable = torch.ones(T, dtype=torch.bool, device=device)
        scorable[packed.cu_seqlens[:-1].long()] = False  # first token of every sample
        if token_mask is not None:
            scorable &= token_mask.reshape(-1).bool()
        positions = scorable.nonzero().squeeze(-1)

        hidden = self.model.base_model(input_ids=packed.input_ids, **packed.attention_kwargs()).last_hidden_state[0]
        lm_head = self.model.get_output_embeddings()
        targets = packed.input_ids[0, positions]
        chosen, entropies = [], []
        for s in range(0, positions.numel(), self.chunk_size):
            idx = positions[s : s + self.chunk_size]
            logits = lm_head(hidden[idx - 1])
            if temperature != 1.0:
                logits = logits / temperature
            c, e = token_log_probs_and_entropy(logits, targets[s : s + self.chunk_size], return_entropy)
            chosen.append(c)
            entropies.append(e)

        log_probs = hidden.new_zeros(T, dtype=torch.float32)
        if positions.numel():
            log_probs = log_probs.index_put((positions,), torch.cat(chosen))
        entropy = None
        if return_entropy:
            entropy = hidden.new_zeros(T, dtype=torch.float32)
            if positions.numel():
                entropy = entropy.index_put((positions,), torch.cat(entropies))
            entropy = entropy.unsqueeze(0)
        return ActorOutput(log_probs.unsqueeze(0), entropy)
