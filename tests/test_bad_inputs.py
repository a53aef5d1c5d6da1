"""Bad inputs, as a new user makes them: each ends with exit code 2 and one ``error:`` line naming
the flag (or file:row and field), no traceback, before any process group, Ray or model load.

Most cases call the entry point's ``main`` in this process through ``run_cli`` (the same path as
the command line, without paying the imports each time); a few run the real commands, torchrun
included, to check what a terminal shows. Each case's seconds are printed (``-s``): the checks
take well under a second here, the rest of a command's time is importing torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.trainer_runs import run_script
from training.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
CHATS = str(ROOT / "models" / "assets" / "tiny_chat_corpus.jsonl")
PROMPTS = str(ROOT / "models" / "assets" / "tiny_prompts.jsonl")


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _chat(user: str, reply: str = "fine") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def _pair(chose: str, reject: str) -> dict:
    return {"message": [{"role": "user", "content": "Which colour is the sky?"}], "chose": chose, "reject": reject}


@pytest.fixture
def files(tmp_path, tiny_model_dir):
    f = {"model": str(tiny_model_dir), "tmp": tmp_path}
    f["three"] = _write_jsonl(tmp_path / "three.jsonl", [_chat("q")] * 3)
    f["long_prompt"] = _write_jsonl(tmp_path / "long.jsonl", [_chat("q")] * 4 + [_chat("word " * 400)] + [_chat("q")] * 3)
    f["same_pair"] = _write_jsonl(tmp_path / "same.jsonl", [_pair("Blue.", "Green.")] * 4 + [_pair("Blue.", "Blue.")])
    f["pairs"] = _write_jsonl(tmp_path / "pairs.jsonl", [_pair("Blue.", "Green.")] * 8)
    (tmp_path / "bad.yaml").write_text("learning_rate: [1\n")
    (tmp_path / "typo.yaml").write_text("learnin_rate: 1.0e-5\n")
    (tmp_path / "probs.yaml").write_text("dataset_probs: [0.5, half]\n")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")
    (tmp_path / "out").mkdir()
    return f


def _sft(f, *flags):
    return ["train_sft", ["--pretrain", f["model"], "--dataset", CHATS, "--train_batch_size", "4",
                          "--micro_train_batch_size", "2", *flags]]


def _rm(f, *flags):
    return ["train_rm_llama2", ["--pretrain", f["model"], "--dataset", f["pairs"], "--train_batch_size", "4",
                                "--micro_train_batch_size", "2", *flags]]


def _rl(f, *flags):
    return ["fsdp_ppo_ray", ["--config", str(ROOT / "configs" / "remax_tiny.yaml"), "--pretrain", f["model"],
                             "--reward_pretrain", f["model"], "--prompt_data", PROMPTS, *flags]]


# (case id, builder(files) -> [module, argv], what the one line must contain)
CASES = [
    # the dataset flags
    ("dataset_probs_not_numbers", lambda f: _sft(f, "--dataset_probs", "x"), "--dataset_probs: 'x' is not a number"),
    ("dataset_probs_count", lambda f: _sft(f, "--dataset", f"{CHATS},{f['three']}", "--dataset_probs", "1"), "--dataset_probs has 1 value(s) for 2 datasets"),
    ("dataset_probs_negative", lambda f: _sft(f, "--dataset", f"{CHATS},{f['three']}", "--dataset_probs", "1,-1"), "--dataset_probs: every value must be > 0, got -1.0"),
    ("dataset_probs_yaml_list", lambda f: _sft(f, "--config", str(f["tmp"] / "probs.yaml")), "probs.yaml: option 'dataset_probs': 'half' is not a number"),
    ("eval_split_range", lambda f: _sft(f, "--eval_split", "1.5"), "--eval_split must be in [0, 1), got 1.5"),
    ("eval_split_too_few_rows", lambda f: _sft(f, "--dataset", f["three"], "--eval_split", "0.1", "--train_batch_size", "1",
                                               "--micro_train_batch_size", "1"), "three.jsonl: --eval_split 0.1 of 3 rows leaves the eval set empty"),
    ("eval_twice", lambda f: _sft(f, "--eval_dataset", CHATS, "--eval_split", "0.1"), "--eval_dataset and --eval_split both"),
    ("missing_dataset", lambda f: _sft(f, "--dataset", str(f["tmp"] / "nope.jsonl")), "--dataset"),
    # config files
    ("yaml_syntax", lambda f: _sft(f, "--config", str(f["tmp"] / "bad.yaml")), "bad.yaml:2: not valid YAML"),
    ("yaml_unknown_key", lambda f: _sft(f, "--config", str(f["tmp"] / "typo.yaml")), "typo.yaml: unknown option(s) learnin_rate"),
    ("yaml_missing", lambda f: _sft(f, "--config", str(f["tmp"] / "none.yaml")), "config file"),
    ("flag_type", lambda f: _sft(f, "--learning_rate", "abc"), "argument --learning_rate: invalid float value: 'abc'"),
    # batch arithmetic
    ("micro_not_dividing", lambda f: _sft(f, "--train_batch_size", "6", "--micro_train_batch_size", "4"),
     "--micro_train_batch_size 4 must divide the 6 samples per rank"),
    ("too_few_rows_for_a_batch", lambda f: _sft(f, "--dataset", f["three"], "--train_batch_size", "4"),
     "3 usable training conversations cannot fill one global batch of --train_batch_size 4"),
    # model paths
    ("pretrain_missing_abs", lambda f: _sft(f, "--pretrain", str(f["tmp"] / "nope")), "/nope: no such folder"),
    ("pretrain_missing_relative", lambda f: _sft(f, "--pretrain", "out/sft"), "--pretrain out/sft: no such folder"),
    ("pretrain_not_a_model", lambda f: _sft(f, "--pretrain", str(f["tmp"] / "not_a_model")), "not a model folder (no config.json)"),
    ("pretrain_is_a_file", lambda f: _sft(f, "--pretrain", CHATS), "a file, not a model folder"),
    # numbers
    ("lr_negative", lambda f: _sft(f, "--learning_rate", "-1"), "--learning_rate must be > 0, got -1.0"),
    ("lr_nan", lambda f: _sft(f, "--learning_rate", "nan"), "--learning_rate must be a finite number, got nan"),
    ("warmup_negative", lambda f: _sft(f, "--lr_warmup_ratio", "-0.1"), "--lr_warmup_ratio must be in [0, 1], got -0.1"),
    ("zero_stage_1", lambda f: _sft(f, "--zero_stage", "1"), "--zero_stage must be one of 2, 3, got 1"),
    ("logging_steps_0", lambda f: _sft(f, "--logging_steps", "0"), "--logging_steps must be >= 1, got 0"),
    ("lora_unknown_target", lambda f: _sft(f, "--lora_rank", "4", "--target_modules", "q_proj,qkv"),
     "--target_modules qkv: no such linear layer in"),
    ("save_adapter_without_lora", lambda f: _sft(f, "--save_adapter"), "--save_adapter needs --lora_rank > 0"),
    # outputs
    ("save_under_a_file", lambda f: _sft(f, "--save_path", CHATS + "/model"), "is a file, so nothing can be written under it"),
    ("save_over_pretrain", lambda f: _sft(f, "--save_path", f["model"]), "is also --pretrain: an output must not overwrite an input"),
    ("save_path_is_a_file", lambda f: _sft(f, "--save_path", CHATS), "a file is there, expected a folder"),
    # data that would train nothing
    ("sft_prompt_over_max_len", lambda f: _sft(f, "--dataset", f["long_prompt"], "--max_len", "64"),
     "long.jsonl:5: field 'messages': no assistant token within --max_len 64"),
    ("rm_chosen_equals_rejected", lambda f: _rm(f, "--dataset", f["same_pair"]), "same.jsonl:5: field 'reject': the same text as 'chose'"),
    ("rm_bad_loss", lambda f: _rm(f, "--loss", "hinge"), "--loss must be one of sigmoid, logexp, logexpwithlm"),
    # RL, all before Ray starts
    ("rl_reward_weights_text", lambda f: _rl(f, "--reward_weights", "1,x"), "--reward_weights: 'x' is not a number"),
    ("rl_reward_weights_inf", lambda f: _rl(f, "--reward_weights", "inf"), "--reward_weights: every value must be a finite number, got inf"),
    ("rl_reward_weights_count", lambda f: _rl(f, "--reward_weights", "1,2,3"), "--reward_weights has 3 value(s) for 1 reward models"),
    ("rl_negative_lr", lambda f: _rl(f, "--actor_learning_rate=-1e-6"), "--actor_learning_rate must be > 0"),
    ("rl_negative_temperature", lambda f: _rl(f, "--temperature", "-1"), "--temperature must be > 0"),
    ("rl_top_p", lambda f: _rl(f, "--top_p", "7"), "--top_p must be in (0, 1], got 7.0"),
    ("rl_500_engines", lambda f: _rl(f, "--vllm_num_engines", "500"), "the placement starts 503 worker processes"),
    ("rl_eval_split_leaves_too_few", lambda f: _rl(f, "--eval_split", "0.99"), "usable prompts, fewer than --rollout_batch_size"),
    ("rl_reward_missing", lambda f: _rl(f, "--reward_pretrain", str(f["tmp"] / "rm")), "--reward_pretrain"),
    ("rl_critic_unused", lambda f: _rl(f, "--critic_pretrain", f["model"]), "--critic_pretrain is unused with --advantage_estimator remax"),
    # the other commands
    ("generate_output_is_input", lambda f: ["self_ref.generate", ["--pretrain", f["model"], "--input", PROMPTS, "--output", PROMPTS]],
     "--output " + PROMPTS + " is also --input"),
    ("generate_top_p", lambda f: ["self_ref.generate", ["--pretrain", f["model"], "--input", PROMPTS, "--output",
                                                        str(f["tmp"] / "o.jsonl"), "--top_p", "7"]], "--top_p must be in (0, 1], got 7.0"),
    ("evaluate_bad_split", lambda f: ["self_ref.evaluate", ["--split", "train", "--output", str(f["tmp"] / "e.json")]],
     "--split must be one of dev, test, all"),
    ("demo_bad_port", lambda f: ["demo", ["--judge_port", "0", "--out", str(f["tmp"] / "demo")]], "--judge_port must be in [1, 65535]"),
]


def _run_in_process(module: str, argv: list[str], capfd) -> tuple[int, list[str], float]:
    import importlib

    main = importlib.import_module(module).main
    capfd.readouterr()
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    seconds = time.perf_counter() - t0
    err = capfd.readouterr().err
    return exit_info.value.code, [line for line in err.splitlines() if line.strip()], seconds


@pytest.mark.parametrize("case, build, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2_before_any_heavy_work(case, build, expected, files, capfd, monkeypatch):
    monkeypatch.chdir(files["tmp"])  # relative paths ("out/sft") resolve here, where out/ exists
    module, argv = build(files)
    code, lines, seconds = _run_in_process(module, argv, capfd)
    print(f"[case] {case} | {seconds:.2f} s | {lines[0] if lines else ''}")
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in lines[0]
    assert expected in lines[0], lines[0]
    assert not dist.is_initialized(), "a process group started before the check"
    if "ray" in sys.modules:
        import ray

        assert not ray.is_initialized(), "Ray started before the check"


def test_skip_bad_rows_counts_the_rows_that_would_train_nothing(files):
    """``--skip_bad_rows``: the over-long SFT row and the identical pair are left out and counted,
    and the run trains on the rest."""
    tmp = files["tmp"]
    sft = run_script(str(ROOT / "train_sft.py"), _sft(files, "--dataset", files["long_prompt"], "--max_len", "64",
                                                        "--skip_bad_rows", "--max_steps", "1")[1])
    assert "[data] training: skipped 1 of 8 rows (" in sft.stdout and "long.jsonl:5" in sft.stdout
    rm = run_script(str(ROOT / "train_rm_llama2.py"), _rm(files, "--dataset", files["same_pair"], "--skip_bad_rows",
                                                         "--max_steps", "1", "--logging_path", str(tmp / "rm_logs"))[1])
    assert "skipped 1 of 5 rows" in rm.stdout and "same.jsonl:5" in rm.stdout
    assert json.loads((tmp / "rm_logs" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


@pytest.mark.parametrize("nproc", [1, 2], ids=["python", "torchrun_2_ranks"])
def test_the_terminal_shows_one_error_line(files, nproc):
    """The real command: one ``error:`` line (under torchrun from rank 0 only; torchrun then adds
    its own report of the failed ranks and exits 1), no Python traceback of ours."""
    t0 = time.perf_counter()
    proc = run_script(str(ROOT / "train_rm_llama2.py"), _rm(files, "--dataset_probs", "0.5,0.5")[1], nproc=nproc, check=False)
    seconds = time.perf_counter() - t0
    print(f"train_rm_llama2.py with {nproc} process(es): exit {proc.returncode} after {seconds:.1f} s")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --dataset_probs has 2 value(s) for 1 datasets: give exactly 1"], proc.stderr[-3000:]
    if nproc == 1:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
    else:
        assert proc.returncode != 0 and "[rank" not in proc.stderr  # no rank's traceback


def test_the_rl_command_stops_before_ray(files):
    proc = run_script(str(ROOT / "fsdp_ppo_ray.py"), _rl(files, "--top_p", "7")[1], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --top_p must be in (0, 1], got 7.0"]
    assert "[ray]" not in proc.stdout and os.environ.get("RAY_ADDRESS") is None
