"""Prompts for RL: files -> validated rows (``rlhf_data``, file/row/field errors) -> chat-templated
token ids within ``--prompt_max_len`` -> a deterministic order of rollout batches.

The order is a pure function of (seed, episode), so the batch of iteration k is known without
replaying the run: a resumed run continues with exactly the prompts an uninterrupted run would use.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial

from rlhf_data import validate_prompt
from rlhf_data.mixing import train_eval_rows
from rlhf_data.tokenize import render_prompt_ids, truncate_prompt
from training.config import ConfigError


@dataclass
class PromptSet:
    prompts: list[list[int]]  # token ids
    messages: list[list[dict]]  # the chat turns (for logs and samples)
    truncated: int = 0
    dropped: int = 0
    # the token that ends the assistant turn these prompts open (the tokenizer's EOS): where a
    # reward model reads a response's score (rlhf_data.tokenize.end_response)
    end_token_id: int | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def tokenize_prompts(rows: list[dict], tokenizer, max_len: int, overflow: str) -> PromptSet:
    """Render each row's ``message`` with the chat template; prompts over ``max_len`` tokens are
    left-truncated (keeping BOS) or dropped, and counted."""
    out = PromptSet([], [], end_token_id=tokenizer.eos_token_id)
    for row in rows:
        ids = render_prompt_ids(tokenizer, row["message"])
        if len(ids) > max_len:
            if overflow == "drop":
                out.dropped += 1
                continue
            ids, _ = truncate_prompt(ids, max_len, tokenizer.bos_token_id)
            out.truncated += 1
        out.prompts.append(ids)
        out.messages.append(row["message"])
    return out


def load_prompt_sets(cfg, tokenizer, log=print) -> tuple[PromptSet, PromptSet]:
    """(training prompts, evaluation prompts) from ``--prompt_data`` / ``--eval_prompt_data`` /
    ``--eval_split``; stops with a clear error before any worker starts."""
    train_rows, eval_rows, skipped = train_eval_rows(
        cfg.prompt_data, cfg.prompt_data_probs, partial(validate_prompt, key=cfg.input_key),
        eval_dataset=cfg.eval_prompt_data, eval_split=cfg.eval_split, skip_bad_rows=cfg.skip_bad_rows, seed=cfg.seed,
    )
    for line in skipped:
        log(f"[data] {line}")
    train = tokenize_prompts(train_rows, tokenizer, cfg.prompt_max_len, cfg.prompt_overflow)
    evals = tokenize_prompts(eval_rows[: cfg.max_eval_prompts], tokenizer, cfg.prompt_max_len, cfg.prompt_overflow)
    log(f"[data] {len(train)} training prompts ({train.truncated} truncated, {train.dropped} dropped over "
        f"{cfg.prompt_max_len} tokens), {len(evals)} evaluation prompts")
    if len(train) < cfg.rollout_batch_size:
        raise ConfigError(f"--prompt_data has {len(train)} usable prompts, fewer than --rollout_batch_size "
                         f"{cfg.rollout_batch_size}")
    return train, evals


def check_tokenizers_match(tokenizer, model_paths: list[str], flag: str) -> None:
    """The reward models (and critic) read the policy's token ids as they are: their tokenizers
    must be the policy's (same vocabulary), else every score is of gibberish; and the same EOS,
    the end-of-turn token a reward model was trained to read its score at (RL scores every
    response ending with the policy's)."""
    from transformers import AutoTokenizer


    vocab = tokenizer.get_vocab()
    for path in model_paths:
        other = AutoTokenizer.from_pretrained(path)
        if other.get_vocab() != vocab:
            raise ConfigError(f"{flag} {path}: its tokenizer differs from the policy's ({len(other)} vs "
                              f"{len(tokenizer)} tokens); reward models and critics must share the policy's tokenizer")
        if other.eos_token_id != tokenizer.eos_token_id:
            raise ConfigError(f"{flag} {path}: its EOS token {other.eos_token!r} differs from the policy's "
                              f"{tokenizer.eos_token!r}; responses end with the policy's, so the reward model "
                              "would read its score where it was not trained to")


class PromptSchedule:
    """Rollout batches of ``batch_size`` prompt indices: each episode a fresh seeded shuffle,
    the last partial batch of an episode dropped (every batch has the same size)."""

    def __init__(self, num_prompts: int, batch_size: int, num_episodes: int, seed: int):
        self.num_prompts, self.batch_size, self.num_episodes, self.seed = num_prompts, batch_size, num_episodes, seed
        self.per_episode = num_prompts // batch_size

    @property
    def total(self) -> int:
        return self.per_episode * self.num_episodes

    def batch(self, iteration: int) -> list[int]:
        episode, k = divmod(iteration, self.per_episode)
        order = list(range(self.num_prompts))
        random.Random(self.seed * 7919 + episode).shuffle(order)
        return order[k * self.batch_size:(k + 1) * self.batch_size]
