"""What goes wrong with data, said in one line that points at the file, the row and the field.

A ``DataError`` is raised by the readers (a file or a row that cannot be parsed) and by the schema
validators (a row whose fields are wrong). Validators see only a record, so they raise without a
location; ``load_rows`` adds the file and row with ``DataError.at``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# How many skipped rows a summary names before it says "and N more" (a log line, not a report).
SUMMARY_LIMIT = 10


def type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for "expected X, got Y"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


class DataError(ValueError):
    """A data file, row or field that cannot be used.

    ``row`` is 1-based: the line number for ``.jsonl`` (and for a ``.json`` file that is not valid
    JSON), otherwise the element / row index + 1. ``row`` is None for a problem with the whole file,
    ``field`` is None for a problem with the whole row.
    """

    def __init__(self, path: str | None, row: int | None, field: str | None, reason: str):
        self.path = path
        self.row = row
        self.field = field
        self.reason = reason
        super().__init__(self._line())

    def _line(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path if self.row is None else f"{self.path}:{self.row}"
        elif self.row is not None:
            where = f"row {self.row}"
        what = self.reason if self.field is None else f"field {self.field!r}: {self.reason}"
        return f"{where}: {what}" if where else what

    def __str__(self) -> str:
        return self._line()

    def __reduce__(self):
        # Keep the fields when the error crosses a process boundary (Ray, multiprocessing).
        return (type(self), (self.path, self.row, self.field, self.reason))

    def at(self, path: str, row: int) -> "DataError":
        """The same error located in ``path`` at ``row`` (the validators do not know where they are)."""
        return DataError(path, row, self.field, self.reason)


@dataclass
class SkipReport:
    """What ``load_rows(..., skip_bad_rows=True)`` left out, for one log line."""

    total: int = 0  # rows read (parsed or not)
    kept: int = 0
    skipped: list[DataError] = field(default_factory=list)

    def summary(self) -> str:
        if not self.skipped:
            return f"kept all {self.total} rows"
        named = "; ".join(str(e) for e in self.skipped[:SUMMARY_LIMIT])
        more = len(self.skipped) - SUMMARY_LIMIT
        if more > 0:
            named += f"; and {more} more"
        return f"skipped {len(self.skipped)} of {self.total} rows ({named})"
