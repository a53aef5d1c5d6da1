"""Progress bars with rate and ETA on the main process only (other ranks stay quiet).

On a terminal: tqdm's bar. In a log (stderr not a terminal): a bar state every few seconds.
Under a parent that shows our output itself (``pipeline.processes`` sets ``PROGRESS_LINES_ENV``
to the seconds between lines): one ``[progress] desc: 56% 30/54 [00:05<00:04, 5.85step/s, loss=6.69]``
line at most that often, a line the parent can show as it is, no bar to parse.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

PROGRESS_LINES_ENV = "RLHF_PROGRESS_LINES"
PROGRESS_TAG = "progress"
_LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class _TaggedLines:
    """A file for tqdm that turns each redraw into one ``[progress] ...`` line on stderr (a state
    equal to the last one, as tqdm's close repeats it, is not written again)."""

    encoding = "utf-8"

    def __init__(self):
        self.last = None

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text and text != self.last:
            sys.stderr.write(f"[{PROGRESS_TAG}] {text}\n")
            self.last = text

    def flush(self) -> None:
        sys.stderr.flush()


class _LineBar(tqdm):
    """tqdm whose postfix and description changes wait for the next timed redraw (tqdm redraws
    at once by default: a line per training step)."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, initial: int = 0, unit: str = "it"):
    """``tqdm`` bar; disabled (a no-op iterator wrapper) on non-main ranks. ``initial`` lets a
    resumed run start the bar where the previous run stopped, so the ETA stays honest."""
    every = os.environ.get(PROGRESS_LINES_ENV)
    if every:
        return _LineBar(
            total=total, desc=desc, disable=not enabled, initial=initial, unit=unit, file=_TaggedLines(),
            bar_format=_LINE_FORMAT if total else _LINE_FORMAT_NO_TOTAL, mininterval=float(every), smoothing=0.1,
        )
    return tqdm(
        total=total, desc=desc, disable=not enabled, initial=initial, unit=unit,
        dynamic_ncols=True, file=sys.stderr, smoothing=0.1,
        mininterval=0.1 if sys.stderr.isatty() else 5.0,  # logs to files: a line every few seconds
    )
