"""Append-only jsonl outputs that make long jobs resumable and lossless.

Each finished item is one row with an ``id``, written with a single ``write``, flushed and
fsynced; a rerun reads the ids already there (``read_done_ids``) and skips them. A kill can only
leave a partial *last* line, which ``read_done_ids`` cuts off before anything is appended.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rlhf_data.errors import DataError


def read_done_ids(path: Path) -> set[str]:
    """Ids already in ``path``. A partial last line (a kill mid-write) is cut off so appends stay
    valid jsonl; any other unreadable line is an error naming the line."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"[resume] {path}: dropping a partial last line ({len(data) - keep} bytes) left by an interrupted run",
              file=sys.stderr)
        data = data[:keep]
        with open(path, "r+b") as f:
            f.truncate(keep)
    ids: set[str] = set()
    for line_no, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ids.add(str(row["id"]))
        except (ValueError, KeyError, TypeError):
            raise DataError(str(path), line_no, None, "an output row that is not a JSON object with an 'id'; "
                            "fix or remove the line, then rerun") from None
    return ids


class AppendOnlyJsonl:
    """One ``write`` per row, flushed, so a row is either whole on disk or (after a kill) partial
    on the last line only, which ``read_done_ids`` removes."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()
