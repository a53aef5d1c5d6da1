"""``check_stages``: a pipeline's dry run, in seconds, one line per stage.

Every stage's command, exactly as the run builds it, runs with ``--dry_run`` appended: its entry
point parses the options (the one precedence rule, ``training.config``), runs the checks it runs
before any heavy work (values, files, this machine's resources) and exits without running. A
``torchrun`` command is checked as its rank 0 with the launcher's world size in ``WORLD_SIZE``, so
the rules that depend on the rank count (a batch that splits over the ranks) hold as in the run.
The files an earlier stage will write do not exist yet: they are named in ``RLHF_PENDING_PATHS``,
where the checks accept them (in a dry run only). The commands are independent, so they run side
by side.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.stage import Stage
from training.config import PENDING_PATHS_ENV

TORCHRUN = ["-m", "torch.distributed.run"]
TORCHRUN_SWITCHES = {"--standalone", "--no-python", "--no_python", "--module", "-m", "--run-path", "--run_path"}
_RUNNING: set[subprocess.Popen] = set()  # the checks in flight (killed on Ctrl-C)
_LOCK = threading.Lock()


@dataclass
class StageCheck:
    name: str
    ok: bool
    seconds: float
    message: str  # the entry point's ``[dry_run]`` line, or the line that says what is wrong
    notes: list[str] = field(default_factory=list)  # its ``[config]`` lines: a flag that replaced a YAML value

    def lines(self, width: int = 12) -> list[str]:
        head = f"{self.name:<{width}}{'ok' if self.ok else 'FAILED':<8}{self.seconds:>5.1f} s  {self.message}"
        return [head] + [f"{'':<{width + 8}}        {note}" for note in self.notes]


def dry_run_command(command: list[str]) -> tuple[list[str], dict[str, str]]:
    """``command`` with ``--dry_run``, and the environment it needs. ``python -m
    torch.distributed.run [launcher options] script.py args`` becomes ``python script.py args
    --dry_run`` as rank 0 of ``nnodes x nproc_per_node`` ranks."""
    if command[1:3] != TORCHRUN:
        return [*command, "--dry_run"], {}
    nproc, nnodes, i, launch = 1, 1, 3, [command[0]]
    while i < len(command) and command[i].startswith("-"):
        flag, eq, value = command[i].partition("=")
        if flag in TORCHRUN_SWITCHES:
            if flag in ("-m", "--module"):
                launch = [command[0], "-m"]  # the target is a module
            elif flag in ("--no-python", "--no_python"):
                launch = []  # the target is an executable
            i += 1
            continue
        if not eq:
            value, i = command[i + 1], i + 1
        i += 1
        if flag in ("--nproc_per_node", "--nproc-per-node"):
            nproc = int(value)
        elif flag == "--nnodes":
            nnodes = int(value.split(":")[-1])  # elastic MIN:MAX: the most ranks the run can have
    world = nproc * nnodes
    env = {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(nproc)}
    return [*launch, *command[i:], "--dry_run"], env


def _said(output: str, ok: bool) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for prefix in (("[dry_run]",) if ok else ("error:", "Error", "Traceback")):
        found = [ln for ln in lines if ln.startswith(prefix)]
        if found:
            return found[-1]
    return lines[-1] if lines else "(no output)"


def check_stage(stage: Stage, pending: list[Path], cwd: Path, timeout: float = 300.0) -> StageCheck:
    """One stage's dry run: its required files, its server's model and its command's own checks."""
    t0 = time.monotonic()

    def failed(message: str) -> StageCheck:
        return StageCheck(stage.name, False, time.monotonic() - t0, message)

    def exists_or_pending(path: Path) -> bool:
        path = (cwd / path).resolve()
        return path.exists() or any(path.is_relative_to((cwd / p).resolve()) for p in pending)

    missing = [str(p) for p in stage.requires if not exists_or_pending(Path(p))]
    if missing:
        return failed(f"missing file(s) the command needs: {', '.join(missing)}")
    if stage.server is not None and not exists_or_pending(Path(stage.server.model_dir)):
        return failed(f"the judge server's model {stage.server.model_dir}: no such folder, and no earlier stage writes it")
    command, env = dry_run_command(stage.command)
    env = {**os.environ, **stage.env, **env, PENDING_PATHS_ENV: os.pathsep.join(str(p) for p in pending)}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    with _LOCK:
        _RUNNING.add(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return failed(f"the dry run did not finish in {timeout:.0f} s")
    finally:
        with _LOCK:
            _RUNNING.discard(proc)
    ok = proc.returncode == 0
    message = _said(stdout if ok else stderr + "\n" + stdout, ok)
    if ok and not message.startswith("[dry_run]"):
        return failed(f"exit status 0 without a [dry_run] line (does the entry point take --dry_run?): {message}")
    if not ok:
        message = f"exit status {proc.returncode}: {message}"
    if ok and stage.server is not None:
        message += f" (judge server for {stage.server.model_dir} not started)"
    notes = [ln.strip() for ln in stdout.splitlines() if ln.startswith("[config]")]
    return StageCheck(stage.name, ok, time.monotonic() - t0, message, notes)


def check_stages(stages: list[Stage], cwd: Path, until: str | None = None, workers: int = 4) -> list[StageCheck]:
    """The dry run of ``stages`` up to ``until`` (default: all), side by side; in stage order."""
    names = [s.name for s in stages]
    stages = stages[: names.index(until) + 1] if until else stages
    pending = [[p for earlier in stages[:k] for p in earlier.outputs] for k in range(len(stages))]
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(check_stage, s, pending[k], Path(cwd)) for k, s in enumerate(stages)]
        return [f.result() for f in futures]
    except KeyboardInterrupt:  # Ctrl-C: stop the checks still running, start no more
        pool.shutdown(wait=False, cancel_futures=True)
        with _LOCK:
            for proc in _RUNNING:
                proc.kill()
        raise
    finally:
        pool.shutdown(wait=True)
