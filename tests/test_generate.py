"""self_ref.generate: two sampled responses per prompt, resumable, from vLLM offline or a server.

The vllm-backend runs are subprocesses (``python -m self_ref.generate``): an engine inside the
pytest process is fragile. The openai backend runs in-process against the session's real vLLM
server (``vllm_judge``), directly and through the fault proxy.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from rlhf_data import DataError, load_rows, validate_prompt
from rlhf_data.schema import validate_response_pair
from self_ref import generate
from self_ref.jsonl_store import read_done_ids
from tests.judge_servers import FaultProxy, vllm_judge  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "models" / "assets" / "tiny_chat_corpus.jsonl"
CONFIG = ROOT / "configs" / "generate_tiny.yaml"

pytestmark = pytest.mark.timeout(900)


def corpus_prompts(n: int) -> list[dict]:
    """Each conversation's turns up to its first user turn, as a prompt row."""
    rows = []
    for line in CORPUS.read_text().splitlines():
        if not line.strip():
            continue
        turns = json.loads(line)["messages"]
        first_user = next(i for i, t in enumerate(turns) if t["role"] == "user")
        rows.append({"message": turns[: first_user + 1]})
        if len(rows) == n:
            break
    return rows


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    rows = corpus_prompts(5)
    rows.append({"message": "Please summarise this. " + "The quick brown fox jumps over the lazy dog. " * 60})  # > 256 tokens
    rows.append({"message": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]})
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "self_ref.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    lines = [l for l in proc.stdout.splitlines() if l.startswith("[generate] {")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("[generate] "):])


def read_rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def check_rows(rows: list[dict], prompts: Path, model: str) -> None:
    expected = [r["message"] for r in load_rows(str(prompts), validate_prompt)[0]]
    assert sorted(r["id"] for r in rows) == sorted(f"{prompts.name}:{i}" for i in range(1, len(expected) + 1))
    for row in rows:
        assert set(row) == {"message", "responses", "id", "model"}
        assert row["model"] == model
        assert row["message"] == expected[int(row["id"].split(":")[1]) - 1]
        assert len(row["responses"]) == 2 and all(isinstance(r, str) and r.strip() for r in row["responses"])


def assert_labeller_reads(path: Path, n: int) -> None:
    rows, report = load_rows(str(path), validate_response_pair)
    assert len(rows) == n and not report.skipped


def test_vllm_backend_two_responses_then_resume(tmp_path, tiny_model_dir, prompts_file):
    pytest.importorskip("vllm")
    out = tmp_path / "pairs.jsonl"
    args = ["--config", str(CONFIG), "--pretrain", str(tiny_model_dir), "--input", str(prompts_file),
            "--output", str(out), "--max_new_tokens", "24"]

    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-5000:]
    s = summary_of(first)
    assert s["generated"] == 7 and s["failed"] == 0 and s["already_done"] == 0
    assert s["truncated"] == 1  # the long prompt, left-truncated to prompt_max_len 256 (no crash)
    rows = read_rows(out)
    check_rows(rows, prompts_file, str(tiny_model_dir))
    assert_labeller_reads(out, 7)
    assert any(r["responses"][0] != r["responses"][1] for r in rows)  # sampled, not greedy
    full = {r["id"]: r for r in rows}

    # A rerun appends nothing (and does not even start the engine).
    before = out.read_bytes()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-5000:]
    assert summary_of(again)["generated"] == 0 and summary_of(again)["already_done"] == 7
    assert out.read_bytes() == before

    # Delete two rows and leave a partial last line (a killed run): only those two are regenerated.
    lines = before.decode().splitlines(keepends=True)
    deleted = {json.loads(lines[1])["id"], json.loads(lines[4])["id"]}
    out.write_text("".join(l for i, l in enumerate(lines) if i not in (1, 4)) + '{"message": [{"role": "us')
    third = run_cli(*args)
    assert third.returncode == 0, third.stderr[-5000:]
    s3 = summary_of(third)
    assert s3["generated"] == 2 and s3["already_done"] == 5
    assert "partial last line" in third.stderr
    rows3 = read_rows(out)
    assert len(rows3) == 7 and {r["id"] for r in rows3[-2:]} == deleted
    check_rows(rows3, prompts_file, str(tiny_model_dir))
    # Seeds derive from --seed and the row id: the resumed run sampled what the full run had.
    for r in rows3[-2:]:
        assert r == full[r["id"]]


def test_openai_backend_against_vllm_server(tmp_path, vllm_judge, prompts_file, monkeypatch, capsys):
    monkeypatch.setenv("TEST_GENERATE_KEY", "sk-secret-do-not-print")
    out = tmp_path / "pairs_openai.jsonl"
    summary = generate.main(["--backend", "openai", "--base_url", vllm_judge.base_url, "--input", str(prompts_file),
                             "--output", str(out), "--max_new_tokens", "16", "--api_key_env", "TEST_GENERATE_KEY",
                             "--pretrain", str(vllm_judge.model_dir), "--prompt_max_len", "256"])
    assert summary["generated"] == 7 and summary["failed"] == 0
    assert summary["model"] == "judge"  # asked the server which model it serves
    assert summary["truncated"] == 1  # with a tokenizer, the long prompt is cut to fit
    rows = read_rows(out)
    check_rows(rows, prompts_file, "judge")
    assert_labeller_reads(out, 7)
    again = generate.main(["--backend", "openai", "--base_url", vllm_judge.base_url, "--model", "judge",
                           "--input", str(prompts_file), "--output", str(out)])
    assert again["generated"] == 0 and again["already_done"] == 7 and len(read_rows(out)) == 7
    captured = capsys.readouterr()
    assert "sk-secret" not in captured.out + captured.err  # the API key is never logged


