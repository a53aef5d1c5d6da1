"""self_ref.evaluate: its figures on hand-made vote records, the shipped truth set's format, clear
errors, and one run against a real vLLM judge server (the tiny model) whose JSON must agree with
its own per-pair records."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_data.errors import DataError
from self_ref.evaluate import TRUTH_SET, load_truth_set, main as evaluate_main, pair_record, summarize
from self_ref.votes import Vote, aggregate_votes
from tests.judge_servers import vllm_judge  # noqa: F401  (session fixture)
from training.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BINS = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def judged(votes: list[Vote]) -> dict:
    records = [{"order": "BA" if v.swapped else "AB", "p_a": v.p_a, "p_first": v.p_first} for v in votes]
    return {"own_answer": "mine", "votes": records, "preference": aggregate_votes(votes, 0.5)}


def test_figures_from_vote_records_match_hand_computed():
    """Five pairs, two votes each (p_a of the A/B vote, then of the B/A vote):

    pair  better  p_first (AB, BA)  p     lean  agreement  right  orders agree
    1     0       0.8, 0.7          0.75  0     1          yes    yes
    2     1       0.9, 0.2          0.55  0     0.5        no     no
    3     1       0.2, 0.1          0.15  1     1          yes    yes
    4     0       0.5, 0.5          0.5   -     -          no     no (a vote at 0.5 prefers none)
    5     0       0.6, 0.3          0.45  1     0.5        no     no
    """
    cases = [(0, 0.8, 0.3), (1, 0.9, 0.8), (1, 0.2, 0.9), (0, 0.5, 0.5), (0, 0.6, 0.7)]
    records = [pair_record({"id": f"p{i}", "category": "fact" if i < 3 else "safety", "better": better},
                           judged([Vote(False, None, ab), Vote(True, None, ba)]))
               for i, (better, ab, ba) in enumerate(cases)]
    assert [r["lean"] for r in records] == [0, 0, 1, None, 1]
    assert [r["strength"] for r in records] == pytest.approx([0.75, 0.55, 0.85, 0.5, 0.55])

    s = summarize(records, [0.5, 0.75, 1.0], BINS, accept_agreement=0.5)
    # accuracy 2/5 with its Wilson interval, by hand: p = 0.4, z^2 = 3.8415, denominator 1.7683,
    # centre (0.4 + 0.38415) / 1.7683 = 0.44345, half 1.10839 * sqrt(0.048 + 0.038415) = 0.32583
    assert s["accuracy"]["value"] == pytest.approx(0.4) and s["accuracy"]["n"] == 5
    assert s["accuracy"]["low"] == pytest.approx(0.1176, abs=2e-4)
    assert s["accuracy"]["high"] == pytest.approx(0.7693, abs=2e-4)
    assert (s["accuracy_decided"]["value"], s["accuracy_decided"]["n"]) == (0.5, 4)  # the tie is undecided
    assert (s["consistency"]["value"], s["consistency"]["n"]) == (0.4, 5)
    assert (s["picked_first"]["value"], s["picked_first"]["n"]) == (0.4, 5)
    calibration = {(b["low"], b["high"]): (b["n"], b["accuracy"]["value"]) for b in s["calibration"]}
    assert calibration[(0.5, 0.6)] == (2, 0.0)  # pairs 2 and 5 lean the wrong way
    assert calibration[(0.7, 0.8)] == (1, 1.0) and calibration[(0.8, 0.9)] == (1, 1.0)
    assert calibration[(0.6, 0.7)][0] == 0 and math.isnan(calibration[(0.6, 0.7)][1])
    assert calibration[(0.9, 1.0)][0] == 0
    kept = {k["min_agreement"]: (k["share"]["value"], k["accuracy"]["value"], k["accuracy"]["n"]) for k in s["kept"]}
    assert kept[0.5] == (0.8, 0.5, 4)
    assert kept[0.75] == (0.4, 1.0, 2) and kept[1.0] == (0.4, 1.0, 2)
    assert s["by_category"]["fact"]["value"] == pytest.approx(2 / 3) and s["by_category"]["safety"]["value"] == 0.0

    # labelling at min_agreement 1.0 rejects pairs 2 and 5: they count as wrong, the right ones stay
    strict = summarize(records, [1.0], BINS, accept_agreement=1.0)
    assert (strict["accuracy"]["value"], strict["accuracy_decided"]["value"], strict["accuracy_decided"]["n"]) == (0.4, 1.0, 2)


def test_consistency_counts_rounds_and_skips_pointwise_votes():
    def vote(order, p_first, **kw):
        return {"order": order, "p_first": p_first, **kw}

    records = [
        # four votes = two rounds: round 1 agrees, round 2 does not
        {"votes": [vote("AB", 0.7), vote("BA", 0.6), vote("AB", 0.7), vote("BA", 0.4)], "lean": 0, "better": 0,
         "agreement": 0.75, "strength": 0.6, "category": None},
        # corrected votes agree, the raw ones did not: consistency reads the raw ones
        {"votes": [vote("AB", 0.6, p_first_raw=0.9), vote("BA", 0.6, p_first_raw=0.3)], "lean": 0, "better": 0,
         "agreement": 1.0, "strength": 0.6, "category": None},
        {"votes": [vote("AB", 0.8, pointwise=True), vote("BA", 0.8, pointwise=True)], "lean": 0, "better": 0,
         "agreement": 1.0, "strength": 0.8, "category": None},
    ]
    s = summarize(records, [0.5], BINS)
    assert (s["consistency"]["value"], s["consistency"]["n"]) == (pytest.approx(1 / 3), 3)


def test_shipped_truth_set_format():
    rows = [json.loads(line) for line in TRUTH_SET.read_text().splitlines() if line.strip()]
    assert len(rows) >= 60
    assert len({r["id"] for r in rows}) == len(rows)
    assert sum(r["better"] == 0 for r in rows) * 2 == len(rows)  # better answer first in exactly half
    for r in rows:
        assert set(r) == {"id", "message", "responses", "better", "category", "split"}
        assert r["message"][-1]["role"] == "user" and r["better"] in (0, 1) and len(r["responses"]) == 2
        assert r["category"] in ("fact", "advice", "safety", "instruction") and r["split"] in ("dev", "test")
    for split in ("dev", "test"):
        part = [r for r in rows if r["split"] == split]
        assert len(part) * 2 == len(rows)
        assert sum(r["better"] == 0 for r in part) * 2 == len(part)
        assert {r["category"] for r in part} == {"fact", "advice", "safety", "instruction"}
        # length is no shortcut: the worse answer is the longer one in 35-65% of each split
        longer = sum(len(r["responses"][1 - r["better"]]) > len(r["responses"][r["better"]]) for r in part)
        assert 0.35 <= longer / len(part) <= 0.65
    assert len(load_truth_set(str(TRUTH_SET), "dev")) == len(rows) // 2  # the reader agrees


def test_bad_inputs_fail_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"message": "Q?", "responses": ["a", "b"], "better": 2}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'better': expected 0 or 1"):
        load_truth_set(str(bad))
    with pytest.raises(ConfigError, match="no rows with split 'dev'"):
        load_truth_set(_no_split(tmp_path), "dev")
    with pytest.raises(ConfigError, match="--split must be one of"):
        evaluate_main(["--split", "train"])
    with pytest.raises(ConfigError, match="--min_agreement needs numbers in"):
        evaluate_main(["--min_agreement", "0.5,2"])
    with pytest.raises(ConfigError, match="--verdict must be one of"):
        evaluate_main(["--verdict", "triple"])
    with pytest.raises(ConfigError, match="not a model folder"):
        evaluate_main(["--serve", str(tmp_path)])
    # from the shell: exit status 2 and one line on stderr, no traceback
    done = subprocess.run([sys.executable, "-m", "self_ref.evaluate", "--input", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("error: ") and "'better'" in done.stderr


def _no_split(tmp_path: Path) -> str:
    path = tmp_path / "nosplit.jsonl"
    path.write_text(json.dumps({"message": "Q?", "responses": ["a", "b"], "better": 0}) + "\n")
    return str(path)


def test_unreachable_judge_is_one_clear_error(tmp_path):
    from serving.ports import free_port

    with pytest.raises(ConfigError, match="cannot reach the judge"):
        evaluate_main(["--base_url", f"http://127.0.0.1:{free_port()}/v1", "--limit", "1", "--max_retries", "0",
                       "--output", str(tmp_path / "e.json")])


def _check_mode_against_records(m: dict, accept: float) -> None:
    """Every figure of one mode recomputed from its own per-pair records."""
    pairs = m["pairs"]
    n = len(pairs)
    right = [p["lean"] == p["better"] and p["lean"] is not None and p["agreement"] >= accept for p in pairs]
    assert m["accuracy"]["n"] == n and m["accuracy"]["value"] == pytest.approx(sum(right) / n)
    assert m["accuracy"]["low"] <= m["accuracy"]["value"] <= m["accuracy"]["high"]
    for p in pairs:
        ps = [v["p_first"] for v in p["votes"] if v["p_first"] is not None]
        assert p["prob_first"] == pytest.approx(sum(ps) / len(ps))  # the mean_prob aggregate
        assert p["strength"] == pytest.approx(max(p["prob_first"], 1 - p["prob_first"]))
        assert p["lean"] == (None if p["prob_first"] == 0.5 else 0 if p["prob_first"] > 0.5 else 1)
        for v in p["votes"]:
            assert v["p_first"] == pytest.approx(v["p_a"] if v["order"] == "AB" else 1 - v["p_a"])
    pair_votes = [p["votes"] for p in pairs if not p["votes"][0].get("pointwise")]
    agree = sum((v[0]["p_first"] > 0.5) == (v[1]["p_first"] > 0.5) and 0.5 not in (v[0]["p_first"], v[1]["p_first"])
                for v in pair_votes)
    assert m["consistency"]["n"] == len(pair_votes)
    if pair_votes:
        assert m["consistency"]["value"] == pytest.approx(agree / len(pair_votes))
    assert sum(b["n"] for b in m["calibration"]) == sum(p["lean"] is not None for p in pairs)
    for k in m["kept"]:
        kept = [p for p in pairs if p["lean"] is not None and p["agreement"] >= k["min_agreement"]]
        assert k["share"]["value"] == pytest.approx(len(kept) / n)
        if kept:
            assert k["accuracy"]["value"] == pytest.approx(sum(p["lean"] == p["better"] for p in kept) / len(kept))
    assert m["pairs_per_s"] > 0 and m["failed"] == 0


def test_end_to_end_against_a_real_vllm_judge(vllm_judge, tmp_path):
    out = tmp_path / "eval.json"
    result = evaluate_main(["--base_url", vllm_judge.base_url, "--model", vllm_judge.model, "--split", "dev",
                            "--limit", "4", "--max_tokens", "0", "--reference_max_tokens", "16",
                            "--min_agreement", "0.5,1.0", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["modes"].keys() == {"self_reference", "direct"} and saved["n_pairs"] == 4
    assert saved["modes"]["self_reference"]["accuracy"] == result["modes"]["self_reference"]["accuracy"]
    for mode, m in saved["modes"].items():
        _check_mode_against_records(m, accept=0.5)
        assert m["strength_sources"] == {"score": 8}  # vLLM scored every verdict label
        for p in m["pairs"]:
            assert [v["order"] for v in p["votes"]] == ["AB", "BA"]
            assert (p["own_answer"] is None) == (mode == "direct")
    assert saved["pairs_per_s"] > 0
    ids = [p["id"] for p in saved["modes"]["direct"]["pairs"]]
    assert ids == [r["id"] for r in load_truth_set(str(TRUTH_SET), "dev")][:4]

    # the pointwise format with the small judge's prompts: one check per response, shared by both orders
    result = evaluate_main(["--base_url", vllm_judge.base_url, "--model", vllm_judge.model, "--split", "test",
                            "--limit", "2", "--mode", "self_reference", "--config", str(ROOT / "configs" / "judge_small.yaml"),
                            "--reference_max_tokens", "16", "--output", str(tmp_path / "pw.json")])
    m = result["modes"]["self_reference"]
    _check_mode_against_records(m, accept=0.5)
    assert m["consistency"]["n"] == 0  # no positions in the pointwise format
    for p in m["pairs"]:
        a, b = p["votes"]
        assert a["pointwise"] and [c["response"] for c in a["checks"]] == [1, 2] and [c["response"] for c in b["checks"]] == [2, 1]
        assert a["p_first"] == pytest.approx(b["p_first"])


# --- a reward model measured on the same pairs ------------------------------------------------


def test_a_reward_model_on_the_truth_set_matches_direct_scoring(tmp_path, rm_dir):
    """`--reward_model`: every response scored as one direct RewardModel call on its own (the
    packed batches must not mix conversations), a pair right when r(better) > r(worse); flipping
    every `better` flips every verdict."""
    import torch
    from transformers import AutoTokenizer

    from models.packing import PackedBatch
    from models.value_model import RewardModel
    from rlhf_data.tokenize import tokenize_prompt_response

    rows = [json.loads(line) for line in TRUTH_SET.read_text().splitlines() if line.strip()][:12]
    truth = tmp_path / "truth.jsonl"
    truth.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate_main(["--reward_model", str(rm_dir), "--input", str(truth), "--split", "all",
                            "--output", str(tmp_path / "rm_eval.json"), "--rm_batch_tokens", "256"])
    m = result["modes"]["reward_model"]
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    rm = RewardModel.from_pretrained(str(rm_dir)).eval()
    right = 0
    for row, record in zip(rows, m["pairs"]):
        direct = []
        for response in row["responses"]:
            ids = tokenize_prompt_response(tokenizer, row["message"], response, max_len=2048).input_ids
            with torch.no_grad():
                direct.append(rm(PackedBatch.from_sequences([ids])).item())
        assert record["rewards"] == pytest.approx(direct, abs=1e-4)
        margin = direct[row["better"]] - direct[1 - row["better"]]
        assert record["margin"] == pytest.approx(margin, abs=1e-4) and record["right"] == (margin > 0)
        right += margin > 0
    assert (m["accuracy"]["value"], m["accuracy"]["n"]) == (pytest.approx(right / 12), 12)
    assert sum(v["n"] for v in m["by_category"].values()) == 12
    assert json.loads((tmp_path / "rm_eval.json").read_text())["reward_model"] == str(rm_dir)

    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("".join(json.dumps({**r, "better": 1 - r["better"]}) + "\n" for r in rows))
    again = evaluate_main(["--reward_model", str(rm_dir), "--input", str(flipped), "--split", "all",
                           "--output", str(tmp_path / "flipped.json")])["modes"]["reward_model"]
    assert [r["right"] for r in again["pairs"]] == [not r["right"] for r in m["pairs"]]
    assert again["mean_margin"] == pytest.approx(-m["mean_margin"], abs=1e-5)


def test_a_reward_model_and_a_judge_server_at_once_is_one_line(tmp_path, rm_dir, tiny_model_dir):
    with pytest.raises(ConfigError, match="--reward_model measures a reward model, --serve a judge: give one"):
        evaluate_main(["--reward_model", str(rm_dir), "--serve", str(tiny_model_dir), "--output", str(tmp_path / "x.json")])


def test_own_answer_gain_is_read_pair_by_pair():
    """benchmarks.own_answer_gain: three pairs, hand-computed. SmolLM2 right (self-ref, direct):
    p1 (1, 0), p2 (0, 0), p3 (1, 1) -> gain 1/3; the 1.5B: p1 (1, 1), p2 (1, 0), p3 (1, 0) ->
    gain 2/3, and gain minus SmolLM2's per pair: 0 - 1, 1 - 0, 1 - 0 -> 1/3. An undecided pair
    (lean None) or one whose votes agree less than 0.5 is wrong."""
    from benchmarks.own_answer_gain import own_answer_gain

    def mode(right: list[int]) -> dict:
        return {"pairs": [{"id": f"p{i}", "better": 0, "lean": 0 if r else (1 if i != 2 else None), "agreement": 1.0}
                          for i, r in enumerate(right, 1)]}

    def run(sr: list[int], direct: list[int]) -> dict:
        return {"variants": {"small_pointwise": {"modes": {"self_reference": mode(sr), "direct": mode(direct)}}}}

    runs = {"test:smollm2:3": run([1, 0, 1], [0, 0, 1]), "test:qwen2.5-coder-1.5b:3": run([1, 1, 1], [1, 0, 0]),
            "dev:smollm2:3": run([0, 0, 0], [1, 1, 1])}
    result = own_answer_gain(runs)["small_pointwise"]
    assert set(result) == {"smollm2", "qwen2.5-coder-1.5b"}
    assert result["smollm2"]["gain"]["value"] == pytest.approx(1 / 3) and result["smollm2"]["self_reference"] == pytest.approx(2 / 3)
    big = result["qwen2.5-coder-1.5b"]
    assert big["gain"]["value"] == pytest.approx(2 / 3) and big["direct"] == pytest.approx(1 / 3)
    assert big["gain_minus_smollm2"]["value"] == pytest.approx(1 / 3) and big["gain_minus_smollm2"]["n"] == 3
