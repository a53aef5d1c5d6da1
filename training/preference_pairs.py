"""The pair trainers' data (``train_rm_llama2.py``, ``train_dpo.py``): the data flags -> validated
rows -> tokenized train and eval pairs, every error raised before any process group starts."""

from __future__ import annotations

from functools import partial
from typing import Callable

from rlhf_data.mixing import train_eval_rows
from rlhf_data.tokenize import PreferencePair, tokenize_preference, tokenize_train_eval
from training.batches import check_fills_a_batch


def load_preference_pairs(cfg, tokenizer, validate: Callable[[dict], dict],
                          log=print) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(train pairs, eval pairs)`` from ``--dataset`` / ``--eval_dataset`` / ``--eval_split``,
    each row checked by ``validate``. A pair whose two sides are the same tokens within
    ``--max_len`` is an error (or a counted skip with ``--skip_bad_rows``)."""
    train_rows, eval_rows, skipped = train_eval_rows(
        cfg.dataset, cfg.dataset_probs, validate,
        eval_dataset=cfg.eval_dataset, eval_split=cfg.eval_split, skip_bad_rows=cfg.skip_bad_rows, seed=cfg.seed,
    )
    for line in skipped:
        log(f"[data] {line}")

    def unusable(pair):  # texts that differ only beyond --max_len give the loss nothing to separate
        same = pair.chosen == pair.rejected
        return f"chosen and rejected are the same tokens within --max_len {cfg.max_len}" if same else None

    train, eval_ = tokenize_train_eval(train_rows, eval_rows, partial(tokenize_preference, tokenizer, max_len=cfg.max_len),
                                       unusable, cfg.chosen_key, cfg.skip_bad_rows, log)
    check_fills_a_batch(len(train), cfg.train_batch_size, "training pairs")
    log(f"[data] {len(train)} training pairs, {len(eval_)} eval pairs, "
        f"{sum(p.truncated for p in train)} truncated to {cfg.max_len} tokens")
    return train, eval_
