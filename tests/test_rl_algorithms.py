"""The RL algorithms (rl/) against numbers computed by hand in the test.

Shared layout: B = 2 rows, T = 4 response tokens; row 0 is full, row 1 has 2 real tokens and 2
padded ones. Padding holds garbage (``G``) on purpose: every function must ignore it.
"""

import json
import math

import pytest
import torch

from rl.advantages import (
    compute_gae,
    last_token_index,
    group_mean_advantages,
    reinforce_baseline_advantages,
    remax_advantages,
    rloo_advantages,
    token_level_rewards,
)
from rl.kl import kl_k1, kl_k2, kl_k3, kl_penalty
from rl.kl_controller import AdaptiveKLController, FixedKLController
from rl.masked import masked_mean, masked_whiten
from rl.policy_losses import clipped_value_loss, ppo_policy_loss, reinforce_policy_loss

G = 37.0  # garbage in padded positions
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
# log-probs of the sampled tokens under the policy and the reference
LOGP = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.2, -3.0, G, G]])
REF = torch.tensor([[-1.5, -1.0, -0.5, -2.5], [-0.7, -2.0, -G, G]])
# k1 = logp - ref on the real tokens
K1 = [[0.5, -1.0, 0.0, 1.0], [0.5, -1.0, 0.0, 0.0]]


def flat(x):
    """Nested lists -> one flat list (pytest.approx compares flat sequences only)."""
    return [y for item in x for y in flat(item)] if isinstance(x, (list, tuple)) else [x]


def approx(x, abs=1e-6):
    return pytest.approx(flat(x) if isinstance(x, (list, tuple)) else x, abs=abs)


def rows(t: torch.Tensor):
    return t.flatten().tolist()


# --- masked helpers ------------------------------------------------------------------------------


def test_masked_mean_token_level_and_per_row():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0], [4.0, 8.0, G, float("inf")]])
    assert masked_mean(x, MASK).item() == approx((1 + 2 + 3 + 6 + 4 + 8) / 6)
    assert rows(masked_mean(x, MASK, dim=-1)) == approx([3.0, 6.0])
    empty = torch.zeros_like(MASK)
    assert masked_mean(x, empty).item() == 0.0
    assert rows(masked_mean(x, empty, dim=-1)) == [0.0, 0.0]


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, G], [4.0, G, G, G]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    mean, var = 2.5, (1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 4  # population variance = 1.25
    s = math.sqrt(var + 1e-8)
    w = masked_whiten(x, mask)
    assert rows(w) == approx([[-1.5 / s, -0.5 / s, 0.5 / s, 0.0], [1.5 / s, 0.0, 0.0, 0.0]])
    w = masked_whiten(x, mask, shift_mean=False)
    assert rows(w) == approx([[-1.5 / s + mean, -0.5 / s + mean, 0.5 / s + mean, 0.0], [1.5 / s + mean, 0, 0, 0]])
    # one real token has no spread: 0, not NaN; no real token: all zeros
    assert rows(masked_whiten(torch.tensor([[3.0, G]]), torch.tensor([[1, 0]]))) == [0.0, 0.0]
    assert rows(masked_whiten(x, torch.zeros_like(mask))) == [0.0] * 8


# --- KL estimators -------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    assert rows(kl_penalty(LOGP, REF, "k1", MASK)) == approx(K1)
    assert rows(kl_k1(LOGP, REF)[0]) == approx(K1[0])
    assert rows(kl_penalty(LOGP, REF, "k2", MASK)) == approx([[0.125, 0.5, 0.0, 0.5], [0.125, 0.5, 0.0, 0.0]])
    assert rows(kl_k2(LOGP, REF)[0]) == approx([0.125, 0.5, 0.0, 0.5])
    # k3 = exp(d) - d - 1 with d = ref - logp = [-0.5, 1, 0, -1] / [-0.5, 1]
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    expected = [[k3(-0.5), k3(1.0), 0.0, k3(-1.0)], [k3(-0.5), k3(1.0), 0.0, 0.0]]
    assert rows(kl_penalty(LOGP, REF, "k3", MASK)) == approx(expected)
    assert expected[0] == approx([0.1065306597, 0.7182818285, 0.0, 0.3678794412])
    assert rows(kl_k3(LOGP, REF)[0]) == approx(expected[0])
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(LOGP, REF, "k4")


def test_k1_and_k3_are_unbiased_and_k3_is_non_negative():
    # a categorical "vocabulary" of 3 tokens: E_{a~pi}[k(a)] computed exactly by summation
    pi = torch.tensor([0.5, 0.3, 0.2])
    ref = torch.tensor([0.2, 0.3, 0.5])
    true_kl = 0.5 * math.log(0.5 / 0.2) + 0.0 + 0.2 * math.log(0.2 / 0.5)  # KL(pi || ref) = 0.2748872
    logp, ref_logp = pi.log(), ref.log()
    k1, k2, k3 = kl_k1(logp, ref_logp), kl_k2(logp, ref_logp), kl_k3(logp, ref_logp)
    assert (pi * k1).sum().item() == approx(true_kl)
    assert (pi * k3).sum().item() == approx(true_kl)
    assert (pi * k2).sum().item() != approx(true_kl, abs=1e-3)  # k2 is biased
    # k1 is negative on a token the reference prefers (its expectation is what is >= 0) ...
    assert k1[2].item() == approx(math.log(0.2 / 0.5)) and k1[2].item() < 0
    # ... k3 never is
    assert (k3 >= 0).all() and (k2 >= 0).all()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_k3(a, b) >= 0).all()


