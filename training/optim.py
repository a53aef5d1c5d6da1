"""AdamW and the learning-rate schedule shared by the trainers."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import get_scheduler


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D tensors) get no weight decay (Loshchilov & Hutter 2019)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.1):
    """Linear warmup over ``ceil(warmup_ratio * total_steps)`` steps, then cosine decay to
    ``min_lr_ratio * lr`` (the seed system: cosine, 3% warmup)."""
    return get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=math.ceil(warmup_ratio * total_steps),
        num_training_steps=max(total_steps, 1),
        scheduler_specific_kwargs={"min_lr_rate": min_lr_ratio},
    )
