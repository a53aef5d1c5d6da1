"""From the judge's votes in both orders to a preference, its agreement and its strength.

Each vote shows the two responses in one order (A/B = 1/2, or swapped) and yields
``p_first``: the judge's probability that response **1** (of the input pair) is better, after
mapping a swapped order back. With verdict-token log-probabilities,

    p(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B)) = sigmoid(lp_A - lp_B)

read at the verdict label (both labels scored in the same context); in a swapped vote
``p_first = 1 - p(A)``. Without log-probs a parsed verdict gives ``p_first`` of 1 or 0.

Aggregation over the votes (orders alternate, so position bias cancels in the mean):

    p = mean_k p_first_k                  probability that response 1 is better
    chosen = 1 if p >= 0.5 else 2;  strength s = max(p, 1 - p)  in [0.5, 1]
    margin = log(s / (1 - s))             log-odds, clipped to [0, MAX_MARGIN]

The margin is the Bradley-Terry reward gap that would give probability s
(sigmoid(margin) = s), which is exactly what the RM loss with ``--use_margin`` asks the reward
model to exceed. Agreement is the fraction of votes whose own preference (p_first_k vs 0.5)
matches the chosen response; pairs below ``min_agreement`` are rejected, as are exact ties.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MAX_MARGIN = 10.0


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class Vote:
    swapped: bool  # True: response 2 was shown as A
    verdict: int | None  # parsed from the text: 0 = shown-as-A, 1 = shown-as-B, None = none
    p_a: float | None  # judge probability of label A from log-probs, None without log-probs

    @property
    def p_first(self) -> float | None:
        """Probability that response 1 of the input pair is better, by this vote."""
        if self.p_a is not None:
            p_shown_first = self.p_a
        elif self.verdict is not None:
            p_shown_first = 1.0 if self.verdict == 0 else 0.0
        else:
            return None
        return 1.0 - p_shown_first if self.swapped else p_shown_first


@dataclass(frozen=True)
class Preference:
    chosen: int | None  # 0 or 1: index of the preferred response in the input pair; None: rejected
    prob_first: float  # p: probability that response 1 is better
    strength: float  # max(p, 1 - p)
    margin: float  # log-odds of the strength, clipped
    agreement: float  # fraction of counted votes agreeing with `chosen`
    votes_counted: int
    reject_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def margin_from_strength(strength: float, max_margin: float = MAX_MARGIN) -> float:
    """log(s / (1 - s)), the reward gap whose sigmoid is s; 0 at s = 0.5, capped at s -> 1."""
    s = min(max(strength, 0.5), 1.0)
    if s >= 1.0:
        return max_margin
    return min(math.log(s / (1.0 - s)), max_margin)


def aggregate_votes(votes: list[Vote], min_agreement: float = 0.5) -> Preference:
    counted = [v.p_first for v in votes if v.p_first is not None]
    if not counted:
        return Preference(None, 0.5, 0.5, 0.0, 0.0, 0, "no usable vote")
    p = sum(counted) / len(counted)
    if p == 0.5:
        return Preference(None, p, 0.5, 0.0, 0.5, len(counted), "tie")
    chosen = 0 if p > 0.5 else 1
    agree = sum((q > 0.5) == (chosen == 0) and q != 0.5 for q in counted) / len(counted)
    strength = max(p, 1.0 - p)
    pref = Preference(chosen, p, strength, margin_from_strength(strength), agree, len(counted))
    if agree < min_agreement:
        return Preference(None, p, strength, pref.margin, agree, len(counted),
                          f"agreement {agree:.2f} below min_agreement {min_agreement:.2f}")
    return pref
