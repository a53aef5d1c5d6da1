"""pipeline/: stages as resumable commands, with real files and real subprocesses standing in for
the stages: completeness markers and skipping, failure reports and resuming, the process-group
shutdown on Ctrl-C and SIGTERM, the terminal view of a command's output and the log tail."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.cache import fingerprint, stage_state
from pipeline.processes import ProgressView, log_tail
from pipeline.runner import run_pipeline
from pipeline.stage import Stage, StageFailed
from training.progress import PROGRESS_LINES_ENV

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


# --- markers and skipping ----------------------------------------------------------------------


def writer(out: Path, name: str, text: str = "x", reads: str | None = None, exit_code: int = 0) -> list[str]:
    """A stage command: appends its name to OUT/calls.txt, optionally checks an input exists,
    writes OUT/NAME.txt, exits with ``exit_code``."""
    code = textwrap.dedent(f"""
        import pathlib, sys
        out = pathlib.Path({str(out)!r})
        with open(out / "calls.txt", "a") as f:
            f.write({name!r} + "\\n")
        if {reads!r} is not None and not (out / {reads!r}).exists():
            sys.exit("missing input")
        print("[{name}] working")
        with open(out / "{name}.txt", "a") as f:
            f.write({text!r} + "\\n")
        sys.exit({exit_code})
    """)
    return [PY, "-c", code]


def toy_stages(out: Path, config: Path, b_text: str = "x", c_exit: int = 0) -> list[Stage]:
    return [
        Stage("a", "first", writer(out, "a") + [str(config)], [out / "a.txt"]),
        Stage("b", "second", writer(out, "b", b_text, reads="a.txt"), [out / "b.txt"]),
        Stage("c", "third", writer(out, "c", reads="b.txt", exit_code=c_exit), [out / "c.txt"], resumable=True),
    ]


def calls(out: Path) -> list[str]:
    path = out / "calls.txt"
    lines = path.read_text().split() if path.exists() else []
    path.unlink(missing_ok=True)
    return lines


def run(stages, out, force=(), until="c"):
    results = run_pipeline(stages, out, set(force), until, stream=io.StringIO(), cwd=ROOT)
    return {r.name: r.status for r in results}


def test_reruns_skip_done_stages_and_redo_stale_ones(tmp_path):
    out = tmp_path
    config = tmp_path / "stage_a.yaml"
    config.write_text("lr: 1\n")
    stages = toy_stages(out, config)

    assert run(stages, out) == {"a": "ran", "b": "ran", "c": "ran"} and calls(out) == ["a", "b", "c"]
    marker = json.loads((out / "stages" / "b.json").read_text())
    assert marker["status"] == "done" and marker["fingerprint"]["command"] == stages[1].command
    assert marker["fingerprint"]["after"] == {"a": json.loads((out / "stages" / "a.json").read_text())["run_id"]}

    assert run(stages, out) == {"a": "skipped", "b": "skipped", "c": "skipped"} and calls(out) == []

    # --force b: b is redone, so c (which read b) is stale and runs too; old outputs are replaced
    assert run(stages, out, force={"b"}) == {"a": "skipped", "b": "ran", "c": "ran"} and calls(out) == ["b", "c"]
    assert (out / "b.txt").read_text() == "x\n"

    # a missing output redoes that stage (and what follows it)
    (out / "b.txt").unlink()
    assert run(stages, out) == {"a": "skipped", "b": "ran", "c": "ran"} and calls(out) == ["b", "c"]

    # a changed command redoes the stage
    assert run(toy_stages(out, config, b_text="y"), out) == {"a": "skipped", "b": "ran", "c": "ran"}
    calls(out)

    # an edited config file the command names redoes the stage that reads it, and everything after
    config.write_text("lr: 2\n")
    stages = toy_stages(out, config, b_text="y")
    assert run(stages, out) == {"a": "ran", "b": "ran", "c": "ran"} and calls(out) == ["a", "b", "c"]

    # --until stops early; --force all redoes everything up to there
    assert run(stages, out, force={"a", "b", "c"}, until="a") == {
        "a": "ran", "b": "not run", "c": "not run"}
    assert calls(out) == ["a"]


def test_a_failed_stage_names_its_command_and_log_and_resumes(tmp_path):
    out = tmp_path
    config = tmp_path / "stage_a.yaml"
    config.write_text("lr: 1\n")
    with pytest.raises(StageFailed) as e:
        run(toy_stages(out, config, c_exit=3), out)
    failed = e.value
    assert failed.stage.name == "c" and failed.reason.startswith("exit status 3")
    assert failed.log == out / "logs" / "c.log"
    assert "[c] working" in failed.log.read_text() and failed.log.read_text().startswith(f"$ {PY} -c")
    assert json.loads((out / "stages" / "c.json").read_text())["status"] == "running"
    assert calls(out) == ["a", "b", "c"]

    # c is resumable and its command is unchanged: the rerun keeps what the failed attempt wrote
    # (self_ref.generate / label append to their outputs and skip rows already there)
    stages = toy_stages(out, config, c_exit=3)
    state = stage_state(stages[2], json.loads((out / "stages" / "c.json").read_text()),
                        fingerprint(stages[2], {s: json.loads((out / "stages" / f"{s}.json").read_text())["run_id"]
                                                     for s in ("a", "b")}), forced=False)
    assert state == "resume"
    with pytest.raises(StageFailed):
        run(stages, out)
    assert (out / "c.txt").read_text() == "x\nx\n"  # kept and appended to, not deleted
    assert calls(out) == ["c"]

    # forced, the same stage starts from scratch: its old output is deleted before it runs
    with pytest.raises(StageFailed):
        run(stages, out, force={"c"})
    assert (out / "c.txt").read_text() == "x\n"


def test_missing_script_fails_before_running_with_a_hint(tmp_path):
    stages = toy_stages(tmp_path, tmp_path / "none.yaml")
    stages[2].requires = [ROOT / "no_such_driver.py"]
    with pytest.raises(StageFailed) as e:
        run(stages, tmp_path)
    assert e.value.reason == "no_such_driver.py not found in this checkout; `--until b` runs the stages before it"
    assert calls(tmp_path) == ["a", "b"]


HARNESS = """
import sys, pathlib
sys.path.insert(0, {root!r})
from pipeline.processes import install_interrupt_handlers
from pipeline.runner import run_pipeline
from pipeline.stage import Stage
install_interrupt_handlers()  # as demo.main() does
out = pathlib.Path({out!r})
child = '''
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(f"{{os.getpid()}} {{grandchild.pid}}")
time.sleep(120)
'''
stage = Stage("slow", "sleeps", [sys.executable, "-c", child, str(out / "pids")], [out / "slow.txt"])
try:
    run_pipeline([stage], out, set(), "slow")
