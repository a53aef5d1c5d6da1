"""best_of_n.py: the selection rule on hand-made numbers, the real command with vLLM and two reward
models checked against plain transformers, resume equal to an uninterrupted run, bad inputs.

The resume test runs in this process with the HF engine: its samples depend only on each prompt's
seed (one ``generate`` per prompt, no padding), so a resumed run must reproduce an uninterrupted
one token for token, and an in-process run costs seconds where a vLLM subprocess costs half a
minute here. vLLM seeds every request the same way (``sample_seed`` of the prompt id), and a
resumed vLLM run whose chunks held other prompts was byte-identical to an uninterrupted one when
measured (docs/best_of_n.md); it is not asserted, since a different batch may in principle move an
fp32 logit by an ulp and flip a sample.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import best_of_n
from rl.best_of_n import SAMPLES, pair_row, select_best_worst, sft_row, summarize
from rlhf_data import PreferenceKeys, validate_conversation, validate_preference
from training.cli import run_cli
from training.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "models" / "assets" / "tiny_prompts.jsonl"
CONFIG = ROOT / "configs" / "best_of_n_tiny.yaml"
WEIGHTS = (0.7, -0.4)  # a negative weight: the total is not a sum of same-signed scores

pytestmark = pytest.mark.timeout(600)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- selection (pure) --------------------------------------------------------------------------


def test_best_is_argmax_worst_is_argmin_first_on_ties():
    assert select_best_worst([0.1, 2.0, -1.0, 0.5]) == (1, 2)
    assert select_best_worst([3.0, 1.0, 3.0, 1.0]) == (0, 1)  # ties: the first index, both ends
    assert select_best_worst([7.0]) == (0, 0)
    # unusable (blank) samples are never chosen, even with the highest or lowest reward
    assert select_best_worst([9.0, 1.0, -9.0, 2.0], [False, True, False, True]) == (3, 1)
    assert select_best_worst([1.0, 2.0], [False, False]) is None


def _record(responses, rewards, usable=None):
    samples = [{"response": t, "rewards": [r], "reward": r, "tokens": 3, "ended": True} for t, r in zip(responses, rewards)]
    chosen = select_best_worst(rewards, usable)
    best, worst = chosen if chosen else (None, None)
    return {"id": "p:1", "message": [{"role": "user", "content": "Hi?"}], "samples": samples, "best": best, "worst": worst}


def test_rows_from_a_record_in_the_trainers_formats():
    rec = _record(["a", "b", "c"], [0.5, 2.0, -1.0])
    sft = sft_row(rec)
    assert sft["messages"][-1] == {"role": "assistant", "content": "b"} and sft["reward"] == 2.0
    validate_conversation(sft)  # train_sft.py's reader
    pair = pair_row(rec)
    assert (pair["chose"], pair["reject"], pair["margin"]) == ("b", "c", 3.0)
    assert pair["strength"] == pytest.approx(1 / (1 + math.exp(-3.0)))
    assert validate_preference(pair, PreferenceKeys())["margin"] == 3.0  # train_rm_llama2.py's reader
    # best and worst the same text: no pair (counted); no usable sample: neither row
    same = _record(["x", "x"], [1.0, 0.0])
    assert sft_row(same)["messages"][-1]["content"] == "x" and pair_row(same) is None
    blank = _record([" ", ""], [1.0, 0.0], [False, False])
    assert sft_row(blank) is None and pair_row(blank) is None
    s = summarize([rec, same, blank])
    assert s["mean_reward_all"] == pytest.approx((0.5 + 2.0 - 1.0 + 1.0 + 0.0 + 1.0 + 0.0) / 7)
    assert s["mean_reward_kept"] == pytest.approx((2.0 + 1.0) / 2)
    assert s["mean_reward_worst"] == pytest.approx((-1.0 + 0.0) / 2)
    assert (s["sft_rows"], s["pairs"], s["identical_pairs"], s["no_usable_response"], s["blank_responses"]) == (2, 1, 1, 1, 2)


# --- the command -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_models(tiny_model_dir, tmp_path_factory) -> list[str]:
    """Two reward models: the tiny backbone with differently seeded score heads, with its tokenizer."""
    from transformers import AutoTokenizer

    from models.fsdp import save_hf_pretrained
    from models.value_model import load_value_model

    root = tmp_path_factory.mktemp("bon_rms")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_hf_pretrained(load_value_model(str(tiny_model_dir), init_head_std=0.5), root / f"rm{seed}",
                           tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
        paths.append(str(root / f"rm{seed}"))
    return paths


def args(model, rms, out, *extra) -> list[str]:
    return ["--config", str(CONFIG), "--pretrain", str(model), "--reward_pretrain", ",".join(rms),
            "--reward_weights", ",".join(map(str, WEIGHTS)), "--prompt_data", str(PROMPTS),
            "--output", str(out), *extra]


def plain_transformers_score(model_dir: str, message: list[dict], response: str) -> float:
    """The RM's score with plain transformers on the unpadded sequence, tokenized as RM training
    does (the tiny tokenizer's pad differs from eos, so HF reads the last token)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_data.tokenize import tokenize_prompt_response

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.pad_token_id != tok.eos_token_id
    model = _plain_model(model_dir, AutoModelForSequenceClassification)
    ids = tokenize_prompt_response(tok, message, response, 256).input_ids
    with torch.no_grad():
        return float(model(torch.tensor([ids])).logits[0, 0])


_MODELS: dict = {}


def _plain_model(path, cls):
    if path not in _MODELS:
        _MODELS[path] = cls.from_pretrained(path, dtype=torch.float32).eval()
    return _MODELS[path]


def test_the_command_with_vllm_and_two_reward_models(tiny_model_dir, reward_models, tmp_path):
    """The real command (vLLM): rewards per model equal plain transformers, the total is their
    weighted sum, the best / worst follow the rule, the views follow the record, kept >= all."""
    out = tmp_path / "bon"
    proc = subprocess.run([sys.executable, str(ROOT / "best_of_n.py"),
                           *args(tiny_model_dir, reward_models, out, "--max_samples", "4", "--chunk_size", "3")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "[best-of-n] mean reward: kept" in proc.stdout

    records = read_rows(out / SAMPLES)
    assert [r["id"] for r in records] == [f"{PROMPTS.name}:{i}" for i in range(1, 5)]
    for r in records:
        assert len(r["samples"]) == 4
        for s in r["samples"]:
            assert s["reward"] == pytest.approx(WEIGHTS[0] * s["rewards"][0] + WEIGHTS[1] * s["rewards"][1], abs=1e-5)
        assert (r["best"], r["worst"]) == select_best_worst([s["reward"] for s in r["samples"]],
                                                            [bool(s["response"].strip()) for s in r["samples"]])
    # each reward model's score of the saved text, recomputed alone with plain transformers
    for r in records[:2]:
        for s in r["samples"]:
            for k, rm in enumerate(reward_models):
                assert s["rewards"][k] == pytest.approx(plain_transformers_score(rm, r["message"], s["response"]), abs=1e-4)
    assert read_rows(out / "sft.jsonl") == [row for r in records if (row := sft_row(r))]
    assert read_rows(out / "pairs.jsonl") == [row for r in records if (row := pair_row(r))]
    assert summary["prompts"] == 4 and summary["samples"] == 16
    assert summary["mean_reward_kept"] >= summary["mean_reward_all"] >= summary["mean_reward_worst"]
    assert summary["generate_tokens_per_s"] > 0 and summary["score_tokens_per_s"] > 0
    assert summary["generated_tokens"] == sum(s["tokens"] for r in records for s in r["samples"])


def test_a_killed_run_resumed_equals_an_uninterrupted_one(tiny_model_dir, reward_models, tmp_path):
    """HF engine, in process (see the module doc). The interrupted run stops after 1 prompt; then
    what a kill leaves is made by hand: the last prompt's record written but not its views (a kill
    between the writes) and a half-written line. The rerun repairs and continues in other chunks."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = ("--rollout_backend", "hf", "--chunk_size", "2", "--max_new_tokens", "8")
    best_of_n.main(args(tiny_model_dir, reward_models, whole, *common, "--max_samples", "5"))
    best_of_n.main(args(tiny_model_dir, reward_models, cut, *common, "--max_samples", "1"))
    for name in ("sft.jsonl", "pairs.jsonl"):
        lines = (cut / name).read_text().splitlines(keepends=True)
        (cut / name).write_text("".join(lines[:-1]))
    with open(cut / SAMPLES, "a") as f:
        f.write('{"id": "tiny_prompts.jsonl:2", "message": [')
    summary = best_of_n.main(args(tiny_model_dir, reward_models, cut, *common, "--max_samples", "5"))
    assert summary["prompts_this_run"] == 4  # chunks [2, 3], [4, 5]; the uninterrupted run's: [1, 2], [3, 4], [5]
    for name in (SAMPLES, "sft.jsonl", "pairs.jsonl"):
        assert (cut / name).read_text() == (whole / name).read_text(), name
    again = best_of_n.main(args(tiny_model_dir, reward_models, cut, *common, "--max_samples", "5"))
    assert again["prompts_this_run"] == 0 and again["prompts"] == 5
    # other sampling settings never continue this folder (its rows would mix two runs)
    with pytest.raises(ConfigError, match=r"--output .*cut holds a run with other settings \(--temperature was 1.0, now 0.5\)"):
        best_of_n.main(args(tiny_model_dir, reward_models, cut, *common, "--max_samples", "6", "--temperature", "0.5"))
    assert read_rows(cut / SAMPLES) == read_rows(whole / SAMPLES)


# --- bad inputs: one error line before any model loads -----------------------------------------


@pytest.mark.parametrize("extra, expected", [
    (("--reward_weights", "1,2,3"), "--reward_weights has 3 value(s) for 2 reward models"),
    (("--n_samples_per_prompt", "1"), "--n_samples_per_prompt must be >= 2, got 1"),
    (("--prompt_data", "BAD"), "BAD.jsonl:2: field 'message'"),
])
def test_bad_input_is_one_error_line(extra, expected, tiny_model_dir, reward_models, tmp_path, capfd):
    bad = tmp_path / "BAD.jsonl"
    bad.write_text(json.dumps({"message": "Hi?"}) + "\n" + json.dumps({"message": 3}) + "\n")
    extra = tuple(str(bad) if e == "BAD" else e for e in extra)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: best_of_n.main(args(tiny_model_dir, reward_models, tmp_path / "out", *extra)))
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # stopped before anything was written
