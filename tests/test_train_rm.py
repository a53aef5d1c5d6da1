"""train_rm_llama2.py end to end on the tiny model: learning, equivalences, resume, bad input."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import train_rm_llama2
from rlhf_data.tokenize import tokenize_preference
from rlhf_data import validate_preference
from tests.synthetic_data import preference_rows, write_jsonl, write_preference_split
from tests.trainer_runs import base_args, kill_after_checkpoint, losses, run_script
from training.metrics_logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_rm_llama2.py")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_preference_split(tmp_path_factory.mktemp("prefs"), 320)


def test_learns_a_learnable_rule_and_saved_model_scores_like_eval(tiny_model_dir, prefs, tmp_path):
    train, eval_ = prefs
    result = train_rm_llama2.main(base_args(
        tiny_model_dir, train, tmp_path, eval_dataset=eval_, train_batch_size=16, max_epochs=2,
        packing_samples=True, loss="logexpwithlm", lm_loss_coef=0.1, save_path=tmp_path / "rm", eval_steps=10,
    ))
    assert result["eval_acc"] >= 0.9, result
    rows = read_metrics(tmp_path / "log")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))
    assert {"rm_loss", "lm_loss", "acc", "grad_norm", "lr", "tokens_per_s"} <= set(rows[0])

    # the saved folder is a plain HF reward model scoring exactly as our evaluation did
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    expected = json.loads((tmp_path / "log" / "eval_rewards.json").read_text())
    eval_rows = [validate_preference(json.loads(line)) for line in eval_.read_text().splitlines()]
    with torch.no_grad():
        for row, (c, r) in list(zip(eval_rows, expected))[:16]:
            pair = tokenize_preference(tok, row, max_len=96)
            assert abs(model(torch.tensor([pair.chosen])).logits[0, 0].item() - c) <= 1e-5
            assert abs(model(torch.tensor([pair.rejected])).logits[0, 0].item() - r) <= 1e-5


def test_gradient_accumulation_and_packing_do_not_change_the_loss_curve(tiny_model_dir, prefs, tmp_path):
    train, _ = prefs
    curves = {}
    for name, extra in {
        "1x8": {"micro_train_batch_size": 8},
        "8x1": {"micro_train_batch_size": 1},
        "packed": {"packing_samples": True, "packing_max_tokens": 300},
    }.items():
        train_rm_llama2.main(base_args(tiny_model_dir, train, tmp_path / name, max_steps=6, loss="logexpwithlm", **extra))
        curves[name] = losses(tmp_path / name)
    assert len(curves["1x8"]) == 6
    for name in ("8x1", "packed"):
        assert curves[name] == pytest.approx(curves["1x8"], abs=1e-5, rel=0), name
    assert curves["1x8"][0] != pytest.approx(curves["1x8"][-1], abs=1e-3)  # it trains


def test_two_process_fsdp_gives_the_single_process_loss_curve(tiny_model_dir, prefs, tmp_path):
    train, _ = prefs
    odd_eval = write_jsonl(tmp_path / "eval7.jsonl", preference_rows(7, seed=2))  # 7 pairs over 2 ranks
    common = dict(max_steps=5, packing_samples=True, packing_max_tokens=300, loss="sigmoid", eval_dataset=odd_eval)
    run_script(SCRIPT, base_args(tiny_model_dir, train, tmp_path / "two", **common), nproc=2)
    train_rm_llama2.main(base_args(tiny_model_dir, train, tmp_path / "one", **common))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 5
    assert two == pytest.approx(one, abs=1e-5, rel=0)
    evals = {name: [r for r in read_metrics(tmp_path / name / "log") if "eval_loss" in r][-1] for name in ("one", "two")}
    assert evals["two"]["eval_loss"] == pytest.approx(evals["one"]["eval_loss"], abs=1e-5)
    assert evals["two"]["eval_acc"] == evals["one"]["eval_acc"]


def test_kill_and_resume_equals_uninterrupted(tiny_model_dir, prefs, tmp_path):
    train, _ = prefs
    common = dict(max_steps=12, save_steps=1, packing_samples=True, loss="logexpwithlm")
    train_rm_llama2.main(base_args(tiny_model_dir, train, tmp_path / "full", **common))
    args = base_args(tiny_model_dir, train, tmp_path / "killed", ckpt_path=tmp_path / "killed" / "ckpt", **common)
    kill_after_checkpoint(SCRIPT, args, tmp_path / "killed" / "ckpt", step=4)
    assert 4 <= len(losses(tmp_path / "killed")) < 12
    run_script(SCRIPT, args)  # the same command resumes
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "full"), abs=1e-6, rel=0)
    assert [r["step"] for r in read_metrics(tmp_path / "killed" / "log") if "loss" in r] == list(range(1, 13))


BAD_CASES = {
    "broken_json": ('{"message": "hi", "chose": "a", "reject": "b"}\n{"message": "hi", "chose": \n', r"bad.jsonl:2: .*JSON"),
    "missing_key": ('{"message": "hi", "chose": "a"}\n', r"bad.jsonl:1: field 'reject': missing"),
    "wrong_type": ('{"message": "hi", "chose": 3, "reject": "b"}\n', r"bad.jsonl:1: field 'chose': .*got int"),
    "empty_response": ('{"message": "hi", "chose": "a", "reject": "  "}\n', r"bad.jsonl:1: field 'reject': .*empty"),
    "unknown_role": ('{"message": [{"role": "robot", "content": "hi"}], "chose": "a", "reject": "b"}\n', r"bad.jsonl:1: field 'message\[0\].role'"),
    "empty_file": ("", r"bad.jsonl: .*(empty|no rows)"),
    "invalid_utf8": (b'{"message": "hi", "chose": "a", "reject": "b"}\n{"message": "\xff\xfe", "chose": "a", "reject": "b"}\n', r"bad.jsonl:2: .*UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_stops_with_one_clear_line(tiny_model_dir, tmp_path, case):
    content, pattern = BAD_CASES[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc = run_script(SCRIPT, base_args(tiny_model_dir, bad, tmp_path), check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(pattern, last), last
    assert not (tmp_path / "log" / "metrics.jsonl").exists()  # stopped before any training


def test_skip_bad_rows_reports_them_and_trains(tiny_model_dir, prefs, tmp_path):
    train, _ = prefs
    mixed = tmp_path / "mixed.jsonl"
    lines = train.read_text().splitlines()[:40]
    lines[3] = '{"message": "hi", "chose": 7, "reject": "b"}'
    lines[9] = "not json"
    mixed.write_text("\n".join(lines) + "\n")
    proc = run_script(SCRIPT, base_args(tiny_model_dir, mixed, tmp_path, max_steps=1, skip_bad_rows=True))
    assert "skipped 2 of 40 rows" in proc.stdout
    assert "mixed.jsonl:4" in proc.stdout and "mixed.jsonl:10" in proc.stdout
