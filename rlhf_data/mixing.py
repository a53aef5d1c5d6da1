"""Several datasets -> one training stream, by probability; and a held-out eval split.

``--dataset D1,D2 --dataset_probs 0.7,0.3`` means: draw each training row from D1 with
probability 0.7 and from D2 with probability 0.3. The probabilities are mixing weights, not a
train/eval split (the seed system misused them as a split fraction); the eval set comes from
``split_eval``.

Mixing uses ``stopping_strategy="all_exhausted"``: sampling goes on until every dataset has been
used at least once, so the rows of a dataset drawn more often than its size repeat. Hence split
off eval rows *before* mixing: splitting a mixture could put copies of one row on both sides.
"""

from __future__ import annotations

import math
from typing import Sequence

import datasets


def mixing_weights(probs: Sequence[float], num_datasets: int) -> list[float]:
    """``[0.7, 0.3]`` checked against ``num_datasets`` and normalised to sum 1 (the flag's comma
    string is parsed by the config: ``training.config``'s list fields)."""
    if isinstance(probs, str):
        raise ValueError(f"--dataset_probs {probs!r}: expected a list of numbers, not a string")
    probs = list(probs)
    if len(probs) != num_datasets:
        raise ValueError(f"--dataset_probs has {len(probs)} value(s) {probs} for {num_datasets} dataset(s); "
                         "give one mixing weight per dataset")
    for i, p in enumerate(probs):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"--dataset_probs: weight {i + 1} is {p!r}; every weight must be a positive number")
    total = sum(probs)
    return [p / total for p in probs]


def mix_datasets(
    row_lists: Sequence[list[dict] | datasets.Dataset],
    probs: Sequence[float] | None,
    seed: int,
) -> datasets.Dataset:
    """One ``datasets.Dataset`` drawing from each row list with probability ``probs`` (mixing
    weights, normalised; see the module docstring). One list -> that dataset; several lists and no
    ``probs`` (None or empty) -> their concatenation (every row once, in order)."""
    if not row_lists:
        raise ValueError("no datasets to mix")
    parts = []
    for i, rows in enumerate(row_lists):
        if len(rows) == 0:
            raise ValueError(f"dataset {i + 1} of {len(row_lists)} has no rows")
        parts.append(rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows)))
    weights = None if probs is None or len(probs) == 0 else mixing_weights(probs, len(parts))
    if len(parts) == 1:
        return parts[0]
    if weights is None:
        return datasets.concatenate_datasets(parts)
    return datasets.interleave_datasets(parts, probabilities=weights, seed=seed, stopping_strategy="all_exhausted")


def split_eval(
    dataset: datasets.Dataset, eval_split: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(train, eval)``: a shuffled ``eval_split`` fraction of the rows (rounded down) held out."""
    if not 0 < eval_split < 1:
        raise ValueError(f"eval_split must be between 0 and 1 (exclusive), got {eval_split}")
    n = len(dataset)
    # round() first: 0.29 * 100 is 28.999999999999996 in floating point.
    n_eval = math.floor(round(eval_split * n, 6))
    if n_eval == 0 or n_eval == n:
        side = "eval" if n_eval == 0 else "train"
        raise ValueError(f"--eval_split {eval_split} of {n} rows leaves the {side} set empty")
    split = dataset.train_test_split(test_size=n_eval, shuffle=True, seed=seed)
    return split["train"], split["test"]


def train_eval_rows(
    dataset: str | Sequence[str],
    dataset_probs: Sequence[float] | None,
    validate,
    *,
    eval_dataset: str | Sequence[str] | None = None,
    eval_split: float = 0.0,
    skip_bad_rows: bool = False,
    seed: int = 42,
) -> tuple[list[dict], list[dict], list[str]]:
    """What the trainers' data flags describe: ``(train rows, eval rows, skip summaries)``.

    Every file of ``dataset`` (one path or a list) is one dataset: validated, its ``eval_split``
    fraction held out (before mixing, see the module docstring), then the training parts are mixed
    by ``dataset_probs``. ``eval_dataset`` files, when given, are the eval set instead.
    """
    from rlhf_data.errors import DataError
    from rlhf_data.readers import load_rows, split_paths

    summaries: list[str] = []
    train_parts, eval_parts = [], []
    for path in split_paths(dataset):
        rows, report = load_rows(path, validate, skip_bad_rows)
        if report.skipped:
            summaries.append(f"{path}: {report.summary()}")
        part = datasets.Dataset.from_list(rows)
        if eval_split and not eval_dataset:
            try:
                part, held_out = split_eval(part, eval_split, seed)
            except ValueError as e:  # too few rows for this split: the file's problem, said as such
                raise DataError(path, None, None, str(e)) from None
            eval_parts.extend(held_out.to_list())
        train_parts.append(part)
    try:
        train = mix_datasets(train_parts, dataset_probs, seed).to_list()
    except ValueError as e:  # a bad --dataset_probs, when the caller did not check it first
        raise DataError(None, None, None, str(e)) from None
    if eval_dataset:
        eval_rows, report = load_rows(eval_dataset, validate, skip_bad_rows)
        if report.skipped:
            summaries.append(f"{','.join(split_paths(eval_dataset))}: {report.summary()}")
        eval_parts = eval_rows
    return train, eval_parts, summaries
