"""Entry-point wrapper: user mistakes (bad data, bad options) end with one clear line, not a
traceback; anything else is a bug and keeps its traceback.

Under torchrun every rank finds the same mistake; only rank 0 says it (torchrun then adds its own
report of the failed ranks). Every rank exits with status 2.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

from rlhf_data.errors import DataError
from training.config import ConfigError

T = TypeVar("T")


def user_error(message: str) -> None:
    """Print one ``error:`` line (rank 0 only) and exit with status 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def run_cli(main: Callable[[], T]) -> T:
    """``main()``'s result; a ``DataError`` or ``ConfigError`` exits with status 2 and one line."""
    try:
        return main()
    except (DataError, ConfigError) as e:
        user_error(str(e))
