"""Rewards, returns and advantages for PPO (critic + GAE) and the critic-free REINFORCE family
(ReMax, RLOO, REINFORCE with a given baseline), as pure functions on ``(B, T)`` tensors.

Conventions (shared by the whole ``rl`` package):
- per-token tensors are ``(B, T)`` over RESPONSE tokens only, right-padded; ``mask`` is 1 on real
  response tokens. Padding may hold anything: it is selected away, never multiplied;
- sequence rewards (one reward-model score per response) are ``(B,)``;
- ``kl`` is a per-token KL estimate from ``rl.kl.kl_penalty`` (any estimator), computed from
  detached log-probs;
- outputs are fp32, exactly 0 at padding and on rows with no real token, and carry no gradient
  (advantages and returns are regression / policy-gradient *targets*).

The critic-free estimators all share one return, the KL-regularised reward-to-go with gamma = 1:

    A_t = (r - b) - kl_coef * sum_{t' >= t} kl_t'

(optionally with (r - b) clipped), i.e. ``compute_gae`` with V = 0 and gamma = lam = 1 of
``token_level_rewards(r - b, ...)``. They differ only in the baseline b: the greedy response's
reward (ReMax), the other samples' mean (RLOO), the prompt's mean (``group_mean_advantages``), or
one given by the caller.
"""

from __future__ import annotations

import torch

from rl.masked import masked_mean, masked_whiten  # noqa: F401  (re-exported: whitening lives with the advantages)


def _zeros_where_unmasked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x in fp32 where mask is 1, exactly 0 elsewhere (selected, so inf / NaN padding gives 0)."""
    return torch.where(mask.bool(), x.float(), torch.zeros((), dtype=torch.float32, device=x.device))


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row (T - 1 - argmax of the flipped mask, as
    OpenRLHF's ``eos_indices``); rows without a real token get T - 1, callers check ``mask.any(-1)``."""
    T = mask.shape[-1]
    return T - 1 - mask.bool().flip(-1).long().argmax(-1)


