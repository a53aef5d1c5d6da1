"""One model sharded over the process group, with its optimizer and schedule when it trains: the
scaffold that SFT and RM training (``training.run.TrainingRun``) and every RL worker
(``rl.workers.ModelWorker``) build their model with.

    model = ShardedModel(lambda: Actor.from_pretrained(path), env, optim=OptimSpec(lr, total_steps))
    out = model(batch)                                     # the wrapped module's forward
    totals, grad_norm, processed = model.step(model.plan(indices, lengths), micro_loss)
    model.save_state(folder); model.load_state(folder)     # resumable state (sharded)
    model.save_pretrained(path, tokenizer)                 # a plain HF folder (rank 0 writes)

A frozen model (``optim=None``: the reference policy, a reward model) is put in eval mode with no
gradients and may load in bf16 (``load_dtype``).

With ``lora`` (``models.lora.LoraSpec``) only the adapters (and a value model's score head) train;
everything that leaves the model as weights (``full_state_dict``: the vLLM weight sync;
``save_pretrained``) is the merged plain HF state dict, so no reader needs peft.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from models.fsdp import full_state_dict, save_hf_pretrained, shard_model
from models.lora import LoraSpec, add_lora, merge_lora, parameter_counts, save_adapter
from models.varlen_attention import needs_half_precision
from training.batches import split_global_batch
from training.checkpoint import load_model_state, save_model_state
from training.optim import build_optimizer, build_scheduler
from training.step import MicroLoss, train_step


@dataclass
class OptimSpec:
    """How a trainable model updates: optimizer, schedule, clipping and its micro-batch plan."""

    learning_rate: float
    total_steps: int
    l2: float = 0.0
    lr_warmup_ratio: float = 0.03
    max_norm: float = 1.0
    micro_batch_size: int = 4  # samples per micro-batch per rank (without packing)
    packing_samples: bool = True
    token_budget: int = 8192  # tokens of a packed micro-batch (with packing)


def load_dtype(bf16: bool, trainable: bool) -> torch.dtype:
    """bf16 weights for a frozen model under --bf16: its forward is bf16 either way (FSDP's mixed
    precision casts fp32 weights to the same bf16 values), at half the memory. A trainable model
    keeps fp32 master weights, also under flash-attn (``ShardedModel`` computes in bf16 then)."""
    return torch.bfloat16 if bf16 and not trainable else torch.float32


class ShardedModel:
    """``build()`` -> ``(module, the HF model inside it)``, sharded with FSDP2 over ``env``'s
    process group; trainable when ``optim`` is given."""

    def __init__(self, build: Callable[[], tuple[torch.nn.Module, torch.nn.Module]], env, *, zero_stage: int = 3,
                 bf16: bool = False, gradient_checkpointing: bool = False, seed: int = 42,
                 optim: OptimSpec | None = None, lora: LoraSpec | None = None):
        if lora is not None and optim is None:
            raise ValueError("LoRA adapters are for a model that trains (optim is None)")
        self.env, self.optim_spec = env, optim
        torch.manual_seed(seed)  # a fresh head (and the adapters' A) get the same init on every rank
        self.module, self.hf_model = build()
        self.hf_model.config.use_cache = False  # packed rows: the KV cache would merge samples
        self.lora_config = add_lora(self.hf_model, lora) if lora is not None else None
        # before sharding (after it, parameters are this rank's shards)
        self.num_trainable_parameters, self.num_parameters = parameter_counts(self.module)
        # One dtype policy for every model: weights as loaded (fp32 masters when it trains), bf16
        # compute by FSDP2's mixed precision under --bf16 and whenever the attention kernels take
        # half precision only (flash-attn, selected automatically on CUDA)
        self.bf16 = bf16 or needs_half_precision(self.hf_model)
        shard_model(self.module, zero_stage=zero_stage, device=env.device, bf16=self.bf16,
                    gradient_checkpointing=gradient_checkpointing and optim is not None, hf_model=self.hf_model)
        self.optimizer = self.scheduler = None
        if optim is None:
            self.module.eval()
            for p in self.module.parameters():
                p.requires_grad_(False)
        else:
            self.module.train()
            self.optimizer = build_optimizer(self.module, optim.learning_rate, optim.l2)
            self.scheduler = build_scheduler(self.optimizer, optim.total_steps, optim.lr_warmup_ratio)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "ShardedModel":
        self.module.train(mode)
        return self

    def eval(self) -> "ShardedModel":
        return self.train(False)

    # -- training ----------------------------------------------------------------------------------
    def plan(self, indices: Sequence[int], lengths: Sequence[int]) -> list[list[int]]:
        """This rank's micro-batches of one global batch (``indices``): by sample count, or by
        token budget with packing (never below the longest sample)."""
        o = self.optim_spec
        if o.packing_samples:
            budget = max(o.token_budget, max(lengths[i] for i in indices))
            return split_global_batch(indices, lengths, self.env.world_size, token_budget=budget)[self.env.rank]
        return split_global_batch(indices, lengths, self.env.world_size,
                                  micro_batch_size=o.micro_batch_size)[self.env.rank]

    def step(self, plan: Sequence[Sequence[int]], micro_loss: MicroLoss):
        """One optimizer step over ``plan`` (``training.step.train_step``):
        ``(summed stats, grad norm, processed tokens)``."""
        return train_step(self.module, plan, micro_loss, self.optimizer, self.scheduler, self.optim_spec.max_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- saving ------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full plain-HF state dict on rank 0 (None elsewhere); LoRA adapters merged into
        their weights. Collective."""
        sd = full_state_dict(self.hf_model)
        if self.env.rank != 0:
            return None
        return merge_lora(self.hf_model, sd, self.lora_config) if self.lora_config is not None else sd

    def save_pretrained(self, path: str, tokenizer, adapter: bool = False) -> None:
        """A plain HF folder (collective; rank 0 writes); with LoRA the merged weights, and with
        ``adapter`` the adapter alone in ``path/adapter`` (peft format) too."""
        sd = full_state_dict(self.hf_model)
        adapter_tmp = Path(f"{path}.adapter.tmp")
        if self.lora_config is not None and self.env.rank == 0:
            if adapter:
                shutil.rmtree(adapter_tmp, ignore_errors=True)
                save_adapter(self.hf_model, sd, self.lora_config, adapter_tmp)
            sd = merge_lora(self.hf_model, sd, self.lora_config)
        save_hf_pretrained(self.hf_model, path, tokenizer, state_dict=sd)
        if adapter and self.lora_config is not None and self.env.rank == 0:
            adapter_tmp.rename(Path(path) / "adapter")

    def save_state(self, folder) -> None:
        """Sharded model + optimizer, schedule and RNG into ``folder`` (collective)."""
        save_model_state(folder, self.module, self.optimizer, self.scheduler)

    def load_state(self, folder) -> None:
        load_model_state(folder, self.module, self.optimizer, self.scheduler)
