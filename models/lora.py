"""LoRA adapters through ``peft``, in a form FSDP2 and our heads can use unchanged.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a linear
layer's weight W (out x in) and learns a low-rank update: ``h = W x + (alpha / r) * B A x``
with A (r x in) drawn at random and B (out x r) zero at the start, so training begins at the
pretrained model. Only A and B (and a value model's score head) get gradients and optimizer
states: with rank 8 on every linear layer of SmolLM2-135M that is 1.8% of the parameters.

* ``add_lora(hf_model, spec)``: inject the adapters **in place** (peft's ``get_peft_model``
  mutates the model it is given), so an ``Actor`` / ``RewardModel`` wrapping ``hf_model`` keeps
  calling the same modules, and ``shard_model`` later wraps the same decoder layers.
* ``merge_lora(hf_model, state_dict, config)``: a full state dict of the adapted model (as
  ``models.fsdp.full_state_dict`` gathers it: ``q_proj.base_layer.weight``, ``q_proj.lora_A...``)
  -> the plain HF state dict with ``W + (alpha / r) B A`` in place of each adapted weight. peft does
  the merge on a meta-device twin that takes the gathered tensors, so nothing is copied and the
  result is what ``save_pretrained`` and the vLLM weight sync expect.
* ``save_adapter``: the adapter alone in peft's format (``PeftModel.from_pretrained`` loads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# value-model heads and the LM head stay out of "all-linear": a rank-r update of a 1-output score
# head makes no sense, and the head must train in full (below)
HEAD_MODULES = ("lm_head", "score", "classifier")


@dataclass(frozen=True)
class LoraSpec:
    """``--lora_rank`` (r), ``--lora_alpha``, ``--lora_dropout``, ``--target_modules``
    (module names, or ``all-linear``: every linear layer of the decoder)."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)

    def peft_config(self):
        from peft import LoraConfig

        targets = list(self.target_modules)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                          target_modules="all-linear" if targets == ["all-linear"] else targets,
                          exclude_modules=list(HEAD_MODULES))


def lora_spec(cfg) -> LoraSpec | None:
    """The spec of a config with the ``training.config.LoraArgs`` flags; None for full fine-tuning."""
    if not getattr(cfg, "lora_rank", 0):
        return None
    return LoraSpec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.target_modules))


def unknown_target_modules(path: str, targets) -> tuple[list[str], list[str]]:
    """``(names in targets that match no linear layer, the linear layers' names)`` of the model at
    ``path``, built from its config on the meta device (no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - set(HEAD_MODULES))
    return [t for t in targets if t != "all-linear" and t not in linear], linear


def add_lora(hf_model: nn.Module, spec: LoraSpec):
    """Inject LoRA adapters into ``hf_model`` in place and freeze everything else except a
    value model's score head (a fresh head must learn in full). Returns the peft ``LoraConfig``.
    Raises ``ValueError`` when ``--target_modules`` names no module of the model."""
    from peft import get_peft_model

    config = spec.peft_config()
    try:
        get_peft_model(hf_model, config)  # the returned wrapper is not needed: hf_model changed in place
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"--target_modules {','.join(spec.target_modules)}: {e}") from None
    for name, module in hf_model.named_modules():
        if name.split(".")[-1] in HEAD_MODULES[1:]:
            for p in module.parameters():
                p.requires_grad_(True)
    return config


def _peft_twin(hf_model: nn.Module, state_dict: dict[str, torch.Tensor], config):
    """A PeftModel of ``hf_model``'s class on the meta device holding ``state_dict``'s tensors."""
    from peft import get_peft_model

    from models.fsdp import unwrap_class

    with torch.device("meta"):
        twin = unwrap_class(hf_model)(hf_model.config)
    peft_twin = get_peft_model(twin, config)
    peft_twin.base_model.model.load_state_dict(state_dict, assign=True, strict=False)
    missing = [k for k, v in peft_twin.base_model.model.state_dict().items() if v.is_meta]
    if missing:
        raise RuntimeError(f"state dict lacks {len(missing)} tensors of the adapted model, e.g. {missing[:3]}")
    return peft_twin


def merge_lora(hf_model: nn.Module, state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The plain HF state dict of the adapted model whose full state dict is ``state_dict``
    (rank 0's gathered copy; left unchanged). Each adapted weight becomes
    ``W + (alpha / r) * B @ A`` (peft's ``merge_and_unload``); the adapter tensors disappear."""
    # peft merges in place (W += scale * B A), and on one process (or CPU FSDP with one rank) the
    # gathered tensors are the live parameters themselves: merging those would add B A into the
    # trainer's frozen W at every sync. So the weights that get merged are copied first.
    own = {k: v.clone() if ".base_layer." in k else v for k, v in state_dict.items()}
    merged = _peft_twin(hf_model, own, config).merge_and_unload()
    return {k: v for k, v in merged.state_dict().items()}


def save_adapter(hf_model: nn.Module, state_dict: dict[str, torch.Tensor], config, path: str | Path) -> None:
    """The adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``) from rank 0's
    gathered full state dict, before it is merged."""
    _peft_twin(hf_model, state_dict, config).save_pretrained(str(path))


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters (call before sharding: after it they count shards)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
