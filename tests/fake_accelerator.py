"""A process group with no CPU path, as NCCL has none, for CPU tests of where collectives put
their tensors (a fake only for what cannot run here: a GPU).

``torch._lazy``'s TorchScript backend gives CPU-only torch a second real device type, ``lazy``,
whose tensors compute and copy back to the CPU. ``fake_accel`` is a torch.distributed backend
registered for ``lazy`` only (``dist.Backend.backend_capability['fake_accel'] == ['lazy']``, as
NCCL's is ``['cuda']``): a world of ``size`` identical ranks inside one process, whose all-reduce
of a ``lazy`` tensor is ``size`` times it, and which refuses any other tensor with NCCL's words.

    python tests/fake_accelerator.py          # runs the collectives the trainers use; exit 0 = all on the group's device
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class FakeAccelGroup(dist.ProcessGroup):
    def __init__(self, rank: int, size: int):
        super().__init__(rank, size)
        self.devices: list[str] = []

    def allreduce(self, tensors, opts=None):
        for t in tensors:
            self.devices.append(str(t.device))
            if t.device.type != "lazy":
                # NCCL's refusal of a CPU tensor, word for word (torch's dispatcher raises it there)
                raise RuntimeError(f"No backend type associated with device type {t.device.type}")
            t.mul_(self.size())
        fut = torch.futures.Future()
        fut.set_result(tensors)
        return _Done(fut)

    def getBackendName(self) -> str:
        return "fake_accel"


class _Done(dist._Work):
    def __init__(self, fut):
        super().__init__()
        self.fut = fut

    def wait(self, timeout=None) -> bool:
        return True

    def get_future(self):
        return self.fut


def init_fake_accelerator_world(size: int = 2) -> FakeAccelGroup:
    """The default process group: ``size`` ranks of ``fake_accel`` in this process."""
    import torch._lazy
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    made: list[FakeAccelGroup] = []
    dist.Backend.register_backend("fake_accel", lambda store, rank, n, timeout: made.append(FakeAccelGroup(rank, n)) or made[-1],
                                  devices=["lazy"])
    dist.init_process_group("fake_accel", store=dist.HashStore(), rank=0, world_size=size)
    return made[0]


def main() -> int:
    """The collectives of SFT, RM and DPO training with their real arguments' devices: a CPU
    scalar (tokens processed, ``training.run``), CPU sums of per-sample statistics
    (``training.step.global_means``, SFT's evaluation, DPO's evaluation)."""
    import models.distributed as md
    from training.step import global_means

    group = init_fake_accelerator_world(2)
    results = {
        "mean_of_cpu_scalar": md.all_reduce_mean(torch.tensor(3.0)).item(),
        "global_means": global_means({"loss": torch.tensor(6.0)}, 4, 2),
        "collective_device": str(md.collective_device()),
        "sum_of_cpu_float64": md.all_reduce_sum(torch.ones(4, dtype=torch.float64)).tolist(),
    }
    results["devices"] = sorted(set(group.devices))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
