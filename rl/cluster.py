"""Starting Ray and placing the PPO / ReMax workers on it (``--*_num_nodes``, ``--*_num_gpus_per_node``,
``--colocate_*``, ``--vllm_num_engines``). On a machine without GPUs every "GPU" is a CPU slot:
the same placement code runs, bundles ask for CPUs only, the process groups use gloo.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

from models.lora import LoraSpec, lora_spec
from rl.config import RLConfig, placement_counts
from rl.worker_group import DevicePool, WorkerGroup
from rl.workers import (
    CriticWorker, ModelSpec, OptimSpec, PolicyWorker, RewardWorker, RolloutWorker, worker_env_vars,
)


@dataclass
class RLWorkers:
    actor: WorkerGroup
    ref: WorkerGroup
    critic: WorkerGroup | None
    rewards: list[WorkerGroup]
    engines: list  # Ray actor handles of RolloutWorker
    pools: list[DevicePool] = field(default_factory=list)

    def model_groups(self) -> dict[str, WorkerGroup]:
        groups = {"actor": self.actor, "ref": self.ref}
        if self.critic is not None:
            groups["critic"] = self.critic
        groups |= {g.name: g for g in self.rewards}
        return groups

    def shutdown(self) -> None:
        import ray

        for e in self.engines:
            try:
                ray.get(e.shutdown.remote(), timeout=60)
            except Exception:  # noqa: BLE001 -- a dead engine must not stop the rest of the teardown
                pass
            ray.kill(e)
        for g in self.model_groups().values():
            g.kill()
        for p in self.pools:
            p.remove()


def reward_group_name(i: int, n: int) -> str:
    return "reward" if n == 1 else f"reward{i}"


def local_cpu_slots(cfg: RLConfig) -> int:
    """Logical CPUs a local Ray needs to place every bundle (they are scheduling slots, not cores):
    one per device the placement asks for (``rl.config.placement_counts``: an engine of one device
    asks for one CPU, a tensor-parallel one for a bundle per device), one for the driver's tasks."""
    counts = placement_counts(cfg, devices=True)  # "vllm": engines x tensor-parallel size (a bundle each)
    return sum(counts.values()) + 1


def start_ray(cfg: RLConfig, log=print) -> bool:
    """Join ``--ray_address`` / ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a private
    local Ray sized for the workers. Returns True when this process started Ray (and must stop it)."""
    import ray

    env = {"env_vars": worker_env_vars()}
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env, logging_level="ERROR")
        log(f"[ray] joined the cluster at {address}: {ray.cluster_resources()}")
        return False
    slots = local_cpu_slots(cfg)
    with _loopback_only():
        ctx = ray.init(address="local", num_cpus=slots, include_dashboard=cfg.ray_dashboard, dashboard_host=LOOPBACK,
                       _node_ip_address=LOOPBACK, logging_level="ERROR", runtime_env=env)
    dashboard = f"; dashboard at http://{ctx.dashboard_url}" if cfg.ray_dashboard and ctx.dashboard_url else ""
    log(f"[ray] started a local Ray with {slots} CPU slots on {LOOPBACK}{dashboard}")
    return True


LOOPBACK = "127.0.0.1"


@contextmanager
def _loopback_only():
    """While a local Ray starts: let its node IP be 127.0.0.1. Ray binds its gRPC servers and
    agents to the node IP, but ``ray.init`` turns a loopback ``_node_ip_address`` into this
    machine's external address unless multi-node clusters are off
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by this process at import and by the processes
    Ray starts). Nothing can then join this Ray from another machine, which a local Ray never needs."""
    import ray._private.ray_constants as ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def stop_ray(started_here: bool) -> None:
    """Disconnect; a local Ray started here is stopped with its processes (``ray.shutdown`` kills
    the head it launched; ``ray stop`` is not used: it would kill every Ray on the machine)."""
    import ray

    ray.shutdown()


