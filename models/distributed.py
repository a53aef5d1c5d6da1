"""torch.distributed set-up: NCCL on CUDA, gloo on CPU, chosen from the hardware.

Works under ``torchrun`` (reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), inside
Ray workers (which set the same variables), and as a plain ``python script.py``: then a world of
one is created, so every script runs the same FSDP code path with one process or many.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from serving.ports import free_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device(local_rank: int = 0) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def is_rank0() -> bool:
    """Rank 0 of a torchrun job, or a single process; known before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> DistEnv:
    """Initialise (once) the default process group and return where this process runs."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = default_device(local_rank)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        init_method = None  # env:// (torchrun, Ray workers)
        if "MASTER_ADDR" not in os.environ:
            if world_size != 1:
                raise RuntimeError(
                    f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch with torchrun"
                )
            # a private world of one; os.environ is left alone so child processes don't inherit it
            init_method = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def collective_device(group=None) -> torch.device:
    """The device the collectives of ``group`` (default: the world) take their tensors on: the CPU
    when its backend has a CPU path (gloo), else the backend's accelerator, this process's current
    one (NCCL: the GPU ``init_distributed`` set). NCCL has no CPU path: a CPU tensor there fails
    with "No backend type associated with device type cpu", on any run with 2+ GPUs."""
    devices = dist.Backend.backend_capability.get(dist.get_backend(group), ["cpu"])
    if "cpu" in devices:
        return torch.device("cpu")
    module = getattr(torch, devices[0], None)
    current = getattr(module, "current_device", None)
    return torch.device(devices[0], current()) if callable(current) else torch.device(devices[0])


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, on ``value``'s device; the collective itself runs on the group's device
    (``collective_device``), wherever ``value`` lives (a CPU counter under NCCL)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    out = value.detach().to(collective_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(value.device)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (gloo has no AVG op, so SUM / world), as ``all_reduce_sum``."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    return all_reduce_sum(value) / dist.get_world_size()