def test_k3_log_ratio_clip_prevents_overflow():
    logp = torch.tensor([-100.0, 0.0])
    ref = torch.tensor([0.0, -100.0])
    clipped = kl_k3(logp, ref, log_ratio_clip=10.0)
    assert rows(clipped) == approx([math.exp(10) - 10 - 1, math.exp(-10) + 10 - 1], abs=1e-2)
    assert torch.isfinite(clipped).all()
    assert torch.isinf(kl_k3(logp, ref, log_ratio_clip=None)[0])  # exp(100) overflows fp32


# --- KL controllers ------------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand_and_resume():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # 9/6 - 1 = 0.5, clipped to 0.2
    assert ctl.value == approx(0.1 * (1 + 0.2 * 256 / 10000))  # 0.100512
    ctl.update(current_kl=3.0, n_steps=1000)  # 3/6 - 1 = -0.5, clipped to -0.2
    assert ctl.value == approx(0.100512 * (1 - 0.2 * 1000 / 10000))  # 0.09850176
    ctl.update(current_kl=6.6, n_steps=500)  # 6.6/6 - 1 = 0.1, inside the clip
    assert ctl.value == approx(0.09850176 * (1 + 0.1 * 500 / 10000))

    state = json.loads(json.dumps(ctl.state_dict()))  # checkpointable as JSON
    resumed = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(state)
    assert resumed.value == ctl.value
    ctl.update(7.0, 64)
    resumed.update(7.0, 64)
    assert resumed.value == ctl.value
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10000)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.02)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.02
    other = FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.02


# --- token-level rewards and GAE -----------------------------------------------------------------


def test_token_level_rewards_places_score_at_last_real_token():
    kl = torch.tensor([[0.5, -1.0, 0.0, 1.0], [0.5, -1.0, G, G]])
    r = token_level_rewards(torch.tensor([2.0, -12.0]), kl, MASK, kl_coef=0.1, reward_clip=10.0)
    # -0.1 * kl everywhere, + clip(score) at index 3 (row 0) and index 1 (row 1)
    assert rows(r) == approx([[-0.05, 0.1, 0.0, -0.1 + 2.0], [-0.05, 0.1 - 10.0, 0.0, 0.0]])
    r = token_level_rewards(torch.tensor([2.0, -12.0]), kl, MASK, kl_coef=0.1)  # no clip
    assert r[1, 1].item() == approx(0.1 - 12.0)
    assert rows(last_token_index(MASK)) == [3, 1]
    # no KL term; an empty row gets nothing
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    r = token_level_rewards(torch.tensor([1.5, 4.0]), None, mask, kl_coef=0.1)
    assert rows(r) == [0.0, 1.5, 0.0, 0.0, 0.0, 0.0]


