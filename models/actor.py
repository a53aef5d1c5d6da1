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

from models.packing import PackedBatch, PaddedBatch

Batch = PackedBatch | PaddedBatch
from models.varlen_attention import select_attn_implementation


@dataclass
class ActorOutput:
    log_probs: torch.Tensor  # like input_ids: log pi(x_t | x_<t) where scored, 0 elsewhere
    entropy: torch.Tensor | None  # like input_ids: H(pi(. | x_<t)) where scored, 0 elsewhere


def load_hf_model(auto_class, path: str, *, flash_attn: bool | None = None, dtype=torch.float32, device=None, **kwargs) -> PreTrainedModel:
    """``auto_class.from_pretrained`` with the packed-attention implementation for this machine,
    in ``dtype`` as asked. flash-attn's kernels take half precision only, but the weights stay as
    asked: a trainable model keeps fp32 master weights, and its compute runs in bf16 through
    FSDP2's mixed precision, which ``training.sharded_model.ShardedModel`` turns on for such a
    model (``needs_half_precision``)."""
    attn = select_attn_implementation(flash_attn, device)
    return auto_class.from_pretrained(path, attn_implementation=attn, dtype=dtype, **kwargs)


def token_log_probs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(logits)[target]`` and ``-sum p log p`` per row of ``logits`` (N, V), in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return chosen, entropy


def scored_positions(batch: Batch, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Flat indices of the tokens to score: real tokens, not a sample's first token (nothing
    predicts it), and inside ``token_mask`` when given."""
    keep = batch.flat_token_mask().clone()
    keep[batch.sample_starts()] = False
    if token_mask is not None:
        keep &= token_mask.reshape(-1).bool()
    return keep.nonzero().squeeze(-1)


def score_tokens(
    hidden: torch.Tensor,
    batch: Batch,
    lm_head: nn.Module,
    token_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = 2048,
) -> ActorOutput:
    """log pi(x_t | x_<t) (and entropy) from the backbone's hidden states, aligned with the tokens
    they score and shaped like ``batch.input_ids``; 0 where not scored. The LM head runs only on
    the scored positions, ``chunk_size`` at a time, so no full-vocabulary logits of the batch exist."""
    flat_hidden = hidden.flatten(0, 1)
    flat_ids = batch.input_ids.reshape(-1)
    positions = scored_positions(batch, token_mask)
    targets = flat_ids[positions]
    chosen, entropies = [], []
    for s in range(0, positions.numel(), chunk_size):
        logits = lm_head(flat_hidden[positions[s : s + chunk_size] - 1])
        if temperature != 1.0:
            logits = logits / temperature
        c, e = token_log_probs_and_entropy(logits, targets[s : s + chunk_size], return_entropy)
        chosen.append(c)
        entropies.append(e)

    def scatter(parts):
        # built in its final shape (not a view): FSDP2 warns about views returned from forward
        out = flat_hidden.new_zeros(batch.input_ids.shape, dtype=torch.float32)
        if positions.numel():
            out.view(-1).index_put_((positions,), torch.cat(parts))
        else:  # nothing to score: stay in the graph so backward (and FSDP's reductions) still run
            out = out + 0.0 * flat_hidden.sum()
        return out

    return ActorOutput(scatter(chosen), scatter(entropies) if return_entropy else None)


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
        batch: Batch,
        token_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ) -> ActorOutput:
        """Log-probs of the tokens where ``token_mask`` (shaped like ``input_ids``) is true.

        ``log_probs[..., t] = log pi(x_t | x_<t)``, read from the hidden state at ``t - 1`` of the
        same sample; a sample's first token is never scored. ``temperature`` divides the logits,
        as the sampler did.
        """
        hidden = self.model.base_model(input_ids=batch.input_ids, **batch.attention_kwargs()).last_hidden_state
        return score_tokens(
            hidden, batch, self.model.get_output_embeddings(), token_mask, temperature,
            return_entropy, self.chunk_size,
        )
