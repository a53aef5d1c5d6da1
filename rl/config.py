"""The typed configuration of ``fsdp_ppo_ray.py`` (flags keep the seed system's / OpenRLHF's names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from training.config import CheckpointArgs, ConfigError, DistributedArgs, LoggingArgs

ESTIMATORS = ("gae", "remax", "rloo", "reinforce_baseline")
POLICY_LOSSES = ("auto", "ppo", "reinforce")


@dataclass
class PlacementArgs:
    actor_num_nodes: int = 1
    actor_num_gpus_per_node: int = field(default=1, metadata={"help": "actor ranks per node (CPU workers without GPUs)"})
    ref_num_nodes: int = 1
    ref_num_gpus_per_node: int = 1
    reward_num_nodes: int = 1
    reward_num_gpus_per_node: int = 1
    critic_num_nodes: int = 1
    critic_num_gpus_per_node: int = 1
    colocate_actor_ref: bool = field(default=False, metadata={"help": "reference ranks share the actor's devices"})
    colocate_critic_reward: bool = field(default=False, metadata={"help": "reward-model ranks share the critic's devices (PPO; ReMax has no critic)"})
    vllm_num_engines: int = 1
    vllm_tensor_parallel_size: int = 1
    vllm_gpu_memory_utilization: float = 0.5
    vllm_cpu_kvcache_space_gb: int = field(default=1, metadata={"help": "KV cache of a CPU vLLM engine (GiB)"})
    rollout_backend: str = field(default="vllm", metadata={"help": "vllm | hf (transformers generate, when vLLM is absent)"})
    weight_sync: str = field(default="auto", metadata={"help": "actor -> engines: object_store (Ray) | broadcast (one process group: NCCL on GPUs, gloo on CPUs) | auto (broadcast with GPUs and vLLM)"})
    worker_threads: int = field(default=0, metadata={"help": "torch threads per CPU worker (0: torch's default)"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: RAY_ADDRESS, else a local Ray started and stopped here)"})


@dataclass
class RLDataArgs:
    prompt_data: str = field(default="", metadata={"help": "comma-separated prompt files (jsonl/json/parquet/save_to_disk)"})
    prompt_data_probs: str | None = field(default=None, metadata={"help": "mixing weights, one per prompt file"})
    input_key: str = field(default="message", metadata={"help": "the prompt field: chat turns or a string"})
    apply_chat_template: bool = field(default=True, metadata={"help": "render prompts with the tokenizer's chat template (always on)"})
    eval_prompt_data: str | None = field(default=None, metadata={"help": "prompts for the greedy-reward evaluation (else --eval_split)"})
    eval_split: float = field(default=0.0, metadata={"help": "fraction of the prompts held out for evaluation"})
    max_eval_prompts: int = field(default=64, metadata={"help": "evaluate on at most this many prompts"})
    skip_bad_rows: bool = False
    prompt_max_len: int = 1024
    generate_max_len: int = 1024
    prompt_overflow: str = field(default="truncate", metadata={"help": "prompts over --prompt_max_len: truncate (from the left) or drop; counted either way"})


@dataclass
class RLConfig(PlacementArgs, RLDataArgs, DistributedArgs, LoggingArgs, CheckpointArgs):
    """PPO / ReMax / RLOO with Ray workers and vLLM rollouts."""

    pretrain: str = field(default="", metadata={"help": "the initial policy (HF causal LM folder)"})
    reward_pretrain: str = field(default="", metadata={"help": "comma-separated reward-model folders"})
    reward_weights: str | None = field(default=None, metadata={"help": "comma-separated weights combining the reward models (default: sum)"})
    critic_pretrain: str | None = field(default=None, metadata={"help": "critic init (default: the first reward model)"})

    advantage_estimator: str = field(default="gae", metadata={"help": "gae (PPO, critic) | remax | rloo | reinforce_baseline (no critic)"})
    policy_loss: str = field(default="auto", metadata={"help": "ppo (clipped) | reinforce | auto: reinforce for synchronous remax (the paper), ppo otherwise"})
    n_samples_per_prompt: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1

    rollout_batch_size: int = field(default=128, metadata={"help": "prompts per rollout"})
    micro_rollout_batch_size: int = field(default=16, metadata={"help": "samples per rank per no-grad micro-batch"})
    train_batch_size: int = field(default=128, metadata={"help": "samples per optimizer step (all ranks)"})
    actor_train_batch_size: int = field(default=8, metadata={"help": "actor samples per micro-batch per rank"})
    critic_train_batch_size: int = field(default=4, metadata={"help": "critic samples per micro-batch per rank"})
    packing_samples: bool = field(default=False, metadata={"help": "token-budget micro-batches (rows are always packed, never padded)"})
    packing_max_tokens: int | None = field(default=None, metadata={"help": "token budget of a micro-batch (default: micro size x (prompt_max_len + generate_max_len))"})
    num_episodes: int = field(default=1, metadata={"help": "passes over the prompts"})
    max_epochs: int = field(default=1, metadata={"help": "PPO epochs over each rollout"})
    max_iterations: int = field(default=-1, metadata={"help": "stop after N rollouts (-1: all episodes)"})

    actor_learning_rate: float = 1e-6
    critic_learning_rate: float = 9e-6
    l2: float = 0.0
    lr_warmup_ratio: float = 0.03
    max_norm: float = 1.0
    eps_clip: float = field(default=0.2, metadata={"help": "PPO ratio clip"})
    value_clip: float = field(default=0.2, metadata={"help": "critic value clip (<= 0: off)"})
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lambd: float = field(default=0.95, metadata={"help": "GAE lambda"})
    init_kl_coef: float = 0.01
    kl_target: float | None = field(default=None, metadata={"help": "adaptive KL coefficient towards this KL (per-token mean); default: fixed"})
    kl_horizon: int = 10000
    kl_estimator: str = field(default="k1", metadata={"help": "k1 | k2 | k3 (Schulman 2020)"})
    reward_clip: float = field(default=-1.0, metadata={"help": "clip RM scores (PPO) / the reward difference (critic-free); -1: 10 for gae, 5 (ReMax's) otherwise; 0: off"})
    normalize_reward: bool = field(default=False, metadata={"help": "running mean/std normalisation of RM scores"})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "subtracted from the reward of a response that did not end with the end-of-turn token (cut at --generate_max_len); TRL's name. The RM reads such a response with the token appended (rlhf_data.tokenize.end_response), as in its training; default: no penalty"})
    whiten_advantages: bool | None = field(default=None, metadata={"help": "batch-whiten advantages (default: on for gae, off for the baselines)"})

    async_train: bool = field(default=False, metadata={"help": "generate rollout k+1 while training on rollout k (one step off-policy); critic and actor update concurrently"})
    old_logprobs: str = field(default="auto", metadata={"help": "log-probs of the sampled tokens (the PPO ratio's denominator, the KL): trainer (an actor forward before training) | sampler (the engine's; the sync gap is then read off the first training forward) | auto (sampler for --async_train and for the REINFORCE loss in fp32, else trainer)"})
    eval_steps: int = field(default=-1, metadata={"help": "greedy-reward evaluation every N iterations (always before and after training)"})

    def __post_init__(self):
        if not self.pretrain or not self.reward_pretrain or not self.prompt_data:
            raise ConfigError("--pretrain, --reward_pretrain and --prompt_data are required")
        if self.advantage_estimator not in ESTIMATORS:
            raise ConfigError(f"--advantage_estimator must be one of {', '.join(ESTIMATORS)}, got {self.advantage_estimator!r}")
        if self.policy_loss not in POLICY_LOSSES:
            raise ConfigError(f"--policy_loss must be one of {', '.join(POLICY_LOSSES)}, got {self.policy_loss!r}")
        if self.rollout_backend not in ("vllm", "hf"):
            raise ConfigError(f"--rollout_backend must be vllm or hf, got {self.rollout_backend!r}")
        if self.weight_sync not in ("auto", "object_store", "broadcast"):
            raise ConfigError(f"--weight_sync must be auto, object_store or broadcast, got {self.weight_sync!r}")
        if self.weight_sync == "broadcast" and self.rollout_backend != "vllm":
            raise ConfigError("--weight_sync broadcast needs --rollout_backend vllm (the HF engine takes object_store)")
        if self.prompt_overflow not in ("truncate", "drop"):
            raise ConfigError(f"--prompt_overflow must be truncate or drop, got {self.prompt_overflow!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"--kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        if self.advantage_estimator == "rloo" and self.n_samples_per_prompt < 2:
            raise ConfigError("--advantage_estimator rloo needs --n_samples_per_prompt >= 2")
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
        if self.old_logprobs not in ("auto", "trainer", "sampler"):
            raise ConfigError(f"--old_logprobs must be auto, trainer or sampler, got {self.old_logprobs!r}")
        if self.async_train and self.old_logprobs == "trainer":
            raise ConfigError("--async_train trains on rollouts of the previous weights: their log-probs can only "
                              "come from the sampler (--old_logprobs sampler or auto)")
        if self.vllm_num_engines < 1:
            raise ConfigError("--vllm_num_engines must be >= 1")
        if self.missing_eos_penalty is not None and not 0 <= self.missing_eos_penalty < float("inf"):
            raise ConfigError(f"--missing_eos_penalty must be a finite value >= 0 (it is subtracted from the reward), "
                              f"got {self.missing_eos_penalty}")

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
        return [p for p in self.reward_pretrain.split(",") if p]

    def reward_weight_list(self) -> list[float]:
        n = len(self.reward_paths())
        if not self.reward_weights:
            return [1.0] * n
        weights = [float(w) for w in self.reward_weights.split(",")]
        if len(weights) != n:
            raise ConfigError(f"--reward_weights has {len(weights)} values for {n} reward models")
        return weights