def test_openai_backend_survives_faults(tmp_path, vllm_judge, prompts_file):
    out = tmp_path / "pairs_faults.jsonl"
    with FaultProxy(vllm_judge.base_url, delay=0.1, error500=0.15, drop=0.1, reset_after=0.1, delay_s=3.0,
                    seed=1, fault_paths=("/v1/chat/completions",)) as proxy:
        summary = generate.main(["--backend", "openai", "--base_url", proxy.base_url, "--model", "judge",
                                 "--input", str(prompts_file), "--output", str(out), "--max_new_tokens", "8",
                                 "--timeout", "1.5", "--max_retries", "10", "--concurrency", "4"])
    injected = {k: v for k, v in proxy.stats.items() if k != "pass" and v}
    assert sum(injected.values()) >= 3, proxy.stats
    assert summary["generated"] == 7 and summary["failed"] == 0 and summary["retries"] >= sum(injected.values())
    check_rows(read_rows(out), prompts_file, "judge")


def _mock_server(handler):
    """Patch httpx.AsyncClient (as self_ref.generate builds it) to answer with ``handler``."""
    real = httpx.AsyncClient

    def factory(*args, **kwargs):
        return real(*args, transport=httpx.MockTransport(handler), **kwargs)

    return factory


def test_openai_server_ignoring_n_and_blank_responses(tmp_path, prompts_file, monkeypatch):
    """A server that returns one choice whatever n is gets one request per response; blank
    responses are resampled; a prompt that only ever gets blanks fails (exit status 3), unwritten."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append(body)
        assert request.headers["authorization"] == "Bearer k123"
        text = body["messages"][-1]["content"]
        draw = len([c for c in calls if c["messages"] == body["messages"]])
        if "colour" in text:
            content = "   "  # always blank
        elif draw == 1:
            content = ""  # the first draw of every prompt is blank
        else:
            content = f"answer {draw} to {text[:10]}"
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                                         "usage": {"completion_tokens": 3}})

    monkeypatch.setattr(httpx, "AsyncClient", _mock_server(handler))
    monkeypatch.setenv("MY_KEY", "k123")
    out = tmp_path / "pairs.jsonl"
    summary = generate.main(["--backend", "openai", "--base_url", "http://fake/v1", "--model", "m", "--input",
                             str(prompts_file), "--output", str(out), "--api_key_env", "MY_KEY", "--max_resample", "2"])
    assert summary["generated"] == 6 and summary["failed"] == 1
    # n=2 at first; once a server answered one choice for n=2, one request per response
    first_calls = {id(next(c for c in calls if c["messages"] == m["messages"])) for m in calls}
    assert calls[0]["n"] == 2 and all(c["n"] == 1 for c in calls if id(c) not in first_calls)
    assert sum(c["n"] == 1 for c in calls) >= 12
    assert len({c["seed"] for c in calls if c["messages"] == calls[0]["messages"]}) == 3  # a fresh seed per draw
    rows = read_rows(out)
    assert len(rows) == 6 and all(r["responses"][0] != r["responses"][1] for r in rows)
    assert not any("colour" in json.dumps(r["message"]) for r in rows)


def test_bad_prompt_row_stops_with_file_row_field(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"message": "fine"}) + "\n" +
                   json.dumps({"message": [{"role": "robot", "content": "beep"}]}) + "\n")
    proc = run_cli("--pretrain", str(tiny_model_dir), "--input", str(bad), "--output", str(tmp_path / "o.jsonl"), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {bad}:2: field 'message[0].role': expected one of system, user, assistant, got 'robot'")
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_output_reader_drops_partial_line_and_names_a_broken_one(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a:1"}\n{"id": "a:2"}\n{"id": "a:')
    assert read_done_ids(out) == {"a:1", "a:2"}
    assert out.read_text() == '{"id": "a:1"}\n{"id": "a:2"}\n'
    out.write_text('{"id": "a:1"}\nnot json\n{"id": "a:3"}\n')
    with pytest.raises(DataError, match=r"o\.jsonl:2: an output row"):
        read_done_ids(out)


def test_fit_messages_truncates_from_the_left(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    long = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "old question " * 50}, {"role": "assistant", "content": "old answer " * 50},
            {"role": "user", "content": "Start. " + "middle words " * 80 + "The actual question?"}]
    assert generate.fit_messages(tok, [{"role": "user", "content": "Hi"}], 64) == ([{"role": "user", "content": "Hi"}], False)
    fitted, truncated = generate.fit_messages(tok, long, 100)
    assert truncated and len(generate.render_prompt_ids(tok, fitted)) <= 100
    assert fitted[-1]["role"] == "user" and fitted[-1]["content"].endswith("The actual question?")
    assert not fitted[-1]["content"].startswith("Start.")
    fitted, _ = generate.fit_messages(tok, long, 250)  # room for the system turn and the last question
    assert [t["role"] for t in fitted] == ["system", "user"] and fitted[-1] == long[-1]