REWARDS = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.5, -1.0, G, G]])
VALUES = torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.1, 0.6, G, float("inf")]])


def test_gae_gamma_1_lambda_1_is_reward_to_go_minus_value():
    adv, ret = compute_gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    # row 0: reward-to-go = [1, 1, 1, 1]; row 1: [-0.5, -1.0]
    assert rows(adv) == approx([[1 - 0.5, 1 - 0.4, 1 - 0.3, 1 - 0.2], [-0.5 - 0.1, -1.0 - 0.6, 0.0, 0.0]])
    assert rows(ret) == approx([[1.0, 1.0, 1.0, 1.0], [-0.5, -1.0, 0.0, 0.0]])


def test_gae_step_by_step():
    gamma, lam = 0.9, 0.8
    adv, ret = compute_gae(REWARDS, VALUES, MASK, gamma, lam)
    # row 0, backwards; V_4 = 0 (beyond the last token)
    d3 = 1.0 + gamma * 0.0 - 0.2  # 0.8
    a3 = d3
    d2 = 0.0 + gamma * 0.2 - 0.3  # -0.12
    a2 = d2 + gamma * lam * a3  # 0.456
    d1 = 0.0 + gamma * 0.3 - 0.4  # -0.13
    a1 = d1 + gamma * lam * a2  # 0.19832
    d0 = 0.0 + gamma * 0.4 - 0.5  # -0.14
    a0 = d0 + gamma * lam * a1  # 0.0027904
    # row 1: its last real token is t = 1, so V_2 = 0 whatever the padding holds
    b1 = -1.0 + gamma * 0.0 - 0.6  # -1.6
    b0 = (0.5 + gamma * 0.6 - 0.1) + gamma * lam * b1  # 0.94 - 1.152 = -0.212
    assert [a0, a1, a2, a3, b0, b1] == approx([0.0027904, 0.19832, 0.456, 0.8, -0.212, -1.6])
    assert rows(adv) == approx([[a0, a1, a2, a3], [b0, b1, 0.0, 0.0]])
    # returns = A + V, 0 at padding
    assert rows(ret) == approx([[a0 + 0.5, a1 + 0.4, a2 + 0.3, a3 + 0.2], [b0 + 0.1, b1 + 0.6, 0.0, 0.0]])
    assert torch.isfinite(ret).all()


def test_gae_skips_a_hole_in_the_mask():
    # a masked position inside a row (e.g. an observation) passes V and A through unchanged
    adv, ret = compute_gae(
        torch.tensor([[0.0, G, 1.0]]), torch.tensor([[0.5, G, 0.2]]), torch.tensor([[1, 0, 1]]), 0.9, 0.8
    )
    compact_adv, compact_ret = compute_gae(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 0.9, 0.8
    )
    assert rows(adv) == approx([[compact_adv[0, 0].item(), 0.0, compact_adv[0, 1].item()]])
    assert adv[0, 0].item() == approx((0.9 * 0.2 - 0.5) + 0.72 * 0.8)  # 0.256
    assert rows(ret) == approx([[compact_ret[0, 0].item(), 0.0, compact_ret[0, 1].item()]])


# --- critic-free advantages ----------------------------------------------------------------------

KL = torch.tensor([[0.5, -1.0, 0.0, 1.0], [0.5, -1.0, G, G]])


def test_remax_without_kl_is_the_clipped_reward_difference_at_every_token():
    sampled, greedy = torch.tensor([1.0, 3.0]), torch.tensor([0.5, -4.0])  # differences 0.5 and 7
    adv = remax_advantages(sampled, greedy, KL, MASK, kl_coef=0.0, reward_clip=5.0)
    assert rows(adv) == approx([[0.5, 0.5, 0.5, 0.5], [5.0, 5.0, 0.0, 0.0]])  # 7 clipped to 5
    adv = remax_advantages(sampled, greedy, KL, MASK, kl_coef=0.0, reward_clip=None)
    assert rows(adv) == approx([[0.5, 0.5, 0.5, 0.5], [7.0, 7.0, 0.0, 0.0]])


