"""FSDP2 (``fully_shard``) for any HF decoder model, and its state-dict I/O.

* ``shard_model``: one FSDP unit per decoder layer (HF's ``_no_split_modules``) plus the root;
  ``zero_stage`` 3 reshards parameters after forward (ZeRO-3), 2 keeps them gathered until
  backward (ZeRO-2: sharded grads and optimizer state, fewer all-gathers); ``bf16=True`` is bf16
  compute with fp32 master weights, optimizer states and gradient reduction, on CUDA and on CPU.
* ``full_state_dict`` / ``save_hf_pretrained``: gather the full weights on rank 0 and write a plain
  HF folder (``from_pretrained`` loads it with no trace of FSDP).
* ``save_sharded`` / ``load_sharded``: every rank writes/reads its own shards of model and
  optimizer with ``torch.distributed.checkpoint``, for exact resume at any world size.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX). Without them
    (AVX2-only CPUs such as our 2-core development machines) oneDNN has no bf16 matmul and torch
    falls back to slow generic kernels: benchmarks/bf16_cpu.py measured every bf16 stage there
    several times slower than fp32 (benchmarks/results/bf16_cpu.json)."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes: assume not
        return False


_warned_slow_bf16 = False


def mixed_precision_policy(bf16: bool, device: torch.device) -> MixedPrecisionPolicy | None:
    """``bf16``: FSDP2 casts the (sharded, fp32) master weights to bf16 for forward and backward,
    and reduces gradients in fp32 into fp32 sharded gradients, so the optimizer (and its states)
    stays fp32. The same on CUDA and CPU (gloo all-gathers the bf16 parameters). None: plain fp32.

    On CPU bf16 is a choice, never the default: a CPU without native bf16 (see
    ``cpu_has_native_bf16``) runs it several times slower than fp32, which is warned about once."""
    global _warned_slow_bf16
    if not bf16:
        return None
    if device.type == "cpu" and not cpu_has_native_bf16() and not _warned_slow_bf16:
        _warned_slow_bf16 = True
        warnings.warn("--bf16 on a CPU without AVX512-BF16/AMX: bf16 matmuls run in slow generic kernels "
                      "here, several times slower than fp32 (see benchmarks/bf16_cpu.py); drop --bf16 for speed",
                      stacklevel=2)
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes HF marks as not-to-split (the decoder layers): one FSDP unit each."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(
            f"{type(model).__name__} declares no decoder layer classes (_no_split_modules); "
            "cannot build per-layer FSDP units"
        )
    return tuple(classes)


def shard_model(
    model: nn.Module,
    *,
    zero_stage: int = 3,
    device: torch.device | None = None,
    bf16: bool = False,
    gradient_checkpointing: bool = False,
    hf_model: nn.Module | None = None,
) -> nn.Module:
    """Shard ``model`` in place across the default process group and return it.

    ``model`` may be an HF model or one of our heads wrapping one (``hf_model``, used to turn on
    HF's non-reentrant activation checkpointing, which composes with FSDP2).
    """
    if zero_stage not in (2, 3):  # FSDP2 always shards grads and optimizer states: no ZeRO-1 to offer
        raise ValueError(f"--zero_stage must be 2 or 3, got {zero_stage}")
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed; call models.distributed.init_distributed() first")
    device = device or torch.device("cpu")
    hf_model = hf_model if hf_model is not None else model
    if gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf_model.config.use_cache = False
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": zero_stage == 3}
    mp = mixed_precision_policy(bf16, device)
    if mp is not None:
        kwargs["mp_policy"] = mp
    layer_classes = decoder_layer_classes(model)
    # No model.to(device) first: that put the whole unsharded model on every GPU. fully_shard moves
    # each unit's parameters to the mesh's device as it shards them, one decoder layer at a time.
    for module in list(model.modules()):
        if isinstance(module, layer_classes):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap_class(model: nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass named ``FSDP<Class>``)."""
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on rank 0; an empty dict on other ranks. Collective:
    every rank must call it. Works on a plain (unsharded) module as well."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def save_hf_pretrained(
    hf_model: nn.Module,
    save_dir: str | os.PathLike,
    tokenizer=None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``hf_model`` (sharded or not) as a plain HF folder. Collective; rank 0 writes.

    The full weights are loaded into a meta-device twin of the model's own class, so HF's
    ``save_pretrained`` (safetensors shards, tied weights, config, generation config) does the
    writing exactly as for a model that never saw FSDP.
    """
    if state_dict is None:
        state_dict = full_state_dict(hf_model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with torch.device("meta"):
            twin = unwrap_class(hf_model)(hf_model.config)
        twin.load_state_dict(state_dict, assign=True, strict=False)
        missing = [k for k, v in twin.state_dict().items() if v.is_meta]
        if missing:
            raise RuntimeError(f"state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
        save_dir = Path(save_dir)
        tmp = save_dir.with_name(save_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        twin.save_pretrained(tmp, safe_serialization=True)
        if getattr(hf_model, "generation_config", None) is not None and hf_model.can_generate():
            hf_model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(save_dir, ignore_errors=True)
        tmp.rename(save_dir)  # a reader never sees a half-written folder
    if dist.is_initialized():
        dist.barrier()


def _training_state(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> dict:
    state = {"model": get_model_state_dict(model)}
    for i, opt in enumerate(optimizers):
        state[f"optim{i}"] = get_optimizer_state_dict(model, opt)
    return state


def save_sharded(
    path: str | os.PathLike, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()
) -> None:
    """Each rank writes its shards of model (+ optimizer) state. Collective. Written to
    ``path.tmp`` and renamed when complete, so a crash mid-save leaves the previous checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save(_training_state(model, optimizers), checkpoint_id=str(tmp))
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    if dist.is_initialized():
        dist.barrier()


def load_sharded(
    path: str | os.PathLike, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()
) -> None:
    """Load what ``save_sharded`` wrote into an identically sharded model (+ optimizers)."""
    optimizers = list(optimizers)
    if not Path(path, ".metadata").exists():
        raise FileNotFoundError(f"{path} is not a sharded checkpoint (no .metadata file)")
    state = _training_state(model, optimizers)
    dcp.load(state, checkpoint_id=str(path), storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    set_model_state_dict(model, state["model"])
    for i, opt in enumerate(optimizers):
        set_optimizer_state_dict(model, opt, state[f"optim{i}"])


# --- Reading a sharded checkpoint without running its code ------------------------------------
# torch.distributed.checkpoint unpickles the folder's ``.metadata`` (plain ``pickle.load``) and
# its non-tensor entries (torch.load with weights_only off). A checkpoint folder may have been
# copied from anywhere, so both reads go through the restricted paths below.

_METADATA_MODULES = {"torch.distributed.checkpoint.metadata"}
_METADATA_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                   ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                   ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                   ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes a DCP ``.metadata`` file holds (checkpoint metadata dataclasses, torch
    sizes, dtypes and layouts, paths); anything else is refused before it is built."""

    def find_class(self, module: str, name: str):
        allowed = ((module in _METADATA_MODULES and not name.startswith("__")) or (module, name) in _METADATA_NAMES
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's .metadata; refusing to load it")
        return super().find_class(module, name)


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        """Non-tensor entries (optimizer hyper-parameters) with ``weights_only=True``."""
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
