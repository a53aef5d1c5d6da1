"""Weight sync by collective broadcast (``--weight_sync broadcast``): the actor's rank 0 sends
every tensor of its full state dict straight to every rollout engine worker.

The members form one process group of their own, outside both the trainer's FSDP world and
vLLM's tensor-parallel world: rank 0 is the actor's rank 0, ranks ``1 + e * tp + w`` are worker
``w`` of engine ``e``. NCCL where CUDA is (tensors go GPU to GPU, never through host memory: the
way OpenRLHF and verl sync a 7B policy), gloo without it (what the CPU tests run; the code path is
the same). The group is built from a ``TCPStore`` and the backend's ``ProcessGroup`` class
directly, not ``init_process_group``, because each member already belongs to another default
world. Before each sync rank 0 publishes the tensor list (names, shapes, dtypes) in the store, so
receivers allocate exactly what arrives.

Used by ``rl.workers.PolicyWorker`` (sender) and by ``WeightReceiverExtension``, which vLLM mixes
into its workers (``LLM(worker_extension_cls=...)``; ``rl.rollout.VLLMEngine`` always sets it).
"""

from __future__ import annotations

import datetime
import pickle
import socket
from typing import Mapping

import torch

TIMEOUT = datetime.timedelta(minutes=30)  # a sync waits for the slowest member (a 70B gather)


def node_ip() -> str:
    """An address of this node the other members can reach (Ray's view when in Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())


class BroadcastGroup:
    """One member of the weight group. Rank 0 calls ``open`` (it hosts the store) and every rank
    then ``join``s at the same time (joining waits for all members)."""

    def __init__(self):
        self.store = None
        self.pg = None
        self.device = torch.device("cpu")
        self.version = 0

    def open(self, world_size: int) -> tuple[str, int]:
        """Rank 0: start the store on a free port; returns ``(host, port)`` for the others."""
        import torch.distributed as dist

        self.store = dist.TCPStore("0.0.0.0", 0, world_size, True, timeout=TIMEOUT, wait_for_workers=False)
        return node_ip(), self.store.port

    def join(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        import torch.distributed as dist

        if rank != 0:
            self.store = dist.TCPStore(host, port, world_size, False, timeout=TIMEOUT)
        if backend == "nccl":
            if not hasattr(dist, "ProcessGroupNCCL"):
                raise RuntimeError("--weight_sync broadcast with NCCL needs a CUDA build of torch")
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.pg = dist.ProcessGroupNCCL(dist.PrefixStore("weights", self.store), rank, world_size)
        elif backend == "gloo":
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore("weights", self.store), rank, world_size, TIMEOUT)
        else:
            raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")

    def send(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Rank 0: publish the tensor list, then broadcast each tensor (in name order)."""
        self.version += 1
        names = sorted(state_dict)
        specs = [(k, tuple(state_dict[k].shape), str(state_dict[k].dtype).removeprefix("torch.")) for k in names]
        self.store.set(f"specs/{self.version}", pickle.dumps(specs))
        for k in names:
            t = state_dict[k].detach().to(self.device).contiguous()
            self.pg.broadcast(t, 0).wait()

    def receive(self) -> list[tuple[str, torch.Tensor]]:
        """Other ranks: the next state dict rank 0 sends, as ``(name, tensor)`` on this device."""
        self.version += 1
        specs = pickle.loads(self.store.get(f"specs/{self.version}"))  # blocks until rank 0 publishes
        out = []
        for name, shape, dtype in specs:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self.pg.broadcast(t, 0).wait()
            out.append((name, t))
        return out

    def close(self) -> None:
        self.pg, self.store = None, None


class WeightReceiverExtension:
    """Methods vLLM adds to each of its workers (``worker_extension_cls``); called through
    ``LLM.collective_rpc``. ``self`` is the vLLM worker (``self.rank``: its tensor-parallel rank)."""

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str) -> None:
        self._weight_group = BroadcastGroup()
        self._weight_group.join(host, port, rank_offset + getattr(self, "rank", 0), world_size, backend)

    def receive_weights(self, specs, tied_word_embeddings: bool) -> int:
        """Receive one full state dict, check it against the engine's checkpoint (nothing is loaded
        when it does not fit), load it. Returns the number of tensors."""
        from rl.weight_sync import check_state_dict

        items = self._weight_group.receive()
        check_state_dict(dict(items), specs, tied_word_embeddings)
        self.reload_weights(weights_iterator=items)
        return len(items)
