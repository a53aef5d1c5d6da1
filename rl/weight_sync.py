"""Moving the trainer's weights into a running rollout engine (``rl.rollout``).

What crosses: a **full HF-format state dict** (``models.fsdp.full_state_dict(actor.model)``: the
names of ``AutoModelForCausalLM.state_dict()``, gathered on rank 0, on the CPU). The engine checks
it against the checkpoint it was started from *before* touching the model (names and shapes, read
from the safetensors headers): a failed ``reload_weights`` half-way leaves vLLM's layers on the
meta device, and in the multi-process engine it kills the engine (``EngineDeadError``), so a wrong
dict must be refused while the engine is still whole.

Transports (``VLLMEngine.update_weights(..., transport=...)``):

* ``inprocess`` -- the engine core runs in the caller's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
  one worker): ``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [...]})`` hands
  the tensors over with no serialisation (20-40 ms for the tiny model on a CPU). This is the path
  on CPUs and the default wherever it is possible.
* ``disk`` -- anything else (vLLM's separate engine process, tensor parallelism): tensors cannot go
  through ``collective_rpc`` kwargs there (msgspec refuses them), so the dict is written as
  safetensors to a folder of the engine's (``/dev/shm`` when it exists: memory, not disk) and the
  workers read it with ``reload_weights(weights_path=...)``; the folder is removed right after.
  Works on every platform (checked on CPU with the engine in its own process and with tied
  embeddings); costs one write and one read of the model per sync.

How this maps to GPUs. Between processes the dict travels through the Ray object store (the
trainer's rank 0 returns it from a Ray method and the engine actor receives it): one host copy on
each side. For a 7B model in bf16 that moves 14 GB through host memory per sync (seconds), which
is why ``--weight_sync broadcast`` (``rl.weight_broadcast``: the actor's rank 0 broadcasts tensor
by tensor over NCCL to every vLLM worker, as OpenRLHF and verl do) is the default with GPUs. When
trainer and engine share a GPU, peers pass CUDA IPC handles instead (no copy at all); not done here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch

TRANSPORTS = ("auto", "inprocess", "disk")

# Keys a trainer's state dict may carry that a checkpoint (and vLLM's loader) legitimately lacks.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightSyncError(ValueError):
    """The state dict does not fit the engine's model; the engine was not touched."""


def checkpoint_tensor_specs(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes of the tensors in a local HF folder's ``*.safetensors`` files, read from
    their headers (no tensor data). ``None`` when there is no local safetensors checkpoint (a hub
    name, or ``.bin`` weights): then updates are not checked."""
    folder = Path(model_dir)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    specs: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                specs[key] = tuple(f.get_slice(key).get_shape())
    return specs


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    specs: Mapping[str, Sequence[int]] | None,
    tied_word_embeddings: bool = False,
) -> None:
    """Raise ``WeightSyncError`` unless ``state_dict`` holds exactly the checkpoint's tensors, with
    the checkpoint's shapes (dtypes may differ: the loader casts). ``lm_head.weight`` may be extra
    when the embeddings are tied (``state_dict()`` of a tied model lists it; checkpoints omit it)."""
    if not state_dict:
        raise WeightSyncError("empty state dict: nothing to load")
    bad_types = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad_types:
        raise WeightSyncError(f"state dict values must be tensors; not for {bad_types[:5]}")
    check_shapes({k: v.shape for k, v in state_dict.items()}, specs, tied_word_embeddings)


def check_shapes(
    shapes: Mapping[str, Sequence[int]],
    specs: Mapping[str, Sequence[int]] | None,
    tied_word_embeddings: bool = False,
) -> None:
    """``check_state_dict`` on names and shapes alone: what a receiver knows before any tensor
    arrives (``rl.weight_broadcast`` publishes them first), so a dict that does not fit is refused
    before the first tensor reaches the model."""
    if not shapes:
        raise WeightSyncError("empty state dict: nothing to load")
    if specs is None:
        return
    keys = set(shapes)
    unknown = {
        k for k in keys - set(specs)
        if not k.endswith(_IGNORABLE_SUFFIXES) and not (tied_word_embeddings and k == "lm_head.weight")
    }
    missing = set(specs) - keys
    if unknown or missing:
        hint = ""
        prefixes = {k.split(".", 1)[0] for k in keys}
        if len(prefixes) == 1:
            stripped = {k.split(".", 1)[1] for k in keys if "." in k}
            if set(specs) <= stripped:
                hint = (f" (every key starts with '{prefixes.pop()}.': pass the HF model's state dict, "
                        "e.g. full_state_dict(actor.model), not the wrapper's)")
        raise WeightSyncError(
            f"state dict does not match the engine's checkpoint: {len(unknown)} unknown key(s) "
            f"{sorted(unknown)[:5]}, {len(missing)} missing key(s) {sorted(missing)[:5]}{hint}; "
            "a full HF-format state dict is required (partial updates of fused layers would "
            "leave vLLM's layers half-loaded)"
        )
    # tuple(): specs that crossed into vLLM's engine-core process (collective_rpc arguments are
    # msgpack-encoded on the way, on every GPU run) arrive with lists where tuples were sent
    wrong = [(k, tuple(shapes[k]), tuple(specs[k])) for k in specs if tuple(shapes[k]) != tuple(specs[k])]
    if wrong:
        k, got, want = wrong[0]
        raise WeightSyncError(
            f"{len(wrong)} tensor(s) have the wrong shape, e.g. {k}: {got}, the checkpoint has {want}"
        )


def cpu_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors (no copy for tensors that already are)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def sync_folder() -> str:
    """A private folder for the ``disk`` transport, in memory (``/dev/shm``) when possible."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="rl_weight_sync_", dir=base)


def write_safetensors(state_dict: Mapping[str, torch.Tensor], folder: str | os.PathLike) -> Path:
    """Write ``state_dict`` as ``folder/model.safetensors`` (atomically: tmp file, then rename).
    Tensors sharing storage (tied embeddings) are cloned, which safetensors requires."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu").contiguous()
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    tmp = folder / "model.safetensors.tmp"
    save_file(out, str(tmp), metadata={"format": "pt"})
    path = folder / "model.safetensors"
    os.replace(tmp, path)
    return path
