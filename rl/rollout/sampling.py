"""What a rollout engine takes and gives: ``SamplingConfig`` in, per-prompt groups of ``Rollout``
out (see the package docstring for which log-probs they carry)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

GREEDY_EPS = 1e-5  # vLLM treats temperature < 1e-5 as greedy; so do we
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


class BackendUnavailableError(ImportError):
    """The rollout backend's package is not installed."""


@dataclass
class Rollout:
    prompt_ids: list[int]  # the prompt as the engine saw it (after left truncation)
    response_ids: list[int]  # sampled tokens, the stop token included when finish_reason == "stop"
    response_logprobs: list[float] | None  # sampler's log-prob of each sampled token (see module doc)
    finish_reason: str  # "stop" (EOS / stop token) or "length" (max_new_tokens)


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None  # prompt i gets seed + i * n (its k-th sample seed + i * n + k); None: random
    n: int = 1  # samples per prompt

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def logprob_temperature(self) -> float:
        """The temperature the reported log-probs include (1 for greedy): pass it to the trainer's
        ``Actor(..., temperature=...)`` when comparing."""
        return 1.0 if self.is_greedy else self.temperature

    def greedy(self) -> "SamplingConfig":
        """The same limits, argmax decoding, one sample per prompt (ReMax's baseline)."""
        return replace(self, temperature=0.0, top_p=1.0, top_k=-1, n=1)


def flatten(rollouts: Sequence[Rollout] | Sequence[Sequence[Rollout]]) -> list[Rollout]:
    """Per-prompt groups (``generate``'s result) or a flat list -> a flat list."""
    out: list[Rollout] = []
    for r in rollouts:
        if isinstance(r, Rollout):
            out.append(r)
        else:
            out.extend(r)
    return out