except KeyboardInterrupt:
    sys.exit(130)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited; only its parent (gone too) would reap it
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_the_whole_process_group(tmp_path, sig):
    script = HARNESS.format(root=str(ROOT), out=str(tmp_path))
    harness = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pids_file = tmp_path / "pids"
    deadline = time.monotonic() + 30
    while not (pids_file.exists() and pids_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child, grandchild = map(int, pids_file.read_text().split())
    assert alive(child) and alive(grandchild)
    harness.send_signal(sig)
    assert harness.wait(timeout=30) == 130, harness.stdout.read().decode()
    deadline = time.monotonic() + 10
    while (alive(child) or alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child) and not alive(grandchild)


# --- terminal view and summary ----------------------------------------------------------------


def test_progress_view_keeps_the_commands_tagged_lines_only():
    stream = io.StringIO()
    view = ProgressView(stream)
    for piece in [
        "INFO 11-23 19:15:29 [api_utils.py:286] non-default args",
        "[data] 300 training conversations",
        "Loading weights: 100%|███| 21/21 [00:00<00:00, 4932.54it/s]",  # a library's bar: not ours
        "[progress] sft:   0% 0/54 [00:00<?, ?step/s]",
        "[transformers] LOAD REPORT",
        "error: prefs.jsonl:3: field 'chose': expected a non-empty string",
        "[progress] sft: 100% 54/54 [00:10<00:00,  5.0step/s, loss=6.4]",
        "",
    ]:
        view.line(piece)
    view.close()
    assert stream.getvalue().splitlines() == [
        "    [data] 300 training conversations",
        "    [progress] sft:   0% 0/54 [00:00<?, ?step/s]",
        "    error: prefs.jsonl:3: field 'chose': expected a non-empty string",
        "    [progress] sft: 100% 54/54 [00:10<00:00,  5.0step/s, loss=6.4]",
    ]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_view_redraws_progress_in_place_on_a_terminal():
    stream = _Terminal()
    view = ProgressView(stream)
    for piece in ["[progress] sft:  50% 1/2", "[data] a line", "[progress] sft: 100% 2/2", "[progress] rm:   0% 0/8"]:
        view.line(piece)
    view.close()
    screen = stream.getvalue()
    # what a terminal shows: each carriage return + erase-line overwrites the line
    shown = [line.rsplit("\r\033[K", 1)[-1] for line in screen.split("\n")]
    assert shown == ["    [data] a line", "    [progress] sft: 100% 2/2", "    [progress] rm:   0% 0/8", ""]


def test_a_child_under_the_runner_reports_progress_as_tagged_lines(tmp_path):
    """training.progress in line mode: what run_command sets for its children."""
    code = ("from training.progress import progress_bar\n"
            "bar = progress_bar(3, 'toy', unit='step')\n"
            "for i in range(3):\n"
            "    bar.update(1); bar.set_postfix(loss=1.0 / (i + 1))\n"
            "bar.close()\n")
    stream = io.StringIO()
    stage = Stage("toy", "a bar", [PY, "-c", code], [tmp_path / "logs" / "toy.log"])
    run_pipeline([stage], tmp_path, set(), "toy", stream=stream, cwd=ROOT)
    shown = [line.strip() for line in stream.getvalue().splitlines() if "[progress]" in line]
    assert shown[0] == "[progress] toy:   0% 0/3 [00:00<?, ?step/s]"
    assert shown[-1].startswith("[progress] toy: 100% 3/3 [") and shown[-1].endswith("loss=0.333]")
    assert len(shown) <= 3  # one line per state at most every few seconds, and the last state once
    assert PROGRESS_LINES_ENV not in os.environ  # set for the child only


def test_log_tail_shows_each_redrawn_line_in_its_last_state(tmp_path):
    log = tmp_path / "label.log"
    log.write_text("$ python -m self_ref.label ...\n[label] 4 pairs\n"
                   + "".join(f"\rlabel:  {25 * i}%|##  | {i}/4 [00:0{i}<00:01,  1.0pair/s]" for i in range(5))
                   + "\n[label] 4 pairs failed\nlabel: 100%|###| 4/4 [00:04<00:00]\n")
    assert log_tail(log) == [
        "$ python -m self_ref.label ...", "[label] 4 pairs",
        "label:  100%|##  | 4/4 [00:04<00:01,  1.0pair/s]", "[label] 4 pairs failed",
        "label: 100%|###| 4/4 [00:04<00:00]"]
    assert log_tail(tmp_path / "missing.log") == [f"(no log at {tmp_path / 'missing.log'})"]


def test_stage_environment_reaches_the_command_and_its_printed_line(tmp_path):
    code = "import os, pathlib; pathlib.Path(os.environ['OUT_FILE']).write_text(os.environ['OMP_NUM_THREADS'])"
    stage = Stage("env", "environment", [PY, "-c", code], [tmp_path / "threads.txt"],
                  env={"OMP_NUM_THREADS": "1", "OUT_FILE": str(tmp_path / "threads.txt")})
    stream = io.StringIO()
    run_pipeline([stage], tmp_path, set(), "env", stream=stream, cwd=ROOT)
    assert (tmp_path / "threads.txt").read_text() == "1"
    line = f"$ OMP_NUM_THREADS=1 OUT_FILE={tmp_path / 'threads.txt'} {PY} -c "
    assert line in stream.getvalue() and (tmp_path / "logs" / "env.log").read_text().startswith(line)
