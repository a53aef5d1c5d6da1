"""train_sft.py end to end on the tiny model and the shipped chat corpus."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_sft
from rlhf_data.tokenize import tokenize_conversation
from tests.trainer_runs import base_args, kill_after_checkpoint, losses, run_script
from training.metrics_logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_sft.py")
CORPUS = ROOT / "models" / "assets" / "tiny_chat_corpus.jsonl"


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    d = tmp_path_factory.mktemp("chats")
    lines = CORPUS.read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(lines[:160]) + "\n")
    (d / "eval.jsonl").write_text("\n".join(lines[300:316]) + "\n")
    return d / "train.jsonl", d / "eval.jsonl"


def sft_args(model_dir, data, out, **kw):
    return base_args(model_dir, data, out, max_len=256, learning_rate=3e-3, **kw)


def test_sft_learns_and_saved_policy_scores_like_eval(tiny_model_dir, chats, tmp_path):
    train, eval_ = chats
    result = train_sft.main(sft_args(tiny_model_dir, train, tmp_path, eval_dataset=eval_, max_epochs=2,
                                     train_batch_size=16, packing_samples=True, save_path=tmp_path / "sft"))
    curve = losses(tmp_path)
    assert len(curve) == 20
    assert curve[-1] < curve[0] - 1.0, curve  # from ~ln(vocab) = 8.3 nats down

    # the saved folder is a plain causal LM whose assistant-token NLL equals the logged eval loss
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    nll, n = 0.0, 0
    with torch.no_grad():
        for line in eval_.read_text().splitlines():
            conv = tokenize_conversation(tok, json.loads(line)["messages"], max_len=256)
            ids = torch.tensor([conv.input_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(conv.loss_mask[1:])
            nll -= logp[mask].sum().item()
            n += int(mask.sum())
    assert nll / n == pytest.approx(result["eval_loss"], abs=1e-4)


def test_sft_packing_accumulation_and_two_processes_agree(tiny_model_dir, chats, tmp_path):
    train, _ = chats
    curves = {}
    runs = {
        "padded_1x8": dict(micro_train_batch_size=8),
        "padded_8x1": dict(micro_train_batch_size=1),
        "packed": dict(packing_samples=True, packing_max_tokens=700),
    }
    for name, extra in runs.items():
        train_sft.main(sft_args(tiny_model_dir, train, tmp_path / name, max_steps=4, **extra))
        curves[name] = losses(tmp_path / name)
    run_script(SCRIPT, sft_args(tiny_model_dir, train, tmp_path / "two", max_steps=4, packing_samples=True,
                                packing_max_tokens=700), nproc=2)
    curves["two_processes"] = losses(tmp_path / "two")
    for name in ("padded_8x1", "packed", "two_processes"):
        assert curves[name] == pytest.approx(curves["padded_1x8"], abs=1e-5, rel=0), name


def test_sft_kill_and_resume_equals_uninterrupted(tiny_model_dir, chats, tmp_path):
    train, _ = chats
    common = dict(max_steps=10, save_steps=1, packing_samples=True)
    train_sft.main(sft_args(tiny_model_dir, train, tmp_path / "full", **common))
    args = sft_args(tiny_model_dir, train, tmp_path / "killed", ckpt_path=tmp_path / "killed" / "ckpt", **common)
    kill_after_checkpoint(SCRIPT, args, tmp_path / "killed" / "ckpt", step=3)
    run_script(SCRIPT, args)
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "full"), abs=1e-6, rel=0)
    assert [r["step"] for r in read_metrics(tmp_path / "killed" / "log")] == list(range(1, 11))


def test_sft_bad_conversation_stops_with_one_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    proc = run_script(SCRIPT, sft_args(tiny_model_dir, bad, tmp_path), check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "bad.jsonl:2: field 'messages'" in last, last
