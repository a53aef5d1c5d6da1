"""self_ref.compare_policies: policy A against policy B by the judge, on real files and a real vLLM
judge server (the session's shared tiny judge), a real reward model folder and, once, real greedy
generation with vLLM from a policy folder (in a subprocess: an engine inside pytest is fragile)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.packing import PackedBatch
from rlhf_data.tokenize import tokenize_prompt_response
from self_ref import compare_policies
from self_ref.stats import length_controlled_win_rate, mean_interval, wilson_interval
from serving.ports import free_port
from tests.judge_servers import vllm_judge  # noqa: F401  (session fixture)
from training.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "models" / "assets" / "tiny_chat_corpus.jsonl"

pytestmark = pytest.mark.timeout(900)


def corpus_rows(n: int, offset: int = 0) -> list[dict]:
    """(id, prompt, the corpus's answer) for n conversations."""
    rows = []
    for i, line in enumerate(CORPUS.read_text().splitlines()[offset: offset + n]):
        turns = json.loads(line)["messages"]
        first_user = next(k for k, t in enumerate(turns) if t["role"] == "user")
        rows.append({"id": f"q{offset + i}", "message": turns[: first_user + 1], "answer": turns[first_user + 1]["content"]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_sides(tmp_path: Path, rows: list[dict], identical: set[int] = frozenset()) -> tuple[Path, Path]:
    """A answers with the corpus; B says it is not sure, except on the ``identical`` rows."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    a = [{"id": r["id"], "message": r["message"], "response": r["answer"]} for r in rows]
    b = [{"id": r["id"], "message": r["message"], "response": r["answer"] if i in identical else "I am not sure, sorry."}
         for i, r in enumerate(rows)]
    return write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b[::-1])  # B in another order


def dead_url() -> str:
    """A base URL nothing listens on (a request to it fails at once)."""
    return f"http://127.0.0.1:{free_port()}/v1"


def args(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        out += [f"--{k}", str(v)]
    return out


def judge_args(server, **kw) -> list[str]:
    return args(base_url=server.base_url, model=server.model, max_tokens=24, reference_max_tokens=24,
                max_parse_retries=0, timeout=60, max_retries=4, **kw)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_length_controlled_win_rate_takes_out_what_length_alone_wins():
    """Simulated verdicts from P(A wins) = sigmoid(theta + phi tanh(d / sd(d))): the fit recovers
    sigmoid(theta). With theta = 0 and A usually the longer, the raw win rate is far above 0.5
    and the length-controlled one is 0.5; with phi = 0 the two agree."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 4000
    d = rng.normal(25, 30, n)  # A is longer on most prompts
    x = np.tanh(d / d.std())
    for theta, phi in [(0.0, 2.0), (0.6, -1.0), (0.8, 0.0)]:
        p = 1 / (1 + np.exp(-(theta + phi * x)))
        u = rng.random(n)
        scores = np.where(u < p - 0.05, 1.0, np.where(u < p + 0.05, 0.5, 0.0))  # some ties, mean p
        lc, fitted_phi = length_controlled_win_rate(scores.tolist(), d.tolist(), n_boot=200)
        target = 1 / (1 + math.exp(-theta))
        assert abs(lc.value - target) < 0.03 and lc.low < target < lc.high, (theta, phi, lc)
        assert abs(fitted_phi - phi) < 0.25
        if phi == 2.0:
            assert scores.mean() > 0.65  # what a raw win rate would credit to the policy
    # one side wins every prompt: finite, near 1
    lc, _ = length_controlled_win_rate([1.0] * 20, list(range(20)), n_boot=50)
    assert 0.9 < lc.value <= 1.0 and lc.high <= 1.0


def test_identical_responses_are_all_ties_without_a_judge_request(tmp_path, tiny_model_dir):
    rows = corpus_rows(5)
    a, _ = write_sides(tmp_path, rows, identical=set(range(5)))
    out = tmp_path / "out"
    # nothing listens at the judge's URL: any request would fail and be counted
    summary = compare_policies.main(args(responses_a=a, responses_b=a, output=out, base_url=dead_url(), model="judge",
                                         max_retries=0, tokenizer=tiny_model_dir))
    assert summary["judge"]["requests"] == 0 and summary["failed"] == 0
    assert (summary["n"], summary["wins"], summary["ties"], summary["losses"]) == (5, 0, 5, 0)
    assert summary["win_rate"] == {"value": 0.5, "low": 0.5, "high": 0.5, "n": 5}
    assert summary["decisive_win_rate"]["n"] == 0 and summary["decisive_win_rate"]["value"] is None
    assert summary["tie_reasons"] == {"identical responses": 5}
    judged = read_rows(out / "judgements.jsonl")
    assert sorted(r["id"] for r in judged) == [r["id"] for r in rows]
    assert all(r["outcome"] == "tie" and r["score"] == 0.5 and "votes" not in r for r in judged)
    # token counts come from the tokenizer when the files lack them; both sides alike
    assert summary["a"]["length_tokens"] == summary["b"]["length_tokens"] and summary["a"]["length_tokens"]["value"] > 0
    assert summary["a"]["reward"] is None and summary["a"]["cut_at_max"] is None
    json.loads((out / "summary.json").read_text())  # strict JSON (no NaN)


def test_summary_follows_from_judgements_and_rewards_match_the_reward_model(vllm_judge, tmp_path, rm_dir):
    from transformers import AutoTokenizer

    from models.value_model import RewardModel

    rows = corpus_rows(6, offset=10)
    a, b = write_sides(tmp_path, rows, identical={2})
    out = tmp_path / "out"
    # --min_agreement 0.5: the tiny judge's orders rarely agree; let its mean probability decide
    summary = compare_policies.main(judge_args(vllm_judge, responses_a=a, responses_b=b, output=out, reward_model=rm_dir,
                                               min_agreement=0.5, name_a="corpus", name_b="unsure"))
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["complete"] and summary["judge"]["requests"] > 0

    # the judge's figures, recomputed from judgements.jsonl
    judged = {r["id"]: r for r in read_rows(out / "judgements.jsonl")}
    assert sorted(judged) == sorted(r["id"] for r in rows)
    assert judged["q12"]["reason"] == "identical responses"
    for r in judged.values():
        if r["id"] != "q12":
            assert len(r["votes"]) == 2 and [v["order"] for v in r["votes"]] == ["AB", "BA"]
            expected = "a" if r["prob_a"] > 0.5 else "b" if r["prob_a"] < 0.5 else "tie"
            assert r["outcome"] == expected and r["score"] == {"a": 1.0, "b": 0.0, "tie": 0.5}[expected]
    scores = [judged[r["id"]]["score"] for r in rows]
    wins = sum(r["outcome"] == "a" for r in judged.values())
    losses = sum(r["outcome"] == "b" for r in judged.values())
    assert (summary["wins"], summary["losses"], summary["ties"]) == (wins, losses, 6 - wins - losses)
    assert summary["win_rate"] == mean_interval(scores).to_dict()
    assert summary["win_rate"]["value"] == pytest.approx((wins + (6 - wins - losses) / 2) / 6)
    decisive = wilson_interval(wins, wins + losses).to_dict()
    assert summary["decisive_win_rate"] == {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                            for k, v in decisive.items()}
    assert summary["prob_a"] == mean_interval([judged[r["id"]]["prob_a"] for r in rows]).to_dict()
    tokens = {side: {r["id"]: r["tokens"] for r in read_rows(out / f"responses_{side}.jsonl")} for side in "ab"}
    lc, phi = length_controlled_win_rate([judged[r["id"]]["score"] for r in rows],
                                         [tokens["a"][r["id"]] - tokens["b"][r["id"]] for r in rows])
    assert summary["length_controlled_win_rate"] == lc.to_dict() and summary["length_coef"] == round(phi, 4)

    # each side's RM reward: a direct RewardModel call per conversation, tokenized as in RM training
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    rm = RewardModel.from_pretrained(str(rm_dir)).eval()
    per_id = {r["id"]: r for r in read_rows(out / "rewards.jsonl")}
    for side, path in (("a", a), ("b", b)):
        direct = {}
        for row in read_rows(path):
            ids = tokenize_prompt_response(tokenizer, row["message"], row["response"], max_len=2048).input_ids
            with torch.no_grad():
                direct[row["id"]] = rm(PackedBatch.from_sequences([ids])).item()
        for rid, value in direct.items():
            assert per_id[rid][f"reward_{side}"] == pytest.approx(value, abs=1e-4)
        mean = sum(direct.values()) / len(direct)
        assert summary[side]["reward"]["value"] == pytest.approx(mean, abs=1e-4) and summary[side]["reward"]["n"] == 6
    assert per_id["q12"]["reward_a"] == pytest.approx(per_id["q12"]["reward_b"], abs=1e-5)
    diff = [per_id[r["id"]]["reward_a"] - per_id[r["id"]]["reward_b"] for r in rows]
    assert summary["reward_diff"]["value"] == pytest.approx(sum(diff) / 6, abs=1e-6)

    # what the demo reports, straight from the summary: names, lengths, three examples in prompt
    # order among those whose responses differ (q12's are identical)
    assert (summary["a"]["name"], summary["b"]["name"]) == ("corpus", "unsure")
    assert [e["id"] for e in summary["examples"]] == ["q10", "q11", "q13"]
    for e, r in zip(summary["examples"], [r for r in rows if r["id"] != "q12"]):
        assert e["message"] == r["message"] and e["response_a"] == r["answer"]
        assert e["outcome"] == judged[r["id"]]["outcome"]
    assert summary["headline"].startswith("corpus vs unsure: judge win rate")
    assert (out / "responses_a.jsonl").exists() and (out / "responses_b.jsonl").exists()


def test_a_resumed_run_judges_only_what_is_left(vllm_judge, tmp_path):
    rows = corpus_rows(4, offset=30)
    a, b = write_sides(tmp_path, rows)
    out = tmp_path / "out"
    cmd = judge_args(vllm_judge, responses_a=a, responses_b=b, output=out, concurrency=1)
    first = compare_policies.main(cmd)
    assert first["n"] == 4 and first["judge"]["requests"] > 0
    path = out / "judgements.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    # as if killed while writing the third row: two whole rows and a partial line
    path.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])

    second = compare_policies.main(cmd)
    after = path.read_text().splitlines(keepends=True)
    assert after[:2] == lines[:2]  # done ids kept as they were, not judged again
    assert sorted(json.loads(l)["id"] for l in after) == [r["id"] for r in rows]  # each id once
    assert second["judge"]["requests"] > 0
    assert {k: second[k] for k in ("wins", "ties", "losses")} == {k: first[k] for k in ("wins", "ties", "losses")}

    third = compare_policies.main(cmd)  # everything judged: no request at all
    assert third["judge"]["requests"] == 0 and path.read_text().splitlines(keepends=True) == after
    assert third["win_rate"] == second["win_rate"]

    # other responses under the same output: refused, not mixed in
    rows[0]["answer"] = "Something else entirely."
    a2, b2 = write_sides(tmp_path / "changed", rows)
    with pytest.raises(compare_policies.ConfigError, match="judged on other responses"):
        compare_policies.main(judge_args(vllm_judge, responses_a=a2, responses_b=b2, output=out))


def one_line_error(capsys, argv: list[str]) -> str:
    """What ``python -m self_ref.compare_policies ARGV`` does with a user mistake: exit status 2, one line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: compare_policies.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_flags_and_files_stop_with_status_2_and_one_line(tmp_path, tiny_model_dir, capsys):
    rows = corpus_rows(3)
    a, b = write_sides(tmp_path, rows)
    ok = dict(responses_a=a, responses_b=b, output=tmp_path / "out", base_url=dead_url(), model="judge")
    no_id = write_jsonl(tmp_path / "no_id.jsonl", [{"message": "hi", "response": "hello"}])
    other_ids = write_jsonl(tmp_path / "other.jsonl", [{"id": f"z{i}", "message": r["message"], "response": "x"}
                                                       for i, r in enumerate(rows)])
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"id": "q0", "message": r["message"], "response": "x"} for r in rows])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "q0", "message": "hi", "response": "x"}\n{"id": \n')
    cases = {
        "exactly one of --policy_a": args(**{**ok, "policy_a": tiny_model_dir}),
        "--output DIR is required": args(**{k: v for k, v in ok.items() if k != "output"}),
        "no judge": args(**{k: v for k, v in ok.items() if k != "model"}),
        "not both": args(**ok, judge=tiny_model_dir),
        "--num_votes must be even": args(**ok, num_votes=3),
        "telepathy": args(**ok, mode="telepathy"),
        "no such folder": args(**{**ok, "responses_a": "", "policy_a": tmp_path / "nope"}, prompts=a),
        "--responses_b": args(**{**ok, "responses_b": tmp_path / "missing.jsonl"}),
        "field 'id'": args(**{**ok, "responses_a": no_id}),
        "no response for id": args(**{**ok, "responses_b": other_ids}),
        "broken.jsonl:2": args(**{**ok, "responses_b": broken}),
        "duplicate id 'q0'": args(**{**ok, "responses_b": twice}),
        "judge's templates YAML is --judge_prompts": args(**ok, prompts=ROOT / "configs" / "self_ref_prompts.yaml"),
        "--policy_a/--policy_b generate on --prompts": args(**{**ok, "responses_a": "", "policy_a": tiny_model_dir}),
        "--limit": args(**ok, limit=0),
        "--max_new_tokens": args(**ok, max_new_tokens=0),
        "unrecognized": [*args(**ok), "--no_such_flag", "1"],
    }
    for expected, argv in cases.items():
        if expected == "unrecognized":  # argparse's own exit status 2 (its usage line and one error line)
            with pytest.raises(SystemExit) as exit_info:
                compare_policies.main(argv)
            assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
            continue
        assert expected in one_line_error(capsys, argv), expected
    assert not (tmp_path / "out").exists()  # nothing written before the checks passed


def test_greedy_responses_from_policy_folders_with_vllm(tmp_path, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": r["id"], "message": r["message"]} for r in corpus_rows(3)])
    out = tmp_path / "out"
    argv = args(policy_a=tiny_model_dir, policy_b=tiny_model_dir, name_a="rl", name_b="sft", prompts=prompts, output=out,
                max_new_tokens=8, base_url=dead_url(), model="judge", max_retries=0)
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "self_ref.compare_policies", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    for side in ("a", "b"):
        rows = read_rows(out / f"responses_{side}.jsonl")
        assert [r["id"] for r in rows] == ["q0", "q1", "q2"]
        for r in rows:
            assert r["policy"] == str(Path(tiny_model_dir).resolve()) and r["max_new_tokens"] == 8
            assert r["finish_reason"] in ("stop", "length") and 0 <= r["tokens"] <= 8
            assert (r["tokens"] == 8) == (r["finish_reason"] == "length")
        lengths = [r["tokens"] for r in rows]
        assert summary[side]["length_tokens"]["value"] == pytest.approx(sum(lengths) / 3)
        cut = sum(r["finish_reason"] == "length" for r in rows)
        assert summary[side]["cut_at_max"]["value"] == pytest.approx(cut / 3)
    # one folder on both sides: the same greedy answers, ties without asking the judge
    assert read_rows(out / "responses_a.jsonl") == read_rows(out / "responses_b.jsonl")
    assert (summary["ties"], summary["judge"]["requests"], summary["win_rate"]["value"]) == (3, 0, 0.5)
    assert "[compare] rl: 0 responses reused" in proc.stdout

    # a rerun reuses the generated responses (no engine is built: safe in this process)
    again = compare_policies.main(argv)
    assert again["a"]["generated_now"] == again["b"]["generated_now"] == 0
    assert again["win_rate"] == summary["win_rate"]


def test_a_judge_settings_yaml_gives_the_judge_flags_and_flags_override_it(tmp_path, capsys):
    rows = corpus_rows(2)
    a, b = write_sides(tmp_path, rows)
    yaml_file = tmp_path / "judge.yaml"  # what self_ref.label / evaluate take with --config
    yaml_file.write_text(f"num_votes: 4\nmax_tokens: 16\nscore_verdict: false\nprompts: {ROOT / 'configs' / 'self_ref_prompts.yaml'}\n")
    argv = args(responses_a=a, responses_b=b, output=tmp_path / "out", model="judge", judge_config=yaml_file, max_tokens=20)
    cfg = compare_policies.parse_config(compare_policies.CompareConfig, compare_policies.with_judge_config(argv))
    settings = compare_policies.judge_settings(cfg)
    assert (settings.num_votes, settings.max_tokens, settings.score_verdict) == (4, 20, False)
    assert cfg.judge_prompts == str(ROOT / "configs" / "self_ref_prompts.yaml") and cfg.prompts == []
    yaml_file.write_text("num_votes: 2\ninput: pairs.jsonl\n")
    assert "unknown judge setting(s) input" in one_line_error(capsys, argv)
