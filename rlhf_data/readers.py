"""Data files -> raw records with their row numbers -> validated rows.

``read_records`` reads one local file or folder:

* ``.jsonl``: one JSON object per line; blank lines are ignored, row = line number. Lines are
  decoded one by one, so a broken line (bad JSON, not an object, invalid UTF-8) becomes a
  ``DataError`` for that row and the other lines still load;
* ``.json``: one list of objects, row = element index + 1;
* ``.parquet``: row = row index + 1;
* a folder written by ``datasets.Dataset.save_to_disk`` (it holds ``dataset_info.json`` /
  ``state.json``), row = row index + 1.

Problems with a whole file (missing, unknown type, no rows, a ``.json`` that is not valid JSON or
not a list) raise ``DataError`` at once: no row of such a file can be trusted.

``load_rows`` runs a schema validator over every record of one or more files, before training
starts, and either stops at the first bad row or skips and reports the bad rows.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Callable, Iterator

from rlhf_data.errors import DataError, SkipReport, type_name

Record = tuple[int, dict | DataError]

# Rows per Arrow batch when reading parquet / save_to_disk folders: bounded memory, few Python calls.
_BATCH_ROWS = 1024
SUPPORTED = ".jsonl, .json, .parquet, or a folder written by datasets' save_to_disk"


def read_records(path: str | os.PathLike) -> Iterator[Record]:
    """``(row, record)`` for every row of ``path``; ``record`` is a dict, or a ``DataError`` for a
    row that cannot be parsed. File-level problems raise ``DataError`` (the file and its type are
    checked on the call, the contents while iterating)."""
    name = os.fspath(path)
    p = Path(name)
    if not p.exists():
        raise DataError(name, None, None, "no such file or folder")
    if p.is_dir():
        if (p / "dataset_dict.json").exists():
            splits = ", ".join(sorted(d.name for d in p.iterdir() if d.is_dir())) or "none"
            raise DataError(name, None, None, f"a DatasetDict folder (splits: {splits}); pass one split's "
                            f"folder, e.g. {p / 'train'}")
        if not ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
            raise DataError(name, None, None, "a folder without dataset_info.json or state.json; expected "
                            f"one of {SUPPORTED}")
        return _read_saved_dataset(name)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(name)
    if suffix == ".json":
        return _read_json(name)
    if suffix == ".parquet":
        return _read_parquet(name)
    raise DataError(name, None, None, f"unknown file type {suffix or '(no extension)'!r}; expected {SUPPORTED}")


def _no_rows(name: str) -> DataError:
    return DataError(name, None, None, "no rows (empty file)")


def _read_jsonl(name: str) -> Iterator[Record]:
    seen_rows = False
    with open(name, "rb") as f:  # bytes: a line of invalid UTF-8 spoils only that line
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                # Without its line ending, so json's column numbers count within this line.
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                seen_rows = True
                yield line_no, DataError(name, line_no, None, f"invalid UTF-8 (byte {e.start + 1} of the line)")
                continue
            if not text.strip():
                continue
            seen_rows = True
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, DataError(name, line_no, None, f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(value, dict):
                yield line_no, DataError(name, line_no, None, f"expected a JSON object, got {type_name(value)}")
                continue
            yield line_no, value
    if not seen_rows:
        raise _no_rows(name)


def _read_json(name: str) -> Iterator[Record]:
    data = Path(name).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if not data.strip():
        raise _no_rows(name)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(name, data[: e.start].count(b"\n") + 1, None, "invalid UTF-8") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; one object per line is JSON Lines: name the file .jsonl" if e.msg == "Extra data" else ""
        raise DataError(name, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno}){hint}") from None
    if not isinstance(value, list):
        raise DataError(name, None, None, f"expected a list of objects at the top level, got {type_name(value)}")
    if not value:
        raise DataError(name, None, None, "no rows (empty list)")
    for index, item in enumerate(value):
        if isinstance(item, dict):
            yield index + 1, item
        else:
            yield index + 1, DataError(name, index + 1, None, f"expected a JSON object, got {type_name(item)}")


def _read_parquet(name: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(name)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(name, None, None, f"cannot read as parquet: {e}") from None
    if parquet.metadata.num_rows == 0:
        raise _no_rows(name)
    row = 0
    for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _read_saved_dataset(name: str) -> Iterator[Record]:
    import datasets

    try:
        dataset = datasets.load_from_disk(name)
    except Exception as e:  # a damaged folder: say which one instead of datasets' internals
        raise DataError(name, None, None, f"cannot load with datasets.load_from_disk: {e}") from None
    if len(dataset) == 0:
        raise _no_rows(name)
    row = 0
    for table in dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS):
        for record in table.to_pylist():
            row += 1
            yield row, record


def split_paths(paths: str | os.PathLike | list[str | os.PathLike]) -> list[str]:
    """One path or a list of them -> a list of path strings. A string is one path: a flag's
    comma-separated files arrive as a list (``training.config``'s list fields)."""
    if isinstance(paths, (str, os.PathLike)):
        items = [os.fspath(paths)]
    else:
        items = [os.fspath(p) for p in paths]
    items = [p.strip() for p in items if p.strip()]
    if not items:
        raise ValueError(f"no data paths given (got {paths!r})")
    return items


def load_rows(
    paths: str | os.PathLike | list[str | os.PathLike],
    validate: Callable[[dict], dict],
    skip_bad_rows: bool = False,
) -> tuple[list[dict], SkipReport]:
    """Every row of every file in ``paths``, validated; each row also has ``_source`` (its path)
    and ``_row`` (its row number) so later errors can point back to it.

    Without ``skip_bad_rows`` the first bad row raises its ``DataError``, so a broken file stops
    the run before any training starts. With it, bad rows are left out and listed in the
    ``SkipReport``; a file whose rows are all bad still raises (that is a wrong ``--*_key`` flag or
    the wrong file, not noise). File-level problems always raise.
    """
    rows: list[dict] = []
    report = SkipReport()
    for path in split_paths(paths):
        read_before, kept_before, skipped_before = report.total, report.kept, len(report.skipped)
        for row_no, record in read_records(path):
            report.total += 1
            if isinstance(record, DataError):
                error = record
            else:
                try:
                    rows.append({**validate(record), "_source": path, "_row": row_no})
                    report.kept += 1
                    continue
                except DataError as e:
                    error = e.at(path, row_no)
            if not skip_bad_rows:
                raise error
            report.skipped.append(error)
        if report.kept == kept_before:
            count = report.total - read_before
            first = report.skipped[skipped_before]
            raise DataError(path, None, None, f"all {count} rows are invalid, the first: {first}")
    return rows, report
