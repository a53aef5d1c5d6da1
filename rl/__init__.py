"""Reinforcement learning from the reward model: the algorithms as pure functions on tensors.

masked.py          masked_sum / masked_mean / masked_whiten over right-padded (B, T) response tokens
kl.py              per-token KL estimators k1 / k2 / k3 (Schulman 2020) and ``kl_penalty``
kl_controller.py   Fixed / Adaptive KL coefficient (Ziegler et al. 2019), with state_dict for resume
advantages.py      token-level rewards, GAE, ReMax / RLOO / REINFORCE-with-baseline advantages
policy_losses.py   PPO-clip and REINFORCE policy losses, clipped value loss

Conventions: per-token tensors are (B, T) over response tokens only, right-padded, with a 0/1
``mask``; sequence rewards are (B,); everything is fp32 and exactly 0 (never NaN) at padding and on
rows without a real token. Import from the modules (``from rl.advantages import compute_gae``).
"""
