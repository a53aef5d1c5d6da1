import math

import pytest
import torch

from training.reward_losses import (
    language_model_loss,
    logexp_with_lm_loss,
    pairwise_logistic_loss,
    reward_accuracy,
)


def test_pairwise_logistic_loss_hand_computed():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.0, 1.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log(2.0) + math.log1p(math.exp(2.0))) / 3
    assert pairwise_logistic_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    # a margin demands a larger gap: gap 1 with margin 1 costs what gap 0 costs
    margin = torch.tensor([1.0, 0.0, 0.0])
    got = pairwise_logistic_loss(chosen[:1], rejected[:1], margin[:1]).item()
    assert got == pytest.approx(math.log(2.0), abs=1e-6)


def test_pairwise_logistic_loss_is_stable_for_huge_gaps():
    chosen = torch.tensor([500.0, -500.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0])
    loss = pairwise_logistic_loss(chosen, rejected)
    assert loss.item() == pytest.approx(250.0)  # (0 + 500) / 2
    loss.backward()
    assert torch.isfinite(chosen.grad).all()
    assert chosen.grad.tolist() == pytest.approx([0.0, -0.5])
    # the literal formula of the seed system overflows here
    assert torch.isinf(torch.log(1 + torch.exp(torch.tensor(500.0))))


def test_gradient_matches_bradley_terry():
    # d/dr_c of -log sigma(r_c - r_r) = -(1 - sigma(gap))
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([-0.4])
    pairwise_logistic_loss(chosen, rejected).backward()
    assert chosen.grad.item() == pytest.approx(-(1 - torch.sigmoid(torch.tensor(0.7)).item()), abs=1e-6)


def test_language_model_loss_counts_only_masked_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    assert language_model_loss(logp, mask).item() == pytest.approx(2.5)
    assert language_model_loss(logp, torch.zeros_like(mask)).item() == 0.0


def test_logexp_with_lm_loss_combines_parts():
    chosen, rejected = torch.tensor([1.0]), torch.tensor([0.0])
    logp, mask = torch.tensor([[-2.0, -4.0]]), torch.tensor([[1, 1]])
    total, parts = logexp_with_lm_loss(chosen, rejected, None, logp, mask, lm_loss_coef=0.5)
    assert parts["rm_loss"].item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert parts["lm_loss"].item() == pytest.approx(3.0)
    assert total.item() == pytest.approx(parts["rm_loss"].item() + 1.5, abs=1e-6)


def test_reward_accuracy_ties_are_wrong():
    assert reward_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])).item() == pytest.approx(1 / 3)
