"""Entry-point wrapper: user mistakes (bad data, bad options) end with one clear line, not a
traceback; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from rlhf_data.errors import DataError
from training.config import ConfigError

T = TypeVar("T")


def run_cli(main: Callable[[], T]) -> T:
    """``main()``'s result; a ``DataError`` or ``ConfigError`` exits with status 2 and one line."""
    try:
        return main()
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
