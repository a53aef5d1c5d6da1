"""demo.py's own logic, cheaply: option parsing, the stage commands it composes, the summary and
the report. The stage runner it uses is tested in test_pipeline.py; the whole demo is not run here
(minutes): `make demo-tiny` (CI) and `make demo` are its end-to-end checks."""

import json
import sys

import pytest

import demo
from demo import DemoConfig, parse_stage_list
from training.config import ConfigError, parse_config

PY = sys.executable


# --- options ----------------------------------------------------------------------------------


def test_force_accepts_all_names_and_nothing():
    assert parse_stage_list([]) == set()
    assert parse_stage_list(["all"]) == set(demo.STAGE_NAMES)
    assert parse_stage_list(["all"], "remax", "tiny") == set(demo.STAGE_NAMES) - {"judge_model"}
    assert parse_stage_list(["rm", "rl"]) == {"rm", "rl"}
    assert parse_config(DemoConfig, ["--force", " rm , rl ,"]).force == ["rm", "rl"]


@pytest.mark.parametrize("argv, message", [
    (["--force", "rm,reward"], "--force: unknown stage(s) reward; stages are model, judge_model, sft, generate, judge, label, rm, rm_eval, rl, compare (or all)"),
    (["--force", "all,rm"], "unknown stage(s) all"),
    (["--until", "ppo"], "--until must be one of model, judge_model, sft, generate, judge, label, rm, rm_eval, rl, compare, got 'ppo'"),
    (["--algo", "grpo"], "--algo must be one of remax, ppo, dpo, got 'grpo'"),
    (["--algo", "dpo", "--until", "rm"], "--until must be one of model, judge_model, sft, generate, judge, label, dpo, compare, got 'rm'"),
    (["--algo", "dpo", "--force", "rl"], "--force: unknown stage(s) rl; stages are model, judge_model, sft, generate, judge, label, dpo, compare"),
    (["--model", "tiny", "--until", "judge_model"], "--until must be one of model, sft, generate, judge, label, rm, rm_eval, rl, compare"),  # the SFT policy judges
    (["--profile", "huge"], "--profile must be one of default, full, got 'huge'"),
    (["--profile", "full", "--model", "tiny"], "--profile full is defined for --model smollm2, not tiny"),
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
    assert list(remax) == list(demo.stage_names("remax", model))
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
    # a random tiny model cannot judge as it ships: its SFT policy does; SmolLM2 is judged by a
    # stronger packaged model, installed by its own stage, never by the policy itself
    judge_dir = remax["judge"].server.model_dir
    if model == "tiny":
        assert judge_dir == str(tmp_path / "sft") and "judge_model" not in remax
    else:
        assert judge_dir == str(demo.from_root(demo.MODELS_DIR / "qwen2.5-coder-0.5b")) != str(demo.from_root(demo.PACKAGED_MODEL_DIR))
        assert remax["judge_model"].command[1:] == ["-m", "models.packaged", "qwen2.5-coder-0.5b", judge_dir]
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
    # the reward model on the judge's truth set, right after it is trained
    rm_eval = remax["rm_eval"].command
    assert rm_eval[1:3] == ["-m", "self_ref.evaluate"] and rm_eval[rm_eval.index("--reward_model") + 1] == str(tmp_path / "rm")
    assert rm_eval[rm_eval.index("--input") + 1] == remax["judge"].command[remax["judge"].command.index("--input") + 1]
    # every config and data file a stage names is in the repository
    for stage in remax.values():
        for arg in stage.command:
            if arg.startswith(("configs/", "models/assets/", "data/")):
                assert (demo.ROOT / arg).is_file(), arg


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
    results = [demo.StageResult(n, "ran", 1.0, None) for n in demo.stage_names("remax", "tiny")]
    tiny = parse_config(DemoConfig, ["--model", "tiny"])
    table = demo.summary_table(results, out, tiny, 6.0)
    assert f"3 kept, 1 rejected -> {prefs}" in table
    assert "0.62 mean vote agreement; the orders A/B and B/A agreed on 1 of 4 pairs" in table
    assert "0.750 on 4 held-out pairs (step 8)" in table
    assert "rm_eval.json has no 'modes.reward_model'" in table
    assert "-2.0000 -> -0.5000 (greedy, held-out prompts; step 0 -> 2)" in table
    assert "-1.5000 -> -1.0000 (sampled; step 1 -> 2)" in table
    assert "0.25000 (last step)" in table
    assert "carry no meaning" in table
    assert "judge_eval.json has no 'modes'" in table  # no judge_eval.json: said, not skipped
    assert [line.split()[:2] for line in demo.missing_figures(table)] == [["judge", "accuracy"], ["RM", "truth-set"],
                                                                          ["judge", "win"]]

    # the judge on the truth set and the judged comparison, as self_ref.evaluate / compare_policies write them
    est = lambda v, n: {"value": v, "low": v - 0.1, "high": v + 0.1, "n": n}  # noqa: E731
    (out / "judge_eval.json").write_text(json.dumps({"modes": {
        "self_reference": {"accuracy": est(0.67, 42), "consistency": {"value": float("nan"), "low": 0, "high": 1, "n": 0}},
        "direct": {"accuracy": est(0.5, 42), "consistency": est(0.25, 42)}}}))
    (out / "rm_eval.json").write_text(json.dumps({"modes": {"reward_model": {
        "accuracy": est(0.55, 42), "n": 42, "mean_margin": 0.0123, "by_category": {}}}}))
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
    assert "0.55 [0.45, 0.65] on 42 truth-set pairs (better response known; mean margin +0.012)" in table
    assert "sft 1.000 -> remax 1.200 (greedy)" in table and "sft 40.0 -> remax 50.0; cut at max 5% -> 10%" in table
    assert "prompt: Name a colour." in table and "remax: Blue." in table and "sft: Red is one." in table

    # a metrics file without the contract's keys is reported, not skipped
    (out / "logs" / "rl" / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward_mean": 1.0}) + "\n")
    table = demo.summary_table(results, out, tiny, 6.0)
    assert "missing: the first and last rows of" in table and "need 'eval_reward_mean'" in table
    assert "has no 'kl'" in table

    # stages this invocation did not reach report nothing from (possibly stale) files
    partial = [demo.StageResult(n, "ran" if n in ("model", "sft") else "not run", None, None) for n in demo.stage_names("remax", "tiny")]
    table = demo.summary_table(partial, out, tiny, 1.0)
    assert "- (label not run)" in table and "- (rm not run)" in table and "- (rl not run)" in table
    assert demo.missing_figures(table) == []  # --until sft: nothing later was due


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_algo_dpo_trains_the_policy_on_the_labels_in_place_of_rm_and_rl(tmp_path, model):
    stages = {s.name: s for s in demo.build_stages(parse_config(DemoConfig, ["--model", model, "--algo", "dpo"]), tmp_path)}
    assert list(stages) == list(demo.stage_names("dpo", model))
    dpo = stages["dpo"].command
    assert "train_dpo.py" in dpo and dpo[dpo.index("train_dpo.py") + 1:dpo.index("train_dpo.py") + 3] == ["--config", f"configs/dpo_{model}.yaml"]
    assert (demo.ROOT / f"configs/dpo_{model}.yaml").is_file()
    for flag, value in [("--pretrain", tmp_path / "sft"), ("--dataset", tmp_path / "prefs.jsonl"),
                        ("--save_path", tmp_path / "policy_dpo"), ("--logging_path", tmp_path / "logs" / "dpo")]:
        assert dpo[dpo.index(flag) + 1] == str(value)
    compare = stages["compare"].command
    assert compare[compare.index("--policy_a") + 1] == str(tmp_path / "policy_dpo") and "--reward_model" not in compare
    assert compare[compare.index("--name_a") + 1] == "dpo"


def test_dpo_and_rl_share_the_labels_in_one_folder_without_touching_each_others_results(tmp_path):
    """`--algo dpo` after an RL run in the same --out: the stages up to the labels are the same
    (same commands and markers: skipped), and nothing DPO writes, deletes or marks is RL's."""
    rl = demo.build_stages(parse_config(DemoConfig, []), tmp_path)
    dpo = demo.build_stages(parse_config(DemoConfig, ["--algo", "dpo"]), tmp_path)
    shared = [s.name for s in dpo if s.name in {r.name for r in rl} and s.name != "compare"]
    assert shared == ["model", "judge_model", "sft", "generate", "judge", "label"]
    by_name = {s.name: s for s in rl}
    for stage in dpo:
        if stage.name in shared:
            assert stage.command == by_name[stage.name].command and stage.key == by_name[stage.name].key
    rl_own = {s.key: s for s in rl if s.name not in shared}
    dpo_own = {s.key: s for s in dpo if s.name not in shared}
    assert set(rl_own) == {"rm", "rm_eval", "rl", "compare"} and set(dpo_own) == {"dpo", "compare_dpo"}
    rl_outputs = {p for s in rl_own.values() for p in s.outputs}
    assert not rl_outputs & {p for s in dpo_own.values() for p in s.outputs}
    assert demo.Artefacts(tmp_path, "dpo").summary != demo.Artefacts(tmp_path, "remax").summary
    assert demo.Artefacts(tmp_path, "dpo").report != demo.Artefacts(tmp_path, "remax").report


def test_the_summary_of_a_dpo_run(tmp_path):
    (tmp_path / "logs" / "dpo").mkdir(parents=True)
    (tmp_path / "logs" / "dpo" / "metrics.jsonl").write_text(
        json.dumps({"step": 4, "loss": 0.6}) + "\n" + json.dumps({"step": 4, "eval_acc": 0.6364, "eval_reward_margin": 0.0139}) + "\n")
    cfg = parse_config(DemoConfig, ["--model", "tiny", "--algo", "dpo"])
    results = [demo.StageResult(n, "ran" if n in ("model", "sft", "dpo") else "not run", 1.0, None) for n in demo.stage_names("dpo", "tiny")]
    table = demo.summary_table(results, tmp_path, cfg, 3.0)
    assert "DPO eval accuracy" in table and "0.636, reward margin 0.0139 on held-out pairs (step 4)" in table
    assert "RM eval accuracy" not in table and "reward before -> after RL" not in table
    assert "policy, algorithm" in table and "tiny, dpo, --profile default" in table


def test_the_tiny_sft_stage_runs_with_one_torch_thread(tmp_path):
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


def test_report_after_dpo_plots_dpo_in_place_of_rm_and_rl(tmp_path):
    from reports.demo_report import write_report

    (tmp_path / "logs" / "dpo").mkdir(parents=True)
    (tmp_path / "logs" / "dpo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 0.7 - s / 100, "acc": s / 5, "reward_margin": s / 50}) + "\n" for s in range(1, 5)))
    for name, algo in (("compare", "remax"), ("compare_dpo", "dpo")):  # an RL run's files beside the DPO run's
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"name_a": algo, "name_b": "sft", "n": 7}))
    (tmp_path / "summary.txt").write_text("the RL summary\n")
    (tmp_path / "summary_dpo.txt").write_text("the DPO summary\n")
    report = write_report(tmp_path, "dpo")
    text = report.read_text()
    assert report.name == "report_dpo.md" and not (tmp_path / "report.md").exists()
    assert "](report/dpo.png)" in text and (tmp_path / "report" / "dpo.png").is_file()
    assert "### reward model" not in text and "### RL" not in text
    assert "the DPO summary" in text and "the RL summary" not in text
    assert "## DPO policy vs SFT policy" in text and "compared dpo (A) with sft (B) on 7" in text
    rl_text = write_report(tmp_path).read_text()  # the RL report beside it: its own files only
    assert "### DPO" not in rl_text and "the RL summary" in rl_text and "compared remax (A)" in rl_text


# --- the dry run: every stage's command, checked by its own entry point ------------------------

COMBINATIONS = [(model, algo, "default") for model in demo.PROFILES for algo in demo.ALGOS] + \
    [(model, algo, "full") for model in demo.FULL_PROFILE for algo in demo.ALGOS]


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """``check_stage`` for every stage of every --model x --algo x --profile, each distinct command (with the
    same earlier outputs) checked once: sft, generate, judge and label are the same for the three
    algorithms. {(model, algo, profile): [StageCheck, ...]} in stage order."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.dry_run import check_stage

    out = tmp_path_factory.mktemp("demo_dry_run")
    plans, unique = {}, {}
    for model, algo, profile in COMBINATIONS:
        stages = demo.build_stages(parse_config(DemoConfig, ["--model", model, "--algo", algo, "--profile", profile]),
                                   out / model)
        plan = []
        for k, stage in enumerate(stages):
            pending = [p for earlier in stages[:k] for p in earlier.outputs]
            key = (tuple(stage.command), tuple(sorted(stage.env.items())), tuple(map(str, pending)))
            unique.setdefault(key, (stage, pending))
            plan.append(key)
        plans[model, algo, profile] = plan
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip(unique, pool.map(lambda sp: check_stage(sp[0], sp[1], demo.ROOT), unique.values())))
    return {combo: [done[key] for key in plan] for combo, plan in plans.items()}


@pytest.mark.parametrize("model, algo, profile", COMBINATIONS)
def test_dry_run_of_every_stage_passes_its_entry_points_checks(dry_runs, model, algo, profile):
    """A config, flag or check change that would stop the main job (as `eval_split: 0.1` in the RL
    YAML next to the demo's --eval_prompt_data once did, at the rl stage after 19 minutes) fails
    here in seconds: each stage's command as the run builds it, checked by its entry point."""
    checks = dry_runs[model, algo, profile]
    assert [c.name for c in checks] == list(demo.stage_names(algo, model))
    for c in checks:
        assert c.ok and c.message.startswith("[dry_run] "), f"{model}/{algo} stage {c.name}: {c.message}"
    by_name = {c.name: c for c in checks}
    trainer = "dpo" if algo == "dpo" else "rm"
    assert "for 2 ranks" in by_name[trainer].message  # torchrun's world size reached the batch checks
    if algo != "dpo" and model == "smollm2":
        # the RL YAML's eval_split (its default when run alone) gives way to the demo's held-out prompts
        assert by_name["rl"].notes == ["[config] --eval_prompt_data from the command line replaces "
                                       f"eval_split: 0.1 from configs/{algo}_smollm2.yaml (alternatives: give one)"]


def test_dry_run_fails_with_the_stage_and_the_entry_points_line(tmp_path):
    from pipeline.dry_run import check_stage, dry_run_command
    from pipeline.stage import Stage

    bad = Stage("label", "labels", [PY, "-m", "self_ref.label", "--input", "data/judge_truth_set.jsonl",
                                     "--output", str(tmp_path / "prefs.jsonl"), "--model", "judge", "--num_votes", "0"], [tmp_path / "prefs.jsonl"])
    check = check_stage(bad, [], demo.ROOT)
    assert not check.ok and check.lines()[0].startswith("label       FAILED")
    assert "exit status 2: error: --num_votes must be >= 1, got 0" in check.message
    # a torchrun command is checked as rank 0 of its world; other commands just get the flag
    assert dry_run_command([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--nnodes=1:2",
                            "train_rm_llama2.py", "--config", "c.yaml"]) == (
        [PY, "train_rm_llama2.py", "--config", "c.yaml", "--dry_run"],
        {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})
    assert dry_run_command([PY, "-m", "self_ref.label", "--x", "1"]) == ([PY, "-m", "self_ref.label", "--x", "1", "--dry_run"], {})
    assert dry_run_command([PY, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "pkg.train", "--a"])[0] == \
        [PY, "-m", "pkg.train", "--a", "--dry_run"]


def test_demo_dry_run_prints_one_line_per_stage_and_runs_nothing(tmp_path):
    import subprocess

    out = tmp_path / "demo"
    proc = subprocess.run([PY, "demo.py", "--model", "tiny", "--out", str(out), "--until", "generate", "--dry_run"],
                          cwd=demo.ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("demo --dry_run: tiny, remax")
    assert [ln.split()[:2] for ln in lines[1:4]] == [["model", "ok"], ["sft", "ok"], ["generate", "ok"]]
    assert lines[-1] == "dry run: 3 of 3 stages ok"
    assert not out.exists()  # nothing ran: not even the output folder was made


def test_the_full_profile_labels_every_prompt_and_trains_longer(tmp_path):
    default = {s.name: s.command for s in demo.build_stages(parse_config(DemoConfig, []), tmp_path)}
    full = {s.name: s.command for s in demo.build_stages(parse_config(DemoConfig, ["--profile", "full"]), tmp_path)}
    assert "--limit" in default["generate"] and "--limit" not in full["generate"]  # all 416 training prompts
    assert "--limit" in default["compare"] and "--limit" not in full["compare"]  # all held-out prompts
    assert full["rl"][:len(default["rl"])] == default["rl"]  # the same command, sizes as flags after it
    assert full["rl"][len(default["rl"]):] == ["--max_iterations", "24", "--eval_steps", "6", "--max_eval_prompts", "32"]
    assert full["judge"] == default["judge"] and full["label"] == default["label"]  # the same judge


def test_a_partial_run_leaves_the_finished_runs_summary_and_report(tmp_path, capsys):
    """`--until model` after a finished run: its summary goes to summary_until_model.txt, and the
    finished run's summary.txt and report.md stay as they were (seen: a --until run replaced them)."""
    (tmp_path / "summary.txt").write_text("the finished run\n")
    (tmp_path / "report.md").write_text("# the finished run's report\n")
    assert demo.main(["--model", "tiny", "--out", str(tmp_path), "--until", "model"]) == 0
    assert (tmp_path / "summary.txt").read_text() == "the finished run\n"
    assert (tmp_path / "report.md").read_text() == "# the finished run's report\n"
    partial = (tmp_path / "summary_until_model.txt").read_text()
    assert partial.startswith("=== summary") and "model       ran" in partial and "sft         not run" in partial
    assert "summary_until_model.txt (--until model" in capsys.readouterr().out