def start_engines(cfg: RLConfig, use_gpu: bool, env: dict[str, str], worker_cls=RolloutWorker) -> tuple[list, list[DevicePool]]:
    """One Ray actor per rollout engine (``worker_cls(backend, model_dir, **engine kwargs)``), and
    the placement groups made for them.

    An engine on one GPU asks Ray for it (Ray then sets its ``CUDA_VISIBLE_DEVICES``). A
    tensor-parallel engine (``--vllm_tensor_parallel_size`` > 1, GPUs) gets a placement group of
    ``tp`` GPU bundles on one node: its actor sits in the first bundle asking for no GPU itself,
    the group is captured for its children, and vLLM's Ray executor puts its ``tp`` workers on the
    bundles (``VLLM_RAY_BUNDLE_INDICES``, one GPU each). Ray may blank ``CUDA_VISIBLE_DEVICES`` of an
    actor that asked for no GPU (before ray-project/ray#54868, or with
    ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1``), and an engine that sees no GPU takes the CPU settings
    (fp32, eager, no tensor parallelism), so Ray is told to leave it alone
    (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``) and the engine that it runs on CUDA
    (``cuda=True``): OpenRLHF's ``_configure_device_env`` does the same."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    kwargs = dict(prompt_max_len=cfg.prompt_max_len, generate_max_len=cfg.generate_max_len, seed=cfg.seed,
                  torch_threads=cfg.worker_threads)
    tp = cfg.vllm_tensor_parallel_size if cfg.rollout_backend == "vllm" else 1
    if cfg.rollout_backend == "vllm":
        kwargs |= dict(tensor_parallel_size=tp, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                       cpu_kvcache_space_gb=cfg.vllm_cpu_kvcache_space_gb)
    remote = ray.remote(worker_cls)
    engines, pools = [], []
    for i in range(cfg.vllm_num_engines):
        if use_gpu and tp > 1:
            pool = DevicePool.create(f"vllm{i}", 1, tp, use_gpu=True, strategy="STRICT_PACK")
            pools.append(pool)
            options = dict(num_cpus=0, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pool.placement_group, placement_group_bundle_index=0,
                placement_group_capture_child_tasks=True))
            actor_env = {**env, "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
                         "VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, range(tp))), "VLLM_RAY_PER_WORKER_GPUS": "1"}
            engine_kwargs = kwargs | dict(cuda=True, distributed_executor_backend="ray")
        else:
            options = dict(num_cpus=1, num_gpus=1 if use_gpu else 0)
            actor_env, engine_kwargs = env, kwargs
        engines.append(remote.options(runtime_env={"env_vars": actor_env}, **options).remote(
            cfg.rollout_backend, cfg.pretrain, **engine_kwargs))
    return engines, pools


def build_workers(cfg: RLConfig, actor_steps: int, critic_steps: int, log=print) -> RLWorkers:
    """Placement groups, then every worker group and engine, started together; returns once every
    model is loaded and sharded and every engine is up."""
    import ray

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    threads = cfg.worker_threads
    env = worker_env_vars()
    pools: list[DevicePool] = []

    def pool(name: str, nodes: int, per_node: int) -> DevicePool:
        p = DevicePool.create(name, nodes, per_node, use_gpu)
        pools.append(p)
        return p

    def spec(path: str, budget_micro: int, lora: LoraSpec | None = None) -> ModelSpec:
        return ModelSpec(path=path, zero_stage=cfg.zero_stage, bf16=cfg.bf16, flash_attn=cfg.flash_attn,
                         gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed, torch_threads=threads,
                         forward_token_budget=cfg.token_budget(budget_micro), lora=lora)

    def optim(lr: float, steps: int, micro: int) -> OptimSpec:
        return OptimSpec(learning_rate=lr, total_steps=steps, l2=cfg.l2, lr_warmup_ratio=cfg.lr_warmup_ratio,
                         max_norm=cfg.max_norm, micro_batch_size=micro, packing_samples=cfg.packing_samples,
                         token_budget=cfg.token_budget(micro))

    def group(cls, p: DevicePool, name: str, share: float, **init) -> WorkerGroup:
        # launched only: every group's processes start (import, load) at once; see the end
        return WorkerGroup(cls, p, name=name, share=share, init_kwargs=init, env_vars=env)

    micro = cfg.micro_rollout_batch_size
    actor_pool = pool("actor", cfg.actor_num_nodes, cfg.actor_num_gpus_per_node)
    half = 0.5 if cfg.colocate_actor_ref else 1.0
    actor = group(PolicyWorker, actor_pool, "actor", half, spec=spec(cfg.pretrain, micro, lora_spec(cfg)),
                  optim=optim(cfg.actor_learning_rate, actor_steps, cfg.actor_train_batch_size))
    ref_pool = actor_pool if cfg.colocate_actor_ref else pool("ref", cfg.ref_num_nodes, cfg.ref_num_gpus_per_node)
    ref = group(PolicyWorker, ref_pool, "ref", half, spec=spec(cfg.pretrain, micro), optim=None)

    rm_paths = cfg.reward_paths()
    critic = None
    if cfg.uses_critic:
        critic_pool = pool("critic", cfg.critic_num_nodes, cfg.critic_num_gpus_per_node)
        colocated = cfg.colocate_critic_reward
        critic = group(CriticWorker, critic_pool, "critic", 1.0 / (1 + len(rm_paths)) if colocated else 1.0,
                       spec=spec(cfg.critic_pretrain or rm_paths[0], micro),
                       optim=optim(cfg.critic_learning_rate, critic_steps, cfg.critic_train_batch_size))
        reward_pool = critic_pool if colocated else None
    else:
        reward_pool = None
    if reward_pool is None:
        reward_pool = pool("reward", cfg.reward_num_nodes, cfg.reward_num_gpus_per_node)
    share = 1.0 / (len(rm_paths) + (1 if critic is not None and reward_pool is critic.pool else 0))
    rewards = [group(RewardWorker, reward_pool, reward_group_name(i, len(rm_paths)), share, spec=spec(p, micro))
               for i, p in enumerate(rm_paths)]

    engines, engine_pools = start_engines(cfg, use_gpu, env)
    pools += engine_pools
    # The groups and engines start concurrently; one after another they took the sum of their
    # start-ups (~10 s of imports each on a 2-core CPU machine, model loading on GPU clusters).
    workers = RLWorkers(actor, ref, critic, rewards, engines, pools)
    groups = workers.model_groups()
    setups = {name: g.submit(g.worker_cls.setup) for name, g in groups.items()}
    for name, g in groups.items():
        info = WorkerGroup.collect(setups[name])[0][0]
        lora = (f" ({info['trainable_parameters'] / 1e6:.2f}M trainable: LoRA r={cfg.lora_rank})"
                if name == "actor" and cfg.lora_rank else "")
        log(f"[workers] {name}: {len(g)} rank(s), {info['parameters'] / 1e6:.1f}M parameters{lora}")
    stats = ray.get([e.get_stats.remote() for e in engines], timeout=1800)
    log(f"[workers] {len(engines)} {cfg.rollout_backend} engine(s), started in "
        f"{max(s.get('start_seconds', 0.0) for s in stats):.1f} s")
    return workers
