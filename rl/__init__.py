"""Reinforcement learning from the reward model: PPO, ReMax, RLOO and REINFORCE-with-baseline on
Ray worker groups, with vLLM rollouts.

The algorithms, pure functions on tensors:
masked.py          masked_sum / masked_mean / masked_whiten over right-padded (B, T) response tokens
kl.py              per-token KL estimators k1 / k2 / k3 (Schulman 2020) and ``kl_penalty``
kl_controller.py   Fixed / Adaptive KL coefficient (Ziegler et al. 2019), with state_dict for resume
advantages.py      token-level rewards, GAE, ReMax / RLOO / REINFORCE-with-baseline advantages
policy_losses.py   PPO-clip and REINFORCE policy losses, clipped value loss
running_moments.py running mean / std of rewards (optional normalisation)

The machinery that runs them:
rollout.py         vLLM and HF rollout engines (sampled log-probs that match the trainer's)
weight_sync.py     the actor's full state dict into an engine, checked name by name
weight_broadcast.py  the same over one process group (NCCL / gloo): actor rank 0 -> engine workers
experience.py      SequenceBatch / Experience: what travels between the driver and the workers
prompt_data.py     prompt files -> token ids within --prompt_max_len -> a seeded batch order
worker_group.py    Ray placement (DevicePool) and WorkerGroup: N ranks holding one FSDP model
workers.py         PolicyWorker (actor / reference), CriticWorker, RewardWorker, RolloutWorker
cluster.py         starting Ray and placing every group (--*_num_gpus_per_node, --colocate_*)
config.py          RLConfig: the flags of fsdp_ppo_ray.py
trainer.py         RLTrainer.fit: generate -> score -> advantages -> update -> sync, checkpoints

Conventions: per-token tensors are (B, T) over response tokens only, right-padded, with a 0/1
``mask``; sequence rewards are (B,); everything is fp32 and exactly 0 (never NaN) at padding and on
rows without a real token. Import from the modules (``from rl.advantages import compute_gae``).
"""
