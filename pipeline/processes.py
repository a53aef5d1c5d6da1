"""One command in its own process group, from a fixed folder: its whole output to a log file,
a short view of it to the terminal, and the group stopped on success, failure and Ctrl-C (so
nothing a command started, torchrun's ranks, an engine process or Ray's daemons, outlives it)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from pipeline.stage import shell_line
from serving.openai_server import terminate_process_group
from training.progress import PROGRESS_LINES_ENV, PROGRESS_TAG

TAGGED = re.compile(r"^\[([a-z_]+)\]( |$)")  # the project's "[data] ...", "[eval] ...", "[progress] ..."
QUIET_TAGS = ("transformers",)  # load reports
UNTAGGED_SHOWN = re.compile(r"^(error:|wrote )")
PROGRESS_EVERY_S = 15  # a child's progress line at most this often (a log read later needs no more)


class ProgressView:
    """The terminal's short view of a command's output: its ``[tag]`` lines and ``error:`` lines,
    nothing of the libraries' chatter. The children's ``[progress] ...`` lines
    (``training.progress`` in line mode) are printed one under the other in a log; on a terminal
    a bar is redrawn in place (kept below any other line that comes), and its last state stays
    when the next bar starts."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.progress: str | None = None  # the progress line on screen (tty only), not yet settled
        self.progress_desc: str | None = None

    def _clip(self, text: str) -> str:
        width = shutil.get_terminal_size((160, 20)).columns - 1 if self.tty else 200
        text = "    " + text
        return text if len(text) <= width else text[: width - 1] + "…"

    def _clear_progress(self) -> None:
        if self.progress is not None:
            self.stream.write("\r\033[K")

    def line(self, text: str) -> None:
        """One piece of a command's output between two line breaks or carriage returns."""
        text = text.strip()
        tag = TAGGED.match(text)
        if tag and tag.group(1) == PROGRESS_TAG:
            desc = text.split(":", 1)[0]
            if self.tty:
                if self.progress is not None and desc != self.progress_desc:
                    self.stream.write("\n")  # the previous bar's last state stays
                else:
                    self._clear_progress()
                self.stream.write(self._clip(text))
                self.progress, self.progress_desc = text, desc
            else:
                self.stream.write(self._clip(text) + "\n")
        elif (tag and tag.group(1) not in QUIET_TAGS) or UNTAGGED_SHOWN.match(text):
            self._clear_progress()
            self.stream.write(self._clip(text) + "\n")
            if self.progress is not None:  # the bar again, below the new line
                self.stream.write(self._clip(self.progress))
        self.stream.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.stream.write("\n")
            self.progress = self.progress_desc = None
        self.stream.flush()


@contextmanager
def interrupts_deferred():
    """A second Ctrl-C while a process group is being stopped would leave half of it running."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the command's group, SIGKILL it after a grace period; also kills what a finished
    command left behind in its group (torchrun workers, an engine process, Ray's daemons)."""
    with interrupts_deferred():
        terminate_process_group(proc, grace=10.0)


def run_command(command: list[str], log_path: Path, view: ProgressView, cwd: Path, append: bool = False,
                env: dict[str, str] | None = None) -> int:
    """Run ``command`` (with ``env`` on top of ours) from ``cwd`` in its own process group (so
    Ctrl-C reaches the caller alone, which then stops the whole group): all output to ``log_path``,
    a short view to the terminal. Returns the exit status."""
    full_env = os.environ | {"PYTHONUNBUFFERED": "1"}  # lines reach the log and the view as they are written
    full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    full_env.setdefault(PROGRESS_LINES_ENV, str(PROGRESS_EVERY_S))  # progress as lines: see ProgressView
    full_env |= env or {}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab" if append else "wb") as log:
        log.write(f"$ {shell_line(command, env)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        try:
            pending = b""
            while chunk := os.read(proc.stdout.fileno(), 65536):
                log.write(chunk)
                log.flush()
                *pieces, pending = re.split(rb"[\r\n]", pending + chunk)
                for piece in pieces:
                    view.line(piece.decode("utf-8", errors="replace"))
            view.line(pending.decode("utf-8", errors="replace"))
            return proc.wait()
        finally:
            stop_process_group(proc)
            proc.stdout.close()
            view.close()


def log_tail(path: Path, lines: int = 25) -> list[str]:
    """The last non-empty lines of a log as a terminal showed them: of a line redrawn with
    carriage returns (a library's progress bar), its last state."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")  # not read_text: it turns "\r" into "\n"
    except OSError:
        return [f"(no log at {path})"]
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1].strip() for line in text.split("\n")]
    return [line for line in shown if line][-lines:]


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: process groups stopped, the server too


def install_interrupt_handlers() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, whatever the caller inherited: a shell starts a
    background job (``make demo &``, CI runners) with SIGINT ignored, and Python then installs no
    handler of its own, so ``kill -INT`` would do nothing."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
