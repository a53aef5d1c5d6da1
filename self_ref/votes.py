"""From the judge's votes in both orders to a preference, its agreement and its strength.

Each vote shows the two responses in one order (A/B = 1/2, or swapped) and yields
``p_first``: the judge's probability that response **1** (of the input pair) is better, after
mapping a swapped order back. With verdict-token log-probabilities,

    p(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B)) = sigmoid(lp_A - lp_B)

read at the verdict label (both labels scored in the same context); in a swapped vote
``p_first = 1 - p(A)``. Without log-probs a parsed verdict gives ``p_first`` of 1 or 0.

Aggregation over the votes (orders alternate, so position bias cancels in the mean), with
``method="mean_prob"`` (the default)

    p = mean_k p_first_k                  probability that response 1 is better

or ``method="log_odds"`` (a product of the votes' odds; a vote's log-odds clipped to +-MAX_MARGIN)

    p = sigmoid(mean_k logit(p_first_k))

and then

    chosen = 1 if p > 0.5 else 2;  strength s = max(p, 1 - p)  in [0.5, 1]
    margin = log(s / (1 - s))             log-odds, clipped to [0, MAX_MARGIN]

Position-bias correction (``debias_votes``): a judge that favours the first slot adds the same
log-odds b to label A whatever it is shown, logit p_a = b + d, where d is what the pair's contents
say (+d in the order A/B, -d in B/A). With both orders judged, the pair's own estimate of b is the
mean of the two orders' mean log-odds,

    b = (mean_{A/B votes} logit p_a + mean_{B/A votes} logit p_a) / 2

and each vote is corrected to p_a' = sigmoid(logit p_a - b). With one vote per order both votes
then agree by construction, so position consistency is measured on the raw votes.

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


def logit(p: float, clip: float = MAX_MARGIN) -> float:
    """log(p / (1 - p)), clipped to [-clip, clip] (a text-only vote has p = 0 or 1)."""
    if p <= 0.0:
        return -clip
    if p >= 1.0:
        return clip
    return max(-clip, min(clip, math.log(p) - math.log1p(-p)))


def debias_votes(votes: list[Vote]) -> list[Vote]:
    """The votes with the pair's position bias removed from their log-odds (module docstring);
    unchanged unless both orders have votes with a probability of label A."""
    scored = [v for v in votes if v.p_a is not None]
    ab = [logit(v.p_a) for v in scored if not v.swapped]
    ba = [logit(v.p_a) for v in scored if v.swapped]
    if not ab or not ba:
        return list(votes)
    bias = (sum(ab) / len(ab) + sum(ba) / len(ba)) / 2
    return [Vote(v.swapped, v.verdict, sigmoid(logit(v.p_a) - bias)) if v.p_a is not None else v for v in votes]


AGGREGATES = ("mean_prob", "log_odds")


def aggregate_votes(votes: list[Vote], min_agreement: float = 0.5, method: str = "mean_prob") -> Preference:
    counted = [v.p_first for v in votes if v.p_first is not None]
    if method not in AGGREGATES:
        raise ValueError(f"unknown aggregate {method!r}; expected one of {', '.join(AGGREGATES)}")
    if not counted:
        return Preference(None, 0.5, 0.5, 0.0, 0.0, 0, "no usable vote")
    if method == "log_odds":
        p = sigmoid(sum(logit(q) for q in counted) / len(counted))
    else:
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
