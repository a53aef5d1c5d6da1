"""The training steps shared by the FSDP worker and its single-process reference.

Each rank takes samples ``rank::world`` of the global batch and scales its loss by
``world / N_global`` so that FSDP's gradient average equals the gradient of the global mean.
"""

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from models.packing import PackedBatch


def make_optimizer(model, name: str):
    """SGD with momentum for the FSDP-vs-one-process comparison: Adam divides by sqrt(v), which
    turns last-bit summation differences on near-zero gradients (rarely seen vocabulary rows)
    into lr-sized steps, so Adam parameters may differ by more than 1e-5 though the gradients
    agree to ~1e-9. AdamW (the real optimizer) is used where exactness holds: resume."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def global_batch(kind: str, model_dir) -> list[torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(123)
    lengths = torch.randint(4, 40, (8,), generator=g).tolist()
    return [torch.randint(10, len(tok), (n,), generator=g) for n in lengths]


def actor_step(actor, opt, seqs, rank=0, world=1):
    """Maximise log-likelihood of the second half of each sample (the 'response')."""
    masks = [torch.arange(len(s)) >= len(s) // 2 for s in seqs]
    n_global = sum(int(m[1:].sum()) for m in masks)  # first tokens are never scored
    mine = list(range(rank, len(seqs), world))
    pb = PackedBatch.from_sequences([seqs[i] for i in mine])
    mask = torch.cat([masks[i] for i in mine]).unsqueeze(0)
    out = actor(pb, token_mask=mask)
    loss = -(out.log_probs * mask).sum() * world / n_global
    loss.backward()
    torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
    opt.step()
    opt.zero_grad()


def reward_step(rm, opt, seqs, rank=0, world=1):
    """Pairwise logistic loss with pairs (seqs[2i], seqs[2i+1]) as (chosen, rejected)."""
    n_pairs = len(seqs) // 2
    mine = list(range(rank, n_pairs, world))
    pb = PackedBatch.from_sequences([seqs[2 * i] for i in mine] + [seqs[2 * i + 1] for i in mine])
    r = rm(pb)
    chosen, rejected = r[: len(mine)], r[len(mine):]
    loss = F.softplus(rejected - chosen).sum() * world / n_pairs
    loss.backward()
    torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
