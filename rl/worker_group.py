"""Ray worker groups: N Ray actors that together hold one model as one ``torch.distributed`` world
(FSDP ranks), placed by placement groups, driven by one controller (the single-controller design
of verl / OpenRLHF: the driver calls a method on every rank and gathers the results).

    pool = DevicePool.create("actor", num_nodes=1, devices_per_node=4)   # 4 bundles (GPUs or CPU slots)
    actor = WorkerGroup(PolicyWorker, pool, name="actor", share=0.5, init_kwargs={...})
    ref = WorkerGroup(ReferenceWorker, pool, name="ref", share=0.5, ...)   # --colocate_actor_ref
    logprobs = actor.call(PolicyWorker.logprobs, batch_ref)                # one result per rank

A bundle is one GPU (+ CPUs) on a GPU cluster, or one logical CPU slot here. Colocated groups
share a pool: each of their workers asks for ``share`` of its bundle, so rank i of both groups lands
on the same GPU (their memory must fit together; that is what ``--colocate_*`` trades for devices).
Rank 0 of a group picks the rendezvous address; every rank then joins the group's own process
group (NCCL on GPUs, gloo on CPUs: ``models.distributed.init_distributed``).

Calls name the worker's method itself (``PolicyWorker.train``), not a string: the driver's code
leads to the worker's with go-to-definition, and a method the group's class lacks fails at once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from serving.ports import free_port


def _ray():
    import ray

    return ray


@dataclass
class DevicePool:
    """A placement group of ``num_nodes * devices_per_node`` bundles, one per rank."""

    name: str
    placement_group: Any
    num_bundles: int
    use_gpu: bool

    @classmethod
    def create(cls, name: str, num_nodes: int, devices_per_node: int, use_gpu: bool,
               cpus_per_bundle: float = 1.0, timeout_s: float = 120.0, strategy: str = "PACK") -> "DevicePool":
        ray = _ray()
        from ray.util.placement_group import placement_group

        if num_nodes < 1 or devices_per_node < 1:
            raise ValueError(f"{name}: num_nodes and devices per node must be >= 1, got {num_nodes}, {devices_per_node}")
        n = num_nodes * devices_per_node
        bundle = {"CPU": cpus_per_bundle, **({"GPU": 1} if use_gpu else {})}
        # PACK fills a node before the next one, so the ranks of a multi-node group sit node by node
        # (STRICT_PACK: all on one node, as a tensor-parallel vLLM engine needs)
        pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy, name=f"{name}_pool")
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            have = ray.available_resources()
            raise RuntimeError(
                f"placement group '{name}' ({n} x {bundle}) is still pending after {timeout_s:.0f} s; the cluster "
                f"has {have.get('GPU', 0):g} GPU / {have.get('CPU', 0):g} CPU free: ask for fewer "
                f"--{name}_num_gpus_per_node, colocate groups, or add nodes"
            )
        return cls(name, pg, n, use_gpu)

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.placement_group)


class DistributedWorker:
    """Base of every worker class: joins its group's process group, reports memory.

    ``rss_baseline_mb`` is taken when the worker object is built (Python, torch and the libraries
    are imported; no model yet), so ``peak - baseline`` is the memory the models brought.
    """

    def __init__(self) -> None:
        self.rss_baseline_mb = _peak_rss_mb()

    # -- rendezvous ------------------------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """(host, free port) of this worker: rank 0's answer is the group's MASTER_ADDR/PORT."""
        ray = _ray()
        host = ray.util.get_node_ip_address()
        return host, free_port("")  # a port free on every interface: the other ranks connect to host

    def join(self, rank: int, world_size: int, master_addr: str, master_port: int) -> int:
        """Set torchrun's variables and initialise the process group (collective over the group).
        Ray shows each worker only its own GPU(s), so the local device is always index 0."""
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        from models.distributed import init_distributed

        self.env = init_distributed()
        return self.env.rank

    def memory_stats(self) -> dict[str, float]:
        """Peak resident memory of this process and the part the models brought (MB); on CUDA
        also the peak allocated GPU memory."""
        import torch

        peak = _peak_rss_mb()
        out = {"rss_peak_mb": peak, "rss_model_mb": peak - self.rss_baseline_mb}
        if torch.cuda.is_available():
            out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out

    def ping(self) -> bool:
        return True

    def execute(self, method: str, *args, **kwargs) -> tuple[Any, float]:
        """``(self.method(*args, **kwargs), seconds it took)``: how the driver times each stage
        inside the worker, whatever else runs concurrently. Reached through ``submit_timed``."""
        t0 = time.perf_counter()
        result = getattr(self, method)(*args, **kwargs)
        return result, time.perf_counter() - t0


def submit_timed(worker, method: Callable, *args, **kwargs):
    """Start ``method`` (a ``DistributedWorker`` subclass's method, e.g. ``RolloutWorker.generate``)
    on one Ray actor; the ObjectRef resolves to ``(result, seconds)``."""
    return worker.execute.remote(method.__name__, *args, **kwargs)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


class WorkerGroup:
    """``len(pool)`` Ray actors of ``worker_cls`` (a ``DistributedWorker``), rank i on bundle i."""

    def __init__(self, worker_cls: type, pool: DevicePool, *, name: str, share: float = 1.0,
                 init_kwargs: dict | None = None, env_vars: dict[str, str] | None = None,
                 startup_timeout_s: float = 900.0):
        ray = _ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name, self.pool, self.worker_cls = name, pool, worker_cls
        remote_cls = ray.remote(worker_cls)
        self.workers = []
        for rank in range(pool.num_bundles):
            strategy = PlacementGroupSchedulingStrategy(pool.placement_group, placement_group_bundle_index=rank)
            opts: dict[str, Any] = {"num_cpus": share, "scheduling_strategy": strategy, "name": None,
                                    "max_concurrency": 2}  # 2: memory_stats may be asked while a call runs
            if pool.use_gpu:
                opts["num_gpus"] = share
            if env_vars:
                opts["runtime_env"] = {"env_vars": dict(env_vars)}
            self.workers.append(remote_cls.options(**opts).remote(**(init_kwargs or {})))
        self.startup_timeout_s, self._joined = startup_timeout_s, False

    def ready(self) -> "WorkerGroup":
        """Wait for the actors' processes, then form the group's process group (once). The
        constructor only launches the processes: groups built one after another start together
        (``rl.cluster.build_workers``), and the first call waits here."""
        if not self._joined:
            ray = _ray()
            ray.get([w.ping.remote() for w in self.workers], timeout=self.startup_timeout_s)
            addr, port = ray.get(self.workers[0].rendezvous_address.remote())
            world = len(self.workers)
            ray.get([w.join.remote(r, world, addr, port) for r, w in enumerate(self.workers)],
                    timeout=self.startup_timeout_s)
            self._joined = True
        return self

    def __len__(self) -> int:
        return len(self.workers)

    def submit(self, method: Callable, *args, **kwargs) -> list:
        """Start ``method(*args, **kwargs)`` (a method of the group's worker class, e.g.
        ``PolicyWorker.logprobs``) on every rank; returns the ObjectRefs (rank order) of
        ``(result, seconds)``: pass them to ``collect``. Pass large inputs as one ``ray.put`` ref:
        every rank then reads the same object."""
        if getattr(self.worker_cls, getattr(method, "__name__", ""), None) is not method:
            raise TypeError(f"{self.name}: {method!r} is not a method of {self.worker_cls.__name__}")
        self.ready()
        return [submit_timed(w, method, *args, **kwargs) for w in self.workers]

    @staticmethod
    def collect(refs: list, timeout: float | None = None) -> tuple[list, float]:
        """``(results in rank order, seconds of the slowest rank)`` of a ``submit``."""
        done = _ray().get(refs, timeout=timeout)
        return [r for r, _ in done], max((s for _, s in done), default=0.0)

    def call(self, method: Callable, *args, **kwargs) -> list:
        """``method`` on every rank, blocking; the results in rank order."""
        return self.collect(self.submit(method, *args, **kwargs))[0]

    def kill(self) -> None:
        ray = _ray()
        for w in self.workers:
            ray.kill(w)
        self.workers = []


def merge_rank_results(parts: Sequence[dict[int, Any]], n: int, what: str) -> list:
    """Per-rank ``{sample index: value}`` maps -> a list in sample order; every index exactly once."""
    out: list[Any] = [None] * n
    seen = 0
    for part in parts:
        for i, v in part.items():
            if out[i] is not None:
                raise RuntimeError(f"{what}: sample {i} returned by two ranks")
            out[i] = v
            seen += 1
    if seen != n:
        raise RuntimeError(f"{what}: {n - seen} of {n} samples were not returned by any rank")
    return out
