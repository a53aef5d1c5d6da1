"""self_ref.label against a real vLLM server (tiny judge) on 127.0.0.1: the whole flow, order
symmetry of the strength, kill -9 + rerun, and a fault-injecting proxy."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_data import validate_preference
from self_ref.label import main as label_main, read_done_ids
from tests.judge_servers import FaultProxy, vllm_judge  # noqa: F401  (session fixture)

CORPUS = Path(__file__).resolve().parents[1] / "models" / "assets" / "tiny_chat_corpus.jsonl"


def write_pairs(path: Path, n: int, offset: int = 0, swap: bool = False) -> Path:
    rows = []
    for line in CORPUS.read_text().splitlines()[offset: offset + n]:
        turns = json.loads(line)["messages"]
        first_user = next(i for i, t in enumerate(turns) if t["role"] == "user")
        responses = [turns[first_user + 1]["content"], "I am not sure, sorry."]
        rows.append({"message": turns[: first_user + 1], "responses": responses[::-1] if swap else responses})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def label_args(server, pairs, out, **kw):
    args = {"input": pairs, "output": out, "base_url": server.base_url, "model": server.model,
            "max_tokens": 48, "reference_max_tokens": 48, "concurrency": 4, "min_agreement": 0.5,
            "timeout": 20, "max_retries": 6} | kw
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def all_rows(out: Path) -> dict[str, dict]:
    rows = {}
    for path in (out, out.with_suffix(".rejects.jsonl")):
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                assert row["id"] not in rows, f"duplicate {row['id']}"
                rows[row["id"]] = row
    return rows


def test_full_flow_gives_valid_preference_rows(vllm_judge, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    summary = label_main(label_args(vllm_judge, pairs, tmp_path / "prefs.jsonl", num_votes=4))
    rows = all_rows(tmp_path / "prefs.jsonl")
    assert sorted(rows) == sorted(f"pairs.jsonl:{i}" for i in range(1, 9))
    assert summary["labelled"] + summary["rejected"] == 8 and summary["failed"] == 0
    assert summary["strength_sources"] == {"score": 32}  # vLLM scores the verdict labels exactly
    for row in rows.values():
        assert 0.5 <= row["strength"] <= 1.0 and 0.0 <= row["prob_first"] <= 1.0
        assert len(row["votes"]) == 4 and [v["order"] for v in row["votes"]] == ["AB", "BA", "AB", "BA"]
        for v in row["votes"]:
            assert 0.0 <= v["p_a"] <= 1.0
            assert v["p_first"] == pytest.approx(v["p_a"] if v["order"] == "AB" else 1 - v["p_a"])
        assert row["judge_answer"] and row["judge_model"] == vllm_judge.model
        if "chose" in row:  # the schema the reward-model trainer reads
            valid = validate_preference(row)
            assert valid["margin"] == pytest.approx(row["margin"]) and row["margin"] >= 0
            assert {row["chose"], row["reject"]} == set(json.loads(
                pairs.read_text().splitlines()[int(row["id"].split(":")[1]) - 1])["responses"])


def test_strength_flips_when_the_order_flips(vllm_judge, tmp_path):
    a = label_main(label_args(vllm_judge, write_pairs(tmp_path / "a.jsonl", 4), tmp_path / "a_out.jsonl", concurrency=1))
    b = label_main(label_args(vllm_judge, write_pairs(tmp_path / "b.jsonl", 4, swap=True), tmp_path / "b_out.jsonl", concurrency=1))
    assert a["failed"] == b["failed"] == 0
    rows_a, rows_b = all_rows(tmp_path / "a_out.jsonl"), all_rows(tmp_path / "b_out.jsonl")
    for i in range(1, 5):
        ra, rb = rows_a[f"a.jsonl:{i}"], rows_b[f"b.jsonl:{i}"]
        assert rb["prob_first"] == pytest.approx(1 - ra["prob_first"], abs=1e-4)
        if "chose" in ra and "chose" in rb:
            assert ra["chose"] == rb["chose"]  # the same response wins, whichever slot it is in


def test_kill_9_then_rerun_gives_exactly_the_uninterrupted_items(vllm_judge, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 16, offset=20)
    label_main(label_args(vllm_judge, pairs, tmp_path / "clean.jsonl"))

    out = tmp_path / "killed.jsonl"
    args = label_args(vllm_judge, pairs, out, concurrency=2)
    proc = subprocess.Popen([sys.executable, "-m", "self_ref.label", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(read_done_ids(out))
    assert 3 <= partial < 16

    label_main(args)  # the same command finishes the job
    clean, resumed = all_rows(tmp_path / "clean.jsonl"), all_rows(out)
    assert sorted(resumed) == sorted(clean)
    for key in clean:  # the same judgements, not just the same ids (the tiny judge is deterministic)
        assert resumed[key] == clean[key], key


def test_faulty_network_loses_and_duplicates_nothing(vllm_judge, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 12, offset=40)
    ids = {f"pairs.jsonl:{i}" for i in range(1, 13)}
    with FaultProxy(vllm_judge.base_url, delay=0.05, error500=0.1, drop=0.1, garbage=0.05, reset_after=0.05, seed=1) as proxy:
        summary = label_main(label_args(vllm_judge, pairs, tmp_path / "out.jsonl", base_url=proxy.base_url,
                                        timeout=2, max_retries=8))
        injected = dict(proxy.stats)
    assert sum(v for k, v in injected.items() if k != "pass") > 0, injected
    rows = all_rows(tmp_path / "out.jsonl")  # asserts no duplicate
    assert set(rows) <= ids
    # every pair is either written once or counted as failed; a rerun (no faults) completes the set
    assert len(rows) + summary["failed"] == 12
    assert summary["retries"] > 0
    label_main(label_args(vllm_judge, pairs, tmp_path / "out.jsonl"))
    assert set(all_rows(tmp_path / "out.jsonl")) == ids


def test_label_takes_the_evaluated_method(vllm_judge, tmp_path):
    """The judge's method flags of self_ref.evaluate (here the small judge's config: pointwise
    checks against the quoted own answer, no critique) label the same way, and direct mode
    labels without an own answer."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", 3, offset=60)
    config = Path(__file__).resolve().parents[1] / "configs" / "judge_small.yaml"
    summary = label_main(["--config", str(config)] + label_args(vllm_judge, pairs, tmp_path / "small.jsonl", max_tokens=0))
    assert summary["labelled"] + summary["rejected"] == 3 and summary["failed"] == 0
    assert summary["strength_sources"] == {"score": 6}
    for row in all_rows(tmp_path / "small.jsonl").values():
        assert row["judge_answer"]
        for vote in row["votes"]:
            assert vote["pointwise"] and len(vote["checks"]) == 2
            assert all(0.0 < c["p_yes"] < 1.0 for c in vote["checks"])
    summary = label_main(label_args(vllm_judge, pairs, tmp_path / "direct.jsonl", mode="direct", max_tokens=0))
    assert summary["failed"] == 0 and summary["strength_sources"] == {"score": 6}
    for row in all_rows(tmp_path / "direct.jsonl").values():
        assert row["judge_answer"] is None
        assert [v["text"] for v in row["votes"]] == [f"Verdict: {v['verdict']}" for v in row["votes"]]
