"""What both engines share: the stop tokens, prompt preparation (left truncation, counted) and
the engine statistics."""

from __future__ import annotations

from typing import Any, Sequence

from rl.rollout.sampling import Rollout, SamplingConfig
from rlhf_data.tokenize import truncate_prompt


def resolve_stop_token_ids(generation_config, model_config, tokenizer) -> list[int]:
    """The tokens a rollout stops at (and keeps as its last token): the generation config's EOS
    ids (else the model config's, else the tokenizer's), plus the tokenizer's EOS. The tokenizer's
    EOS is the end-of-turn token of chat templates (ChatML's ``<|im_end|>`` in SmolLM2, where it is
    also the pad token), the token reward models are trained to read a response's score at
    (``rlhf_data.tokenize.end_response``), so it must stop generation even when a config omits it."""

    def first(*values):
        return next((v for v in values if v is not None), None)

    eos = first(getattr(generation_config, "eos_token_id", None), getattr(model_config, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None))
    ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in ids:
        ids.append(tok_eos)
    return ids


def model_stop_token_ids(model_dir: str, tokenizer=None) -> list[int]:
    """``resolve_stop_token_ids`` for the model folder ``model_dir`` (its generation config may be
    absent); ``tokenizer`` defaults to the folder's."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json
        generation_config = None
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_dir)
    return resolve_stop_token_ids(generation_config, AutoConfig.from_pretrained(model_dir), tokenizer)


def check_lengths(prompt_max_len: int, generate_max_len: int) -> None:
    if prompt_max_len < 1 or generate_max_len < 1:
        raise ValueError(f"prompt_max_len and generate_max_len must be >= 1, got {prompt_max_len}, {generate_max_len}")


def new_stats() -> dict[str, Any]:
    return {
        "start_seconds": 0.0,
        "prompts": 0,
        "truncated_prompts": 0,
        "rollouts": 0,
        "generated_tokens": 0,
        "generate_seconds": 0.0,
        "last_generate_tokens_per_s": 0.0,
        "weight_updates": 0,
        "last_update_seconds": 0.0,
    }


class EngineBase:
    prompt_max_len: int
    generate_max_len: int
    bos_token_id: int | None
    stats: dict[str, Any]

    def _prepare_prompts(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[int]]:
        if sampling.max_new_tokens > self.generate_max_len:
            raise ValueError(f"max_new_tokens {sampling.max_new_tokens} exceeds the engine's generate_max_len "
                             f"{self.generate_max_len}")
        prompts = []
        for i, ids in enumerate(prompt_token_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty")
            ids, cut = truncate_prompt(ids, self.prompt_max_len, self.bos_token_id)
            self.stats["truncated_prompts"] += int(cut)
            prompts.append(ids)
        return prompts

    def _account(self, groups: list[list[Rollout]], seconds: float) -> None:
        tokens = sum(len(r.response_ids) for g in groups for r in g)
        self.stats["prompts"] += len(groups)
        self.stats["rollouts"] += sum(len(g) for g in groups)
        self.stats["generated_tokens"] += tokens
        self.stats["generate_seconds"] += seconds
        self.stats["last_generate_tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0

    def generate_batches(
        self, requests: Sequence[tuple[Sequence[Sequence[int]], SamplingConfig]]
    ) -> list[list[list[Rollout]]]:
        """Several ``(prompts, sampling)`` requests; each request's groups, as ``generate`` gives."""
        return [self.generate(prompts, sampling) for prompts, sampling in requests]

    def get_stats(self) -> dict[str, Any]:
        """A copy of ``stats`` (Ray actors expose methods, not attributes)."""
        return dict(self.stats)
