"""Per-token estimators of KL(pi || pi_ref) from the log-probs of *sampled* tokens.

Schulman, "Approximating KL divergence" (2020, http://joschu.net/blog/kl-approx.html). The tokens
a_t are sampled from pi, and with the probability ratio r = pi_ref(a_t|s_t) / pi(a_t|s_t),
KL(pi || pi_ref) = E_{a~pi}[-log r]. The full-vocabulary KL would need both models' logits at
every position; these estimators need only the two log-probs the actor and reference already
return for the sampled token.

    k1 = -log r            = logp - ref_logp                 unbiased, high variance, can be < 0
    k2 = (log r)^2 / 2                                       biased, low variance, >= 0
    k3 = (r - 1) - log r   = exp(ref_logp - logp) - (ref_logp - logp) - 1
                                                             unbiased (E[r - 1] = 0), >= 0

All return fp32 ``(B, T)`` tensors and are differentiable (usable as a KL *loss*); as a reward
penalty the caller passes detached log-probs.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(a) - log pi_ref(a) (Schulman 2020).

    Unbiased for KL(pi || pi_ref) under a ~ pi but negative on tokens the reference prefers; only
    its expectation is >= 0. The estimator of the InstructGPT / OpenRLHF / original ReMax reward.
    """
    return log_probs.float() - ref_log_probs.float()


def kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi(a) - log pi_ref(a))^2 / 2 (Schulman 2020).

    Non-negative and low-variance but biased: its expectation is an f-divergence that matches the
    KL to second order only when the two policies are close (verl's ``kl_penalty="mse"``).
    """
    return 0.5 * (log_probs.float() - ref_log_probs.float()) ** 2


def kl_k3(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, log_ratio_clip: float | None = 10.0
) -> torch.Tensor:
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 = (r - 1) - log r (Schulman 2020).

    Unbiased and non-negative for every token (x - 1 >= log x), with lower variance than k1:
    (r - 1) is a zero-mean control variate. exp() overflows where the reference is far more
    confident than the policy, so the log-ratio is clamped to +-``log_ratio_clip`` first (verl's
    ``low_var_kl`` clamps too); ``None`` disables the clamp. Outside the clamp the gradient is 0.
    """
    log_ratio = ref_log_probs.float() - log_probs.float()
    if log_ratio_clip is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clip, log_ratio_clip)
    return torch.exp(log_ratio) - log_ratio - 1.0


def kl_penalty(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    kind: str = "k1",
    mask: torch.Tensor | None = None,
    log_ratio_clip: float | None = 10.0,
) -> torch.Tensor:
    """The per-token KL estimate ``kind`` in {"k1", "k2", "k3"} (Schulman 2020), 0 where ``mask`` is 0.

    ``log_ratio_clip`` applies to k3 only (k1 and k2 cannot overflow). Masking selects instead of
    multiplying, so whatever the padding holds (even -inf log-probs) gives 0 there.
    """
    if kind == "k1":
        kl = kl_k1(log_probs, ref_log_probs)
    elif kind == "k2":
        kl = kl_k2(log_probs, ref_log_probs)
    elif kind == "k3":
        kl = kl_k3(log_probs, ref_log_probs, log_ratio_clip)
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl
