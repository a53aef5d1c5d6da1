"""The typed configuration of ``fsdp_ppo_ray.py`` (flags keep the seed system's / OpenRLHF's names)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from training.config import (
    CheckpointArgs, ConfigError, DistributedArgs, LoggingArgs, LoraArgs, check_count, check_data_mix, check_fields,
    check_libraries, check_lora,
)

ESTIMATORS = ("gae", "remax", "rloo", "reinforce_baseline")
POLICY_LOSSES = ("auto", "ppo", "reinforce")


@dataclass
class PlacementArgs:
    actor_num_nodes: int = field(default=1, metadata={"check": ">= 1"})
    actor_num_gpus_per_node: int = field(default=1, metadata={"help": "actor ranks per node (CPU workers without GPUs)", "check": ">= 1"})
    ref_num_nodes: int = field(default=1, metadata={"check": ">= 1"})
    ref_num_gpus_per_node: int = field(default=1, metadata={"check": ">= 1"})
    reward_num_nodes: int = field(default=1, metadata={"check": ">= 1"})
    reward_num_gpus_per_node: int = field(default=1, metadata={"check": ">= 1"})
    critic_num_nodes: int = field(default=1, metadata={"check": ">= 1"})
    critic_num_gpus_per_node: int = field(default=1, metadata={"check": ">= 1"})
    colocate_actor_ref: bool = field(default=False, metadata={"help": "reference ranks share the actor's devices"})
    colocate_critic_reward: bool = field(default=False, metadata={"help": "reward-model ranks share the critic's devices (PPO; ReMax has no critic)"})
    vllm_num_engines: int = field(default=1, metadata={"check": ">= 1"})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"check": ">= 1"})
    vllm_gpu_memory_utilization: float = field(default=0.5, metadata={"check": "(0, 1]"})
    vllm_cpu_kvcache_space_gb: int = field(default=1, metadata={"help": "KV cache of a CPU vLLM engine (GiB)", "check": ">= 1"})
    rollout_backend: str = field(default="vllm", metadata={"help": "vllm | hf (transformers generate, when vLLM is absent)", "check": ("vllm", "hf")})
    weight_sync: str = field(default="auto", metadata={"help": "actor -> engines: object_store (Ray) | broadcast (one process group: NCCL on GPUs, gloo on CPUs) | auto (broadcast with GPUs and vLLM)", "check": ("auto", "object_store", "broadcast")})
    worker_threads: int = field(default=0, metadata={"help": "torch threads per CPU worker (0: torch's default)", "check": ">= 0"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: RAY_ADDRESS, else a local Ray started and stopped here)"})
    ray_dashboard: bool = field(default=False, metadata={"help": "start the Ray dashboard of a local Ray started here (bound to 127.0.0.1; reach it through an SSH tunnel)"})


@dataclass
class RLDataArgs:
    prompt_data: list[str] = field(default_factory=list, metadata={"help": "prompt files (jsonl/json/parquet/save_to_disk)", "path": "data"})
    prompt_data_probs: list[float] = field(default_factory=list, metadata={"help": "mixing weights, one per prompt file (default: each prompt once)", "check": "> 0"})
    input_key: str = field(default="message", metadata={"help": "the prompt field: chat turns or a string"})
    eval_prompt_data: list[str] = field(default_factory=list, metadata={"help": "prompts for the greedy-reward evaluation (else --eval_split)", "path": "data", "one_of": "eval data"})
    eval_split: float = field(default=0.0, metadata={"help": "fraction of the prompts held out for evaluation", "check": "[0, 1)", "one_of": "eval data"})
    max_eval_prompts: int = field(default=64, metadata={"help": "evaluate on at most this many prompts", "check": ">= 1"})
    skip_bad_rows: bool = False
    prompt_max_len: int = field(default=1024, metadata={"check": ">= 1"})
    generate_max_len: int = field(default=1024, metadata={"check": ">= 1"})
    prompt_overflow: str = field(default="truncate", metadata={"help": "prompts over --prompt_max_len: truncate (from the left) or drop; counted either way", "check": ("truncate", "drop")})


@dataclass
class RLConfig(PlacementArgs, RLDataArgs, DistributedArgs, LoggingArgs, CheckpointArgs, LoraArgs):
    """PPO / ReMax / RLOO with Ray workers and vLLM rollouts."""

    pretrain: str = field(default="", metadata={"help": "the initial policy (HF causal LM folder)", "path": "model"})
    reward_pretrain: list[str] = field(default_factory=list, metadata={"help": "reward-model folders", "path": "model"})
    reward_weights: list[float] = field(default_factory=list, metadata={"help": "weights combining the reward models, one per --reward_pretrain (none: 1 each, their sum)"})
    critic_pretrain: str | None = field(default=None, metadata={"help": "critic init (default: the first reward model)", "path": "model"})

    advantage_estimator: str = field(default="gae", metadata={"help": "gae (PPO, critic) | remax | rloo | reinforce_baseline (no critic)", "check": ESTIMATORS})
    policy_loss: str = field(default="auto", metadata={"help": "ppo (clipped) | reinforce | auto: reinforce for synchronous remax (the paper), ppo otherwise", "check": POLICY_LOSSES})
    n_samples_per_prompt: int = field(default=1, metadata={"check": ">= 1"})
    temperature: float = field(default=1.0, metadata={"check": "> 0"})
    top_p: float = field(default=1.0, metadata={"check": "(0, 1]"})
    top_k: int = field(default=-1, metadata={"check": "-1 or >= 1"})

    rollout_batch_size: int = field(default=128, metadata={"help": "prompts per rollout", "check": ">= 1"})
    micro_rollout_batch_size: int = field(default=16, metadata={"help": "sizes the no-grad passes (reference, reward, critic values, old log-probs): each rank packs its samples into micro-batches of up to this many x (prompt_max_len + generate_max_len) tokens (or --packing_max_tokens)", "check": ">= 1"})
    train_batch_size: int = field(default=128, metadata={"help": "samples per optimizer step (all ranks)", "check": ">= 1"})
    actor_train_batch_size: int = field(default=8, metadata={"help": "actor samples per micro-batch per rank", "check": ">= 1"})
    critic_train_batch_size: int = field(default=4, metadata={"help": "critic samples per micro-batch per rank", "check": ">= 1"})
    packing_samples: bool = field(default=False, metadata={"help": "token-budget micro-batches (rows are always packed, never padded)"})
    packing_max_tokens: int | None = field(default=None, metadata={"help": "token budget of a micro-batch (default: micro size x (prompt_max_len + generate_max_len))", "check": ">= 1"})
    num_episodes: int = field(default=1, metadata={"help": "passes over the prompts", "check": ">= 1"})
    max_epochs: int = field(default=1, metadata={"help": "PPO epochs over each rollout", "check": ">= 1"})
    max_iterations: int = field(default=-1, metadata={"help": "stop after N rollouts (-1: all episodes)", "check": "-1 or >= 1"})

    actor_learning_rate: float = field(default=1e-6, metadata={"check": "> 0"})
    critic_learning_rate: float = field(default=9e-6, metadata={"check": "> 0"})
    l2: float = field(default=0.0, metadata={"check": ">= 0"})
    lr_warmup_ratio: float = field(default=0.03, metadata={"check": "[0, 1]"})
    max_norm: float = field(default=1.0, metadata={"check": "> 0"})
    eps_clip: float = field(default=0.2, metadata={"help": "PPO ratio clip", "check": "> 0"})
    value_clip: float = field(default=0.2, metadata={"help": "critic value clip (<= 0: off)"})
    entropy_coef: float = field(default=0.0, metadata={"check": ">= 0"})
    gamma: float = field(default=1.0, metadata={"check": "(0, 1]"})
    lambd: float = field(default=0.95, metadata={"help": "GAE lambda", "check": "[0, 1]"})
    init_kl_coef: float = field(default=0.01, metadata={"check": ">= 0"})
    kl_target: float | None = field(default=None, metadata={"help": "adaptive KL coefficient towards this KL (per-token mean); default: fixed", "check": "> 0"})
    kl_horizon: int = field(default=10000, metadata={"check": ">= 1"})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 | k2 | k3 (Schulman 2020)", "check": ("k1", "k2", "k3")})
    reward_clip: float = field(default=-1.0, metadata={"help": "clip RM scores (PPO) / the reward difference (critic-free); -1: 10 for gae, 5 (ReMax's) otherwise; 0: off", "check": "-1 or >= 0"})
    normalize_reward: bool = field(default=False, metadata={"help": "running mean/std normalisation of RM scores"})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "subtracted from the reward of a response that did not end with the end-of-turn token (cut at --generate_max_len); TRL's name. The RM reads such a response with the token appended (rlhf_data.tokenize.end_response), as in its training; default: no penalty", "check": ">= 0"})
    whiten_advantages: bool | None = field(default=None, metadata={"help": "batch-whiten advantages (default: on for gae, off for the baselines)"})

    async_train: bool = field(default=False, metadata={"help": "generate rollout k+1 while training on rollout k (one step off-policy); critic and actor update concurrently"})
    old_logprobs: str = field(default="auto", metadata={"help": "log-probs of the sampled tokens (the PPO ratio's denominator, the KL): trainer (an actor forward before training) | sampler (the engine's; the sync gap is then read off the first training forward) | auto (sampler for --async_train and for the REINFORCE loss in fp32, else trainer)", "check": ("auto", "trainer", "sampler")})
    eval_steps: int = field(default=-1, metadata={"help": "greedy-reward evaluation every N iterations (always before and after training)", "check": "-1 or >= 1"})

    def __post_init__(self):
        check_fields(self)
        check_libraries(self)
        if not self.pretrain or not self.reward_pretrain or not self.prompt_data:
            raise ConfigError("--pretrain, --reward_pretrain and --prompt_data are required")
        check_lora(self)  # LoRA adapts the actor only (critic and reward models train or score in full)
        if self.weight_sync == "broadcast" and self.rollout_backend != "vllm":
            raise ConfigError("--weight_sync broadcast needs --rollout_backend vllm (the HF engine takes object_store)")
        if self.advantage_estimator == "rloo" and self.n_samples_per_prompt < 2:
            raise ConfigError("--advantage_estimator rloo needs --n_samples_per_prompt >= 2")
        if self.reward_weights:
            check_count("--reward_weights", self.reward_weights, len(self.reward_pretrain), "reward models (--reward_pretrain)")
        check_data_mix(self.prompt_data, self.prompt_data_probs, self.eval_prompt_data, self.eval_split,
                       ("--prompt_data_probs", "prompt files", "--eval_prompt_data"))
        if self.critic_pretrain and not self.uses_critic:
            raise ConfigError(f"--critic_pretrain is unused with --advantage_estimator {self.advantage_estimator} (no critic)")
        if self.samples_per_rollout % self.train_batch_size:
            raise ConfigError(
                f"--train_batch_size {self.train_batch_size} must divide the samples of a rollout "
                f"(--rollout_batch_size {self.rollout_batch_size} x --n_samples_per_prompt {self.n_samples_per_prompt})")
        for name, world in (("actor", self.actor_world), ("critic", self.critic_world)):
            micro = self.actor_train_batch_size if name == "actor" else self.critic_train_batch_size
            if self.train_batch_size % world or (not self.packing_samples and (self.train_batch_size // world) % micro):
                raise ConfigError(
                    f"--train_batch_size {self.train_batch_size} must split evenly over the {world} {name} "
                    f"rank(s) into micro-batches of --{name}_train_batch_size {micro}")
        if self.async_train and self.policy_loss == "reinforce":
            raise ConfigError("--async_train trains on rollouts of the previous weights and needs the importance "
                              "ratio to the behaviour policy: use --policy_loss ppo (or auto), not reinforce")
        if self.async_train and self.old_logprobs == "trainer":
            raise ConfigError("--async_train trains on rollouts of the previous weights: their log-probs can only "
                              "come from the sampler (--old_logprobs sampler or auto)")

    # -- derived -------------------------------------------------------------------------------
    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def samples_per_rollout(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def actor_world(self) -> int:
        return self.actor_num_nodes * self.actor_num_gpus_per_node

    @property
    def critic_world(self) -> int:
        return self.critic_num_nodes * self.critic_num_gpus_per_node

    @property
    def effective_policy_loss(self) -> str:
        """``auto``: REINFORCE for synchronous ReMax (the paper's loss on on-policy data), else
        PPO-clip, whose ratio to the behaviour policy's log-probs keeps ``--async_train``'s
        one-step-off-policy update correct."""
        if self.policy_loss != "auto":
            return self.policy_loss
        return "reinforce" if self.advantage_estimator == "remax" and not self.async_train else "ppo"

    @property
    def effective_old_logprobs(self) -> str:
        """``auto``: the sampler's where nothing needs the trainer's. Async must use the behaviour
        policy's. The REINFORCE loss has no ratio, so old log-probs only enter the KL, and in fp32
        the engine's equal the trainer's (~1e-7, the sync gap): the actor forward before training
        is then pure cost. With bf16 the two differ by more, and PPO's ratio is sensitive to
        that, so they recompute (as OpenRLHF and verl do)."""
        if self.old_logprobs != "auto":
            return self.old_logprobs
        if self.async_train or (self.effective_policy_loss == "reinforce" and not self.bf16):
            return "sampler"
        return "trainer"

    @property
    def effective_reward_clip(self) -> float | None:
        clip = self.reward_clip
        if clip < 0:
            clip = 10.0 if self.uses_critic else 5.0
        return clip or None

    @property
    def effective_whiten(self) -> bool:
        return self.uses_critic if self.whiten_advantages is None else self.whiten_advantages

    @property
    def max_seq_len(self) -> int:
        return self.prompt_max_len + self.generate_max_len

    def token_budget(self, micro_samples: int) -> int:
        return self.packing_max_tokens or micro_samples * self.max_seq_len

    def reward_paths(self) -> list[str]:
        """``--reward_pretrain`` (kept for callers; the field is the list)."""
        return list(self.reward_pretrain)

    def reward_weight_list(self) -> list[float]:
        """``--reward_weights``, or 1.0 per reward model when not given (their sum)."""
        return list(self.reward_weights) or [1.0] * len(self.reward_pretrain)


def placement_counts(cfg: RLConfig, devices: bool) -> dict[str, int]:
    """By role: the devices the placement asks for (``devices``: colocated groups share theirs),
    or the worker processes it starts (every group is processes, colocated or not)."""
    reward_pool = cfg.reward_num_nodes * cfg.reward_num_gpus_per_node
    ref = cfg.ref_num_nodes * cfg.ref_num_gpus_per_node
    return {
        "actor": cfg.actor_world,
        "ref": 0 if (devices and cfg.colocate_actor_ref) else (cfg.actor_world if cfg.colocate_actor_ref else ref),
        "critic": cfg.critic_world if cfg.uses_critic else 0,
        "reward": (0 if (devices and cfg.colocate_critic_reward and cfg.uses_critic)
                   else (cfg.critic_world if cfg.colocate_critic_reward and cfg.uses_critic else reward_pool)
                   * (1 if devices else len(cfg.reward_paths()))),
        "vllm": cfg.vllm_num_engines * cfg.vllm_tensor_parallel_size,
    }


def _weights_bytes(path: str) -> int:
    folder = Path(path)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))


def check_resources(cfg: RLConfig) -> None:
    """Without a cluster to join (no ``--ray_address`` / ``RAY_ADDRESS``), the placement must fit
    this machine, checked before Ray starts: the devices it asks for with CUDA; without CUDA, a
    lower bound of the memory its worker processes take (each loads the policy or a reward model,
    plus ~0.3 GiB of runtime) against the machine's memory."""
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        return  # the cluster's scheduler decides (and waits for resources)
    import torch

    if torch.cuda.is_available():
        gpus = placement_counts(cfg, devices=True)
        asked = ", ".join(f"{k} {v}" for k, v in gpus.items() if v)
        have = torch.cuda.device_count()
        if sum(gpus.values()) > have:
            raise ConfigError(f"the placement asks for {sum(gpus.values())} GPUs ({asked}; see --*_num_gpus_per_node, "
                              f"--vllm_num_engines, --colocate_*), this machine has {have}")
        return
    if cfg.vllm_tensor_parallel_size > 1 and cfg.rollout_backend == "vllm":
        raise ConfigError(f"--vllm_tensor_parallel_size {cfg.vllm_tensor_parallel_size} needs GPUs: a CPU vLLM engine "
                          "runs one worker (drop the flag, or join a GPU cluster with --ray_address)")
    roles = placement_counts(cfg, devices=False)
    asked = ", ".join(f"{k} {v}" for k, v in roles.items() if v)
    policy = _weights_bytes(cfg.pretrain)
    reward = max([_weights_bytes(p) for p in cfg.reward_paths()] or [policy])
    per_role = {"actor": policy, "ref": policy, "critic": reward, "reward": reward, "vllm": policy}
    need = sum(n * (per_role[k] + int(0.3 * 2**30)) for k, n in roles.items())
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total:
        raise ConfigError(f"the placement starts {sum(roles.values())} worker processes ({asked}), which need at least "
                          f"{need / 2**30:.0f} GiB of memory; this machine has {total / 2**30:.0f} GiB "
                          "(lower --vllm_num_engines or --*_num_gpus_per_node, or join a cluster with --ray_address)")