def test_remax_kl_enters_as_reward_to_go():
    sampled, greedy = torch.tensor([1.0, 3.0]), torch.tensor([0.5, -4.0])
    adv = remax_advantages(sampled, greedy, KL, MASK, kl_coef=0.1, reward_clip=5.0)
    # KL-to-go: row 0 [0.5 - 1 + 0 + 1, -1 + 0 + 1, 0 + 1, 1] = [0.5, 0, 1, 1]; row 1 [-0.5, -1]
    assert rows(adv) == approx([[0.5 - 0.05, 0.5 - 0.0, 0.5 - 0.1, 0.5 - 0.1], [5.0 + 0.05, 5.0 + 0.1, 0.0, 0.0]])
    # = GAE with V = 0, gamma = lam = 1 on the token rewards of the clipped difference
    token_rewards = token_level_rewards(torch.tensor([0.5, 5.0]), KL, MASK, kl_coef=0.1)
    gae_adv, _ = compute_gae(token_rewards, torch.zeros(2, 4), MASK, 1.0, 1.0)
    assert rows(adv) == approx(rows(gae_adv))


def test_rloo_baseline_for_a_group_of_three():
    rewards = torch.tensor([1.0, 2.0, 6.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    adv = rloo_advantages(rewards, 3, None, mask, kl_coef=0.0)
    # baselines: (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5
    assert rows(adv) == approx([[-3.0, -3.0, -3.0], [-1.5, -1.5, 0.0], [4.5, 0.0, 0.0]])
    # = k / (k - 1) * (r - mean): 1.5 * ([1, 2, 6] - 3)
    assert adv[:, 0].tolist() == approx([1.5 * -2, 1.5 * -1, 1.5 * 3])
    # two prompts with adjacent samples; the KL enters as in ReMax
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    kl = torch.tensor([[1.0, 2.0, 0.0]] * 6)
    adv = rloo_advantages(rewards, 3, kl, torch.cat([mask, mask]), kl_coef=0.1)
    assert adv[:, 0].tolist() == approx([-3.0 - 0.3, -1.5 - 0.3, 4.5 - 0.1, -1.5 - 0.3, -1.5 - 0.3, 3.0 - 0.1])
    assert adv[0].tolist() == approx([-3.0 - 0.3, -3.0 - 0.2, -3.0 - 0.0])
    with pytest.raises(ValueError):
        rloo_advantages(rewards, 1, None, torch.cat([mask, mask]), 0.0)
    with pytest.raises(ValueError):
        rloo_advantages(rewards, 4, None, torch.cat([mask, mask]), 0.0)


def test_reinforce_with_given_baseline():
    rewards = torch.tensor([1.0, 3.0])
    adv = reinforce_baseline_advantages(rewards, 0.5, None, MASK, kl_coef=0.0)  # e.g. a running mean
    assert rows(adv) == approx([[0.5] * 4, [2.5, 2.5, 0.0, 0.0]])
    adv = reinforce_baseline_advantages(rewards, torch.tensor([2.0, 0.0]), KL, MASK, kl_coef=0.1, reward_clip=2.0)
    assert rows(adv) == approx([[-1.0 - 0.05, -1.0, -1.0 - 0.1, -1.0 - 0.1], [2.0 + 0.05, 2.0 + 0.1, 0.0, 0.0]])


def test_group_mean_baseline_by_hand():
    # two prompts x two samples: each prompt's mean is the baseline (the sample included)
    rewards = torch.tensor([1.0, 3.0, 4.0, 4.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    adv = group_mean_advantages(rewards, 2, None, mask, kl_coef=0.0)
    assert rows(adv) == approx([[-1.0, -1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    # one sample per prompt: the batch mean (2.0 for [1, 3])
    adv = group_mean_advantages(torch.tensor([1.0, 3.0]), 1, None, MASK, kl_coef=0.0)
    assert rows(adv) == approx([[-1.0] * 4, [1.0, 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError):
        group_mean_advantages(rewards, 3, None, mask, 0.0)


def test_fully_masked_rows_give_finite_zeros():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    garbage = torch.tensor([[0.3, 0.2, float("nan")], [float("inf"), float("nan"), -float("inf")]])
    rewards = torch.tensor([1.0, 5.0])
    outputs = [
        token_level_rewards(rewards, garbage, mask, 0.1),
        *compute_gae(garbage, garbage, mask, 0.9, 0.8),
        remax_advantages(rewards, torch.tensor([0.0, 1.0]), garbage, mask, 0.1),
        rloo_advantages(rewards, 2, garbage, mask, 0.1),
        reinforce_baseline_advantages(rewards, 0.5, garbage, mask, 0.1),
        group_mean_advantages(rewards, 2, garbage, mask, 0.1),
        kl_penalty(garbage, garbage * 0, "k3", mask),
        masked_whiten(garbage, mask),
    ]
    for out in outputs:
        assert torch.isfinite(out).all()
        assert out[1].tolist() == [0.0, 0.0, 0.0]
        assert out[0, 2].item() == 0.0


# --- policy and value losses ---------------------------------------------------------------------

# five real tokens over two rows (row 1 padded), one per regime:
#   t0 ratio 1.1 A=+1  inside the range            L = -1.1
#   t1 ratio 1.5 A=+1  above 1+eps, clipped        L = -1.2   (gradient 0)
#   t2 ratio 0.5 A=-1  below 1-eps, clipped        L = +0.8   (gradient 0)
#   t3 ratio 0.5 A=+2  below 1-eps, NOT clipped    L = -1.0   (min keeps the pessimistic term)
#   t4 ratio 1.5 A=-1  above 1+eps, NOT clipped    L = +1.5
PPO_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
RATIOS = [[1.1, 1.5, 0.5], [0.5, 1.5, 1.0]]
ADV = torch.tensor([[1.0, 1.0, -1.0], [2.0, -1.0, G]])


def ppo_inputs():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -G]], requires_grad=True)
    logp = (old.detach() + torch.tensor(RATIOS).log()).clone()
    logp[1, 2] = G  # garbage log-prob at the padded position
    return logp.requires_grad_(True), old


def test_ppo_loss_clipped_and_unclipped_regimes():
    logp, old = ppo_inputs()
    loss, stats = ppo_policy_loss(logp, old, ADV, PPO_MASK, clip_eps=0.2)
    assert loss.item() == approx((-1.1 - 1.2 + 0.8 - 1.0 + 1.5) / 5)  # -0.2
    assert stats["clip_fraction"].item() == approx(2 / 5)
    assert stats["ratio_mean"].item() == approx((1.1 + 1.5 + 0.5 + 0.5 + 1.5) / 5)
    assert stats["ratio_max"].item() == approx(1.5)
    r = [1.1, 1.5, 0.5, 0.5, 1.5]
    assert stats["approx_kl"].item() == approx(sum(x - 1 - math.log(x) for x in r) / 5)
    # DAPO clip-higher: only t1 changes (1.5 is now clipped at 1.28)
    loss, _ = ppo_policy_loss(logp, old, ADV, PPO_MASK, clip_eps=0.2, clip_eps_high=0.28)
    assert loss.item() == approx((-1.1 - 1.28 + 0.8 - 1.0 + 1.5) / 5)


def test_ppo_gradient_flows_to_log_probs_only():
    logp, old = ppo_inputs()
    adv = ADV.clone().requires_grad_(True)
    loss, _ = ppo_policy_loss(logp, old, adv, PPO_MASK)
    loss.backward()
    # d/dlogp of -ratio * A / N = -A * ratio / 5 where unclipped; 0 where clipped or padded
    assert rows(logp.grad) == approx([[-1.1 / 5, 0.0, 0.0], [-2.0 * 0.5 / 5, 1.5 / 5, 0.0]])
    assert old.grad is None
    assert adv.grad is None


def test_ppo_on_fresh_data_has_the_reinforce_gradient():
    logp = torch.tensor([[-1.0, -2.0, G], [-0.5, G, G]], requires_grad=True)
    adv = torch.tensor([[1.0, 0.5, G], [-2.0, G, G]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = reinforce_policy_loss(logp, adv, mask)
    assert loss.item() == approx((-1.0 * -1.0 - 0.5 * -2.0 + 2.0 * -0.5) / 3)  # 1/3
    assert stats["trained_advantage_mean"].item() == approx((1.0 + 0.5 - 2.0) / 3)
    loss.backward()
    assert rows(logp.grad) == approx([[-1.0 / 3, -0.5 / 3, 0.0], [2.0 / 3, 0.0, 0.0]])
    reinforce_grad = logp.grad.clone()
    logp.grad = None
    loss, stats = ppo_policy_loss(logp, logp.detach(), adv, mask)  # ratio = 1
    loss.backward()
    assert rows(logp.grad) == approx(rows(reinforce_grad))
    assert stats["clip_fraction"].item() == 0.0 and stats["approx_kl"].item() == approx(0.0)


def test_value_loss_clipped_and_unclipped():
    # t0: V-V_old = 0.1 inside the clip          0.5 * 0.5^2          = 0.125
    # t1: V_clip = 1.2, (1.2-2)^2 = 0.64 > 0.25   0.5 * 0.64           = 0.32 (clipped)
    # t2: V_clip = 1.2, (0.2)^2 = 0.04 < 0.25     0.5 * 0.25           = 0.125
    # t3: V_clip = 0.8, (0.3)^2 = 0.09 < 0.25     0.5 * 0.25           = 0.125
    values = torch.tensor([[1.0, 1.5, 1.5], [0.0, G, G]], requires_grad=True)
    old = torch.tensor([[0.9, 1.0, 1.0], [1.0, G, G]])
    returns = torch.tensor([[1.5, 2.0, 1.0], [0.5, G, float("inf")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_eps=0.2)
    assert loss.item() == approx((0.125 + 0.32 + 0.125 + 0.125) / 4)
    assert stats["value_clip_fraction"].item() == approx(1 / 4)
    loss.backward()
    # gradient (V - R) / 4 where the unclipped error is used, 0 where the clipped one wins
    assert rows(values.grad) == approx([[-0.5 / 4, 0.0, 0.5 / 4], [-0.5 / 4, 0.0, 0.0]])
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_eps=None)
    assert loss.item() == approx(0.5 * (0.25 + 0.25 + 0.25 + 0.25) / 4)
    assert stats["value_clip_fraction"].item() == 0.0


def test_losses_with_a_global_token_count_accumulate_exactly():
    logp, old = ppo_inputs()
    full, _ = ppo_policy_loss(logp, old, ADV, PPO_MASK)
    # two micro-batches (one row each), each divided by the 5 tokens of the whole batch
    micro = [(logp[i : i + 1], old[i : i + 1], ADV[i : i + 1], PPO_MASK[i : i + 1]) for i in range(2)]
    parts = [ppo_policy_loss(*m, num_tokens=5)[0] for m in micro]
    assert (parts[0] + parts[1]).item() == approx(full.item())
    # the mean of per-micro-batch means would be a different objective (rows of 3 and 2 tokens)
    means = [ppo_policy_loss(*m)[0] for m in micro]
    assert ((means[0] + means[1]) / 2).item() != approx(full.item())


def test_losses_on_a_fully_masked_batch_are_finite_zeros():
    empty = torch.zeros(2, 3, dtype=torch.long)
    logp = torch.tensor([[G, -G, 0.0], [float("inf"), 1.0, 2.0]], requires_grad=True)
    values = torch.tensor([[G, float("inf"), 0.0], [1.0, 2.0, 3.0]], requires_grad=True)
    losses = [
        ppo_policy_loss(logp, logp.detach() * 0, ADV, empty),
        reinforce_policy_loss(logp, ADV, empty),
        clipped_value_loss(values, values.detach() * 0, values.detach(), empty),
    ]
    for loss, stats in losses:
        assert loss.item() == 0.0
        assert all(torch.isfinite(v) and v.item() == 0.0 for v in stats.values())
        loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad == 0).all()
    assert torch.isfinite(values.grad).all() and (values.grad == 0).all()
