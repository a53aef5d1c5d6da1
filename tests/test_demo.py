"""demo.py's own logic, cheaply: option parsing, the stage commands it composes, completeness
markers and skipping (with real files and real subprocesses standing in for the stages), the
process-group shutdown on Ctrl-C, the terminal view and the summary. The whole demo is not run
here (minutes): `make demo` is its end-to-end check."""

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

import demo
from demo import DemoConfig, Stage, StageFailed, parse_stage_list, run_pipeline, stage_state
from training.config import ConfigError, parse_config

PY = sys.executable


# --- options ----------------------------------------------------------------------------------


def test_force_accepts_all_names_and_nothing():
    assert parse_stage_list("") == set()
    assert parse_stage_list("all") == set(demo.STAGE_NAMES)
    assert parse_stage_list("rm,rl") == {"rm", "rl"}
    assert parse_stage_list(" rm , rl ,") == {"rm", "rl"}


@pytest.mark.parametrize("argv, message", [
    (["--force", "rm,reward"], "--force: unknown stage(s) reward; stages are model, sft, generate, judge, label, rm, rl, compare (or all)"),
    (["--force", "all,rm"], "unknown stage(s) all"),
    (["--until", "ppo"], "--until must be one of model, sft, generate, judge, label, rm, rl, compare, got 'ppo'"),
    (["--algo", "dpo"], "--algo must be one of remax, ppo, got 'dpo'"),
    (["--prompts", "no/such/prompts.jsonl"], "--prompts no/such/prompts.jsonl: no such file"),
    (["--model", "gpt2"], "--model must be one of smollm2, tiny, got 'gpt2'"),
])
def test_bad_options_name_the_flag(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_config(DemoConfig, argv)
    assert message in str(e.value)


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_stage_commands_follow_the_algorithm(tmp_path, model):
    remax = {s.name: s for s in demo.build_stages(parse_config(DemoConfig, ["--model", model]), tmp_path)}
    ppo = {s.name: s for s in demo.build_stages(parse_config(DemoConfig, ["--model", model, "--algo", "ppo"]), tmp_path)}
    assert list(remax) == list(demo.STAGE_NAMES)
    assert all(s.command[0] == PY for s in remax.values())
    rl = remax["rl"].command
    assert rl[1:4] == ["fsdp_ppo_ray.py", "--config", f"configs/remax_{model}.yaml"] and "--advantage_estimator" not in rl
    assert ppo["rl"].command[1:4] == ["fsdp_ppo_ray.py", "--config", f"configs/ppo_{model}.yaml"]
    assert ppo["rl"].command[-2:] == ["--advantage_estimator", "gae"]
    for flag, value in [("--reward_pretrain", tmp_path / "rm"), ("--save_path", tmp_path / "policy"),
                        ("--logging_path", tmp_path / "logs" / "rl"), ("--ckpt_path", tmp_path / "ckpt" / "rl")]:
        assert rl[rl.index(flag) + 1] == str(value)
    # judge and label talk to the one server they share (kept up between them)
    for name in ("judge", "label"):
        stage = remax[name]
        assert stage.server is remax["judge"].server and stage.server.port == 23333
        assert stage.command[stage.command.index("--base_url") + 1] == stage.server.base_url
        assert stage.command[stage.command.index("--model") + 1] == stage.server.model
    # a random tiny model cannot judge as it ships: its SFT policy does; the real model judges as shipped
    judge_dir = remax["judge"].server.model_dir
    assert judge_dir == (str(tmp_path / "sft") if model == "tiny" else str(demo.from_root(demo.PACKAGED_MODEL_DIR)))
    # compare starts the same judge itself, after generating, with the same judge settings as label
    compare, label = remax["compare"].command, remax["label"].command
    assert remax["compare"].server is None
    assert compare[compare.index("--judge") + 1] == judge_dir and compare[compare.index("--judge_port") + 1] == "23333"
    assert compare[compare.index("--policy_a") + 1] == str(tmp_path / "policy")
    assert compare[compare.index("--policy_b") + 1] == str(tmp_path / "sft")
    if model == "smollm2":
        assert compare[compare.index("--judge_config") + 1] == label[label.index("--config") + 1] == "configs/judge_small.yaml"
    rm = remax["rm"].command
    assert "--packing_samples" in rm and "--eval_split" in rm and rm[rm.index("--nproc_per_node") + 1] == "2"
    # every config and data file a stage names is in the repository
    for stage in remax.values():
        for arg in stage.command:
            if arg.startswith(("configs/", "models/assets/", "data/")):
                assert (demo.ROOT / arg).is_file(), arg


# --- markers and skipping, with real files and commands ---------------------------------------


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
    results = run_pipeline(stages, out, set(force), until, stream=io.StringIO())
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
    assert run(stages, out, force=set(demo.STAGE_NAMES) | {"a", "b", "c"}, until="a") == {
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
                        demo.fingerprint(stages[2], {s: json.loads((out / "stages" / f"{s}.json").read_text())["run_id"]
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
    stages[2].requires = [demo.ROOT / "no_such_driver.py"]
    with pytest.raises(StageFailed) as e:
        run(stages, tmp_path)
    assert e.value.reason == "no_such_driver.py not found in this checkout; `--until b` runs the stages before it"
    assert calls(tmp_path) == ["a", "b"]


HARNESS = """
import sys, pathlib
sys.path.insert(0, {root!r})
import demo
demo.install_interrupt_handlers()  # as demo.main() does
out = pathlib.Path({out!r})
child = '''
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(f"{{os.getpid()}} {{grandchild.pid}}")
time.sleep(120)
'''
stage = demo.Stage("slow", "sleeps", [sys.executable, "-c", child, str(out / "pids")], [out / "slow.txt"])
try:
    demo.run_pipeline([stage], out, set(), "slow")
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
    script = HARNESS.format(root=str(demo.ROOT), out=str(tmp_path))
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


def test_progress_view_keeps_tagged_lines_and_bars_only():
    stream = io.StringIO()
    view = demo.ProgressView(stream, bar_interval=3600)
    for piece in [
        "INFO 11-23 19:15:29 [api_utils.py:286] non-default args",
        "[data] 300 training conversations",
        "Loading weights: 100%|███| 21/21 [00:00<00:00, 4932.54it/s]",
        "sft:   0%|          | 0/54 [00:00<?, ?step/s](MainProcess pid=1) INFO more log on the same line",
        "sft:  50%|█████     | 27/54 [00:05<00:05,  5.0step/s, loss=6.9]",
        "[transformers] LOAD REPORT",
        "error: prefs.jsonl:3: field 'chose': expected a non-empty string",
        "sft: 100%|██████████| 54/54 [00:10<00:00,  5.0step/s, loss=6.4]",
        "rm:   0%|          | 0/8 [00:00<?, ?step/s]",
    ]:
        view.segment(piece)
    view.close()
    assert stream.getvalue().splitlines() == [
        "    [data] 300 training conversations",
        "    sft:   0%|          | 0/54 [00:00<?, ?step/s]",  # the first bar state, cut at its end
        "    error: prefs.jsonl:3: field 'chose': expected a non-empty string",
        "    sft: 100%|██████████| 54/54 [00:10<00:00,  5.0step/s, loss=6.4]",  # its last state, when rm's starts
        "    rm:   0%|          | 0/8 [00:00<?, ?step/s]",
    ]


def test_summary_reads_the_artefacts(tmp_path):
    out = tmp_path
    prefs = out / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"id": i, "agreement": a, "strength": 0.6}) + "\n" for i, a in enumerate([1.0, 0.5, 0.5])))
    prefs.with_suffix(".rejects.jsonl").write_text(json.dumps({"id": 9, "agreement": 0.5, "strength": 0.5}) + "\n")
    (out / "logs" / "rm").mkdir(parents=True)
    (out / "logs" / "rm" / "metrics.jsonl").write_text(
        json.dumps({"step": 4, "eval_acc": 0.25}) + "\n" + json.dumps({"step": 8, "loss": 1.0}) + "\n"
        + json.dumps({"step": 8, "eval_acc": 0.75}) + "\n")
    (out / "logs" / "rm" / "eval_rewards.json").write_text(json.dumps([[1, 0]] * 4))
    (out / "logs" / "rl").mkdir()
    (out / "logs" / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "eval_reward_mean": -2.0},
        {"step": 1, "reward_mean": -1.5, "kl": 0.0},
        {"step": 2, "reward_mean": -1.0, "kl": 0.25, "eval_reward_mean": -0.5},
    ]))
    results = [demo.StageResult(n, "ran", 1.0, None) for n in demo.STAGE_NAMES]
    tiny = parse_config(DemoConfig, ["--model", "tiny"])
    table = demo.summary_table(results, out, tiny, 6.0)
    assert f"3 kept, 1 rejected -> {prefs}" in table
    assert "0.62 mean vote agreement; the orders A/B and B/A agreed on 1 of 4 pairs" in table
    assert "0.750 on 4 held-out pairs (step 8)" in table
    assert "-2.0000 -> -0.5000 (greedy, held-out prompts; step 0 -> 2)" in table
    assert "-1.5000 -> -1.0000 (sampled; step 1 -> 2)" in table
    assert "0.25000 (last step)" in table
    assert "carry no meaning" in table
    assert "judge_eval.json has no 'modes'" in table  # no judge_eval.json: said, not skipped

    # the judge on the truth set and the judged comparison, as self_ref.evaluate / compare_policies write them
    est = lambda v, n: {"value": v, "low": v - 0.1, "high": v + 0.1, "n": n}  # noqa: E731
    (out / "judge_eval.json").write_text(json.dumps({"modes": {
        "self_reference": {"accuracy": est(0.67, 42), "consistency": {"value": float("nan"), "low": 0, "high": 1, "n": 0}},
        "direct": {"accuracy": est(0.5, 42), "consistency": est(0.25, 42)}}}))
    (out / "compare").mkdir()
    side = lambda r, n, cut: {"reward": est(r, 40), "length_tokens": est(n, 40), "cut_at_max": est(cut, 40)}  # noqa: E731
    (out / "compare" / "summary.json").write_text(json.dumps({
        "name_a": "remax", "name_b": "sft", "n": 40, "wins": 12, "ties": 10, "losses": 18, "win_rate": est(0.4, 40),
        "a": side(1.2, 50.0, 0.1), "b": side(1.0, 40.0, 0.05),
        "examples": [{"prompt": "Name a colour.", "response_a": "Blue.", "response_b": "Red is one."}]}))
    table = demo.summary_table(results, out, tiny, 6.0)
    assert "accuracy 0.67 [0.57, 0.77] on 42 truth-set pairs, one response per request" in table
    assert "accuracy 0.50 [0.40, 0.60] on 42 truth-set pairs, orders agree 0.25 [0.15, 0.35]" in table
    assert "0.40 [0.30, 0.50] (12 wins, 10 ties, 18 losses on 40 held-out prompts)" in table
    assert "sft 1.000 -> remax 1.200 (greedy)" in table and "sft 40.0 -> remax 50.0; cut at max 5% -> 10%" in table
    assert "prompt: Name a colour." in table and "remax: Blue." in table and "sft: Red is one." in table

    # a metrics file without the contract's keys is reported, not skipped
    (out / "logs" / "rl" / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward_mean": 1.0}) + "\n")
    table = demo.summary_table(results, out, tiny, 6.0)
    assert "missing: the first and last rows of" in table and "need 'eval_reward_mean'" in table
    assert "has no 'kl'" in table

    # stages this invocation did not reach report nothing from (possibly stale) files
    partial = [demo.StageResult(n, "ran" if n in ("model", "sft") else "not run", None, None) for n in demo.STAGE_NAMES]
    table = demo.summary_table(partial, out, tiny, 1.0)
    assert "- (label not run)" in table and "- (rm not run)" in table and "- (rl not run)" in table


def test_log_tail_collapses_progress_bar_redraws(tmp_path):
    log = tmp_path / "label.log"
    log.write_text("$ python -m self_ref.label ...\n[label] 4 pairs\n"
                   + "".join(f"\rlabel:  {25 * i}%|##  | {i}/4 [00:0{i}<00:01,  1.0pair/s]" for i in range(5))
                   + "\n[label] 4 pairs failed\nlabel: 100%|###| 4/4 [00:04<00:00]\n")
    assert demo.log_tail(log) == [
        "$ python -m self_ref.label ...", "[label] 4 pairs",
        "label:  100%|##  | 4/4 [00:04<00:01,  1.0pair/s]", "[label] 4 pairs failed",
        "label: 100%|###| 4/4 [00:04<00:00]"]
    assert demo.log_tail(tmp_path / "missing.log") == [f"(no log at {tmp_path / 'missing.log'})"]


def test_stage_environment_reaches_the_command_and_its_printed_line(tmp_path):
    code = "import os, pathlib; pathlib.Path(os.environ['OUT_FILE']).write_text(os.environ['OMP_NUM_THREADS'])"
    stage = Stage("env", "environment", [PY, "-c", code], [tmp_path / "threads.txt"],
                  env={"OMP_NUM_THREADS": "1", "OUT_FILE": str(tmp_path / "threads.txt")})
    stream = io.StringIO()
    run_pipeline([stage], tmp_path, set(), "env", stream=stream)
    assert (tmp_path / "threads.txt").read_text() == "1"
    line = f"$ OMP_NUM_THREADS=1 OUT_FILE={tmp_path / 'threads.txt'} {PY} -c "
    assert line in stream.getvalue() and (tmp_path / "logs" / "env.log").read_text().startswith(line)
    sft = next(s for s in demo.build_stages(parse_config(DemoConfig, ["--model", "tiny"]), tmp_path) if s.name == "sft")
    assert sft.env == {"OMP_NUM_THREADS": "1"} and sft.shell_command().startswith(f"OMP_NUM_THREADS=1 {PY} train_sft.py")


def test_report_plots_what_the_metrics_files_hold(tmp_path):
    """reports.demo_report: a PNG per stage with metrics, the calibration plot from judge_eval.json,
    the summary and the judged comparison in report.md; a missing stage is said, not skipped."""
    from PIL import Image

    from reports.demo_report import write_report

    (tmp_path / "logs" / "rm").mkdir(parents=True)
    (tmp_path / "logs" / "rm" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0 / s, "acc": 0.5 + s / 20}) + "\n" for s in range(1, 6)))
    (tmp_path / "logs" / "rl").mkdir()
    (tmp_path / "logs" / "rl" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward_mean": s * 0.1, "kl": s * 0.01, "response_length": 40 + s}) + "\n"
        for s in range(1, 4)))
    est = {"value": 0.7, "low": 0.55, "high": 0.82, "n": 42}
    bucket = [{"low": 0.5, "high": 0.75, "n": 20, "mean_strength": 0.6, "accuracy": {**est, "n": 20}},
              {"low": 0.75, "high": 1.0, "n": 22, "mean_strength": 0.9, "accuracy": {**est, "value": 0.8, "n": 22}}]
    (tmp_path / "judge_eval.json").write_text(json.dumps({"input": "truth.jsonl", "modes": {
        "self_reference": {"accuracy": est, "consistency": None, "accuracy_decided": est, "calibration": bucket},
        "direct": {"accuracy": {**est, "value": 0.6}, "consistency": None, "accuracy_decided": est,
                   "calibration": bucket}}}))
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "summary.json").write_text(json.dumps({
        "name_a": "remax", "name_b": "sft", "win_rate": est,
        "examples": [{"prompt": "What is 2+2?", "response_a": "4.", "response_b": "Four, I think."}]}))
    (tmp_path / "summary.txt").write_text("judge (self_reference)  accuracy 0.70\n")

    report = write_report(tmp_path)
    text = report.read_text()
    for png in ("rm.png", "rl.png", "judge_calibration.png"):
        assert f"](report/{png})" in text
        with Image.open(tmp_path / "report" / png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert not (tmp_path / "report" / "sft.png").exists() and "no metrics at logs/sft/metrics.jsonl" in text
    assert "| self_reference | 0.700 [0.550, 0.820] (n=42) |" in text
    assert "judge (self_reference)  accuracy 0.70" in text
    assert "**Prompt:** What is 2+2?" in text and "- *remax*: 4." in text and "- *sft*: Four, I think." in text
