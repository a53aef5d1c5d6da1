"""Entry-point wrapper: user mistakes (bad data, bad options) end with one clear line, not a
traceback; anything else is a bug and keeps its traceback.

Under torchrun every rank finds the same mistake; only rank 0 says it (torchrun then adds its own
report of the failed ranks). Every rank exits with status 2 (``training.config.exit_with_error``).
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Callable, TypeVar

from rlhf_data.errors import DataError
from training.config import ConfigError, exit_with_error

T = TypeVar("T")


def run_cli(main: Callable[[], T]) -> T:
    """``main()``'s result; a ``DataError`` or ``ConfigError`` exits with status 2 and one line;
    Ctrl-C exits with 130 and one line (from rank 0), not a traceback from wherever it landed.

    After ``main`` returns, the garbage it leaves (FSDP modules hold their process group in
    reference cycles) is collected while the interpreter is still whole. Left to interpreter
    shutdown, a gloo group's worker thread can still be releasing a tensor that needs the GIL,
    and the process aborts ("terminate called without an active exception", exit -6: the
    mechanism of pytorch/pytorch#179291; seen in two of three test-suite runs, each time in one
    rank of a finished two-rank job, never in 50 runs on their own)."""
    try:
        result = main()
        gc.collect()
        return result
    except (DataError, ConfigError) as e:
        exit_with_error(str(e))
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted: rerun the same command to continue from the last checkpoint "
                  "(--ckpt_path), if there is one", file=sys.stderr, flush=True)
        sys.exit(130)