@torch.no_grad()
def token_level_rewards(
    seq_rewards: torch.Tensor,
    kl: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float | None = None,
) -> torch.Tensor:
    """r_t = -kl_coef * kl_t + [t = last real token] * clip(r, -reward_clip, reward_clip).

    The RLHF reward of Ziegler et al. 2019 / Ouyang et al. 2022 (InstructGPT, arXiv 2203.02155)
    spread over tokens: the reward model scores the whole response, so its score is paid once, at
    the last real token (OpenRLHF ``compute_reward``); the KL penalty is paid at every token. The score is
    clipped before it is placed (the seed system clamps to +-10) so that one outlier score cannot
    dominate a batch. ``kl=None`` means no penalty. Rows without a real token get all zeros.
    """
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if kl is not None:
        rewards = _zeros_where_unmasked(-kl_coef * kl.float(), mask)
    score = seq_rewards.float()
    if reward_clip is not None:
        score = score.clamp(-reward_clip, reward_clip)
    score = torch.where(mask.bool().any(-1), score, torch.zeros_like(score))  # an empty row gets nothing
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += score
    return rewards


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, arXiv 1506.02438):

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                       (the critic's regression target)

    with V and A beyond the last real token = 0: the response ends there (EOS or length limit;
    like OpenRLHF and verl, a truncated response is treated as terminal too). Reverse loop over T,
    vectorised over B. A masked position is *skipped*: it passes V_{t+1} and A_{t+1} through
    unchanged (as verl does for observation tokens), which for right padding is exactly the rule
    above. gamma = lam = 1 gives A_t = sum_{t' >= t} r_t' - V_t. Returns ``(advantages, returns)``,
    both un-whitened and 0 at padding: whiten advantages afterwards (``masked_whiten``), never the
    returns.
    """
    rewards = _zeros_where_unmasked(rewards, mask)
    values = _zeros_where_unmasked(values, mask)
    keep = mask.bool()
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(keep[:, t], advantage, torch.zeros_like(advantage))
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        next_advantage = torch.where(keep[:, t], advantage, next_advantage)
    returns = _zeros_where_unmasked(advantages + values, mask)
    return advantages, returns


def _reward_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{t' >= t} r_t' over real tokens (gamma = 1), 0 at padding."""
    rewards = _zeros_where_unmasked(rewards, mask)
    return _zeros_where_unmasked(rewards.flip(-1).cumsum(-1).flip(-1), mask)


@torch.no_grad()
def reinforce_baseline_advantages(
    seq_rewards: torch.Tensor,
    baseline: torch.Tensor | float,
    kl: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float | None = None,
) -> torch.Tensor:
    """REINFORCE with a baseline (Williams 1992) on the KL-regularised RLHF return, gamma = 1:

        A_t = clip(r - b, -reward_clip, reward_clip) - kl_coef * sum_{t' >= t} kl_t'

    ``baseline`` is ``(B,)`` or a scalar (e.g. a running mean of rewards); any b that does not
    depend on the sampled response keeps the gradient unbiased and lowers its variance. The KL term
    is the reward-to-go of the per-token penalty: token t's action influences every later token,
    so it is credited with every later penalty. The clip applies to the *difference* r - b (as
    ReMax does), not to r. These are also the returns (there is no critic). 0 at padding.
    """
    advantage = seq_rewards.float() - (baseline.float() if torch.is_tensor(baseline) else float(baseline))
    if reward_clip is not None:
        advantage = advantage.clamp(-reward_clip, reward_clip)
    return _reward_to_go(token_level_rewards(advantage, kl, mask, kl_coef), mask)


@torch.no_grad()
def remax_advantages(
    seq_rewards_sampled: torch.Tensor,
    seq_rewards_greedy: torch.Tensor,
    kl: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float | None = 5.0,
) -> torch.Tensor:
    """ReMax (Li et al. 2023, arXiv 2310.10505, Algorithm 1): REINFORCE whose baseline is the
    reward of the greedy response of the current policy to the same prompt:

        A_t = clip(r(x, a) - r(x, a_greedy), -reward_clip, reward_clip) - kl_coef * sum_{t' >= t} kl_t'

    ``seq_rewards_greedy`` is ``(B,)`` aligned with the samples: with n samples per prompt, repeat
    each prompt's greedy reward n times (``repeat_interleave``; all samples share it, as in verl).
    The greedy baseline is the raw RM score (its own KL is not subtracted), as in the paper.

    What the original code does (liziniu/ReMax, ``step3_rlhf_finetuning/remax_trainer.py``, a
    DeepSpeed-Chat fork; one sample per prompt):
      - ``kl_t = -kl_ctl * (logp_t - ref_logp_t)`` (k1; ``--kl_ctl`` 0.1, the 7B script 0.05);
      - ``r - r_greedy`` clipped to +-5 (``self.clip_reward_value = 5.0`` is hard-coded; the
        ``--clip_reward_value`` flag is parsed but not used);
      - ``compute_returns``: for a response of L tokens, position t = 0..L-1 gets
        ``returns_t = kl_t + gamma^(L - t) * clip(r - r_greedy)``: the KL is the token's OWN penalty
        (``cumulative_kl = kl[j, i]`` is assigned, not accumulated) and the reward difference is
        discounted, the last token included (``--gamma`` 0.95 by default, 0.99 in the 7B script);
      - loss ``sum(-returns * logp * mask) / mask.sum()`` (``rl.policy_losses.reinforce_policy_loss``),
        one gradient step per batch on freshly sampled data.

    What this function does instead: the KL enters as its reward-to-go and there is no discount.
    The RLHF objective is E[r - kl_coef * sum_t kl_t]; REINFORCE credits each token with all rewards
    that follow it, so the later tokens' KL penalties belong in its return (the original keeps only
    the immediate one: lower variance, but not the gradient of that objective). The RM score
    rewards the response as a whole, so discounting it would only down-weight early tokens. With
    ``kl_coef = 0`` this equals the original with gamma = 1; with ``reward_clip=None`` it equals
    verl's ``compute_remax_outcome_advantage`` with the KL in the reward (``use_kl_in_reward``).
    0 at padding.
    """
    return reinforce_baseline_advantages(seq_rewards_sampled, seq_rewards_greedy, kl, mask, kl_coef, reward_clip)


@torch.no_grad()
def rloo_advantages(
    seq_rewards: torch.Tensor,
    group_size: int,
    kl: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float | None = None,
) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019, "Buy 4 REINFORCE samples,
    get a baseline for free!"; Ahmadian et al. 2024, arXiv 2402.14740):
    with k samples per prompt, sample i's baseline is the mean reward of the other k - 1:

        b_i = (sum_j r_j - r_i) / (k - 1)          (so r_i - b_i = k / (k - 1) * (r_i - mean_j r_j))
        A_t = clip(r_i - b_i, -reward_clip, reward_clip) - kl_coef * sum_{t' >= t} kl_t'

    ``seq_rewards`` is ``(num_prompts * group_size,)`` with each prompt's samples ADJACENT
    (``[p0s0, p0s1, .., p1s0, ..]``, the order of ``repeat_interleave`` / vLLM ``n``).
    The baseline uses the raw RM rewards and the KL enters per token, as in ReMax and OpenRLHF's
    ``rloo`` estimator; the paper (and TRL) instead treats the response as one action and puts the
    sequence KL into each reward before taking the leave-one-out baseline. 0 at padding.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got group_size={group_size}")
    if seq_rewards.numel() % group_size != 0:
        raise ValueError(f"{seq_rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = seq_rewards.float().view(-1, group_size)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return reinforce_baseline_advantages(seq_rewards, baseline.reshape(-1), kl, mask, kl_coef, reward_clip)


@torch.no_grad()
def group_mean_advantages(seq_rewards: torch.Tensor, group_size: int, kl: torch.Tensor | None, mask: torch.Tensor,
                          kl_coef: float, reward_clip: float | None = None) -> torch.Tensor:
    """REINFORCE whose baseline is the mean reward of the prompt's samples, the sample itself
    included (``--advantage_estimator reinforce_baseline``; OpenRLHF's ``reinforce_baseline``):

        b_i = mean_j r_j over the group_size samples of i's prompt
        A_t = clip(r_i - b_i, -reward_clip, reward_clip) - kl_coef * sum_{t' >= t} kl_t'

    With one sample per prompt every prompt's mean is its own reward (A would be 0), so the
    baseline is then the batch mean. Including r_i makes b depend on the sample, a bias of order
    1 / group_size that RLOO (``rloo_advantages``) avoids; layout as in ``rloo_advantages``. 0 at padding.
    """
    if group_size < 1 or seq_rewards.numel() % group_size != 0:
        raise ValueError(f"{seq_rewards.numel()} rewards do not split into groups of {group_size}")
    r = seq_rewards.float()
    baseline = r.view(-1, group_size).mean(-1).repeat_interleave(group_size) if group_size > 1 else r.mean()
    return reinforce_baseline_advantages(seq_rewards, baseline, kl, mask, kl_coef, reward_clip)
