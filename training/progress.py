"""Progress bars with rate and ETA on the main process only (other ranks stay quiet)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, initial: int = 0, unit: str = "it"):
    """``tqdm`` bar; disabled (a no-op iterator wrapper) on non-main ranks. ``initial`` lets a
    resumed run start the bar where the previous run stopped, so the ETA stays honest."""
    return tqdm(
        total=total, desc=desc, disable=not enabled, initial=initial, unit=unit,
        dynamic_ncols=True, file=sys.stderr, smoothing=0.1,
        mininterval=0.1 if sys.stderr.isatty() else 5.0,  # logs to files: a line every few seconds
    )
