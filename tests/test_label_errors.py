"""``python -m self_ref.label`` fails fast and clearly, against real HTTP servers on 127.0.0.1 (a
hand-written OpenAI-like judge from ``tests.judge_servers``: no model, no mocks of httpx):

* bad settings stop before any request: exit 2, one line naming the flag;
* 401 / 404 from the judge stop the run at once with the server's own words (never the key);
* 429 waits as long as ``Retry-After`` says, then labels;
* 400 fails that pair only, counted under its status, the server's message shown once;
* a dead URL stops within seconds naming it; a server that dies midway keeps what was labelled,
  and a rerun resumes.
"""

import email.utils
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.judge_servers import FakeJudgeServer, free_port, openai_error
from tests.test_self_ref_label import all_rows

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-0123456789-secret"

pytestmark = pytest.mark.timeout(300)


def judge_reply(body: dict) -> str:
    """Prefers the response marked GOOD in either order (so both orders agree); any other
    request (the judge's own answer) gets a plain answer."""
    text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
    if "GOOD" in text and "bad:" in text:
        return "Response A is right.\nVerdict: " + ("A" if text.index("GOOD") < text.index("bad:") else "B")
    return "The answer is simple."


def write_pairs(path: Path, n: int, marker: str = "") -> Path:
    rows = [{"message": f"What is {i} + {i}?{marker if i == 0 else ''}", "responses": [f"GOOD: {2 * i}", "bad: no idea"]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_label(tmp_path: Path, *args: str, base_url: str | None = None, pairs: int = 4, timeout: float = 60):
    """Runs the command as a user does; returns (process, seconds, output path)."""
    inp = tmp_path / "pairs.jsonl"
    if not inp.exists():
        write_pairs(inp, pairs)
    out = tmp_path / "prefs.jsonl"
    argv = ["--input", str(inp), "--output", str(out), "--model", "judge", "--max_tokens", "16",
            "--reference_max_tokens", "16", "--concurrency", "2", "--min_agreement", "0.5"]
    if base_url:
        argv += ["--base_url", base_url]
    argv += list(args)
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "self_ref.label", *argv], capture_output=True,
                          cwd=ROOT, env=env, timeout=timeout)
    # bytes, decoded here: text mode would turn the progress bar's "\r" into new lines
    proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc, time.monotonic() - t0, out


def visible_lines(stderr: str) -> list[str]:
    """stderr as a terminal shows it: a progress bar redrawn with ``\\r`` and then cleared leaves
    nothing; every other line stays."""
    return [line.split("\r")[-1] for line in stderr.split("\n") if line.split("\r")[-1].strip()]


def assert_one_error_line(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = visible_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert SECRET not in proc.stderr + proc.stdout
    return lines[0]


def summary_of(proc) -> dict:
    line = [x for x in proc.stdout.splitlines() if x.startswith("[label] {")][-1]
    return json.loads(line.removeprefix("[label] "))


# --- settings ---------------------------------------------------------------------------------


def _bad_settings(tmp: Path):
    """(flag named by the error, arguments); paths under ``tmp`` (``a_file``: a regular file,
    ``a_folder``: a folder)."""
    inp = str(tmp / "pairs.jsonl")
    return [
        ("concurrency", ["--concurrency", "0"]),
        ("max_retries", ["--max_retries", "-1"]),
        ("timeout", ["--timeout", "0"]),
        ("timeout", ["--timeout", "inf"]),
        ("timeout", ["--timeout", "nan"]),
        ("limit", ["--limit", "0"]),
        ("limit", ["--limit", "-2"]),
        ("min_agreement", ["--min_agreement", "1.5"]),
        ("min_agreement", ["--min_agreement", "-0.1"]),
        ("min_agreement", ["--min_agreement", "nan"]),
        ("output", ["--output", inp]),
        ("rejects", ["--rejects", inp]),
        ("rejects", ["--rejects", str(tmp / "prefs.jsonl")]),
        ("output", ["--output", str(tmp / "a_file" / "sub" / "prefs.jsonl")]),
        ("output", ["--output", str(tmp / "a_folder")]),
        ("rejects", ["--rejects", str(tmp / "a_file" / "rejects.jsonl")]),
        ("base_url", ["--base_url", "ftp://127.0.0.1:1/v1"]),
        ("base_url", ["--base_url", "http:///v1"]),
        ("base_url", ["--base_url", "127.0.0.1:8000/v1"]),
        ("base_url", ["--base_url", "http://127.0.0.1:8000/v1,http://127.0.0.1:port/v1"]),
        ("base_url", ["--base_url", " , "]),
    ]


BAD_SETTINGS = [(flag, i) for i, (flag, _) in enumerate(_bad_settings(Path("/nonexistent")))]


def _bad_setting_case(tmp: Path, index: int, base_url: str) -> list[str]:
    write_pairs(tmp / "pairs.jsonl", 2)
    (tmp / "a_file").write_text("x")
    (tmp / "a_folder").mkdir()
    # a flag given twice: the later one wins (argparse), so the bad value overrides the good one
    return ["--input", str(tmp / "pairs.jsonl"), "--output", str(tmp / "prefs.jsonl"), "--model", "judge",
            "--base_url", base_url] + _bad_settings(tmp)[index][1]


@pytest.mark.parametrize("flag,index", BAD_SETTINGS, ids=[f"{f}-{i}" for f, i in BAD_SETTINGS])
def test_bad_setting_stops_before_any_request(tmp_path, capsys, flag, index):
    """In-process (fast): ``run_cli`` turns the error into one line on stderr and exit status 2."""
    from self_ref.label import main
    from training.cli import run_cli

    with FakeJudgeServer(reply=judge_reply) as server:
        argv = _bad_setting_case(tmp_path, index, server.base_url)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            run_cli(lambda: main(argv))
        assert server.requests == []  # nothing was sent
    err = capsys.readouterr().err
    assert stop.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"--{flag}" in lines[0], err
    assert (tmp_path / "pairs.jsonl").read_text().count("\n") == 2  # the input is untouched
    assert not (tmp_path / "prefs.jsonl").exists()


@pytest.mark.parametrize("index", [0, 2, 10, 13, 16])
def test_bad_setting_from_the_shell(tmp_path, index):
    """A few of them as a user runs the command: exit 2, one line, no traceback, in seconds."""
    flag = _bad_settings(tmp_path)[index][0]
    with FakeJudgeServer(reply=judge_reply) as server:
        argv = _bad_setting_case(tmp_path, index, server.base_url)
        env = {**os.environ, "OPENAI_API_KEY": SECRET}
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "self_ref.label", *argv], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=60)
        seconds = time.monotonic() - t0
        assert server.requests == []
    line = assert_one_error_line(proc, f"--{flag}")
    assert seconds < 10, seconds
    print(f"\n[{flag}] {seconds:.1f} s: {line}")


# --- 4xx --------------------------------------------------------------------------------------


def test_401_stops_at_once_with_the_servers_message(tmp_path):
    def refuse(method, path, body):
        return openai_error(401, f"Invalid API key: {SECRET}", "AuthenticationError")

    with FakeJudgeServer(refuse) as server:
        proc, seconds, out = run_label(tmp_path, base_url=server.base_url)
        n_requests = len(server.requests)
    line = assert_one_error_line(proc, server.base_url, "401 Unauthorized", "Invalid API key")
    assert "***" in line  # the server echoed the key: it is masked
    assert n_requests == 1 and seconds < 10  # the /models probe only
    assert not out.exists() or out.read_text() == ""
    print(f"\n{line} ({seconds:.1f} s)")


def test_401_midway_keeps_the_labels_already_written(tmp_path):
    """The key is refused after a few chats (a revoked key): stop at once, keep what is written."""
    state = {"chats": 0}

    def revoke(method, path, body):
        if path.endswith("/chat/completions") and not (set(body) & {"prompt_logprobs", "logprob_token_ids"}):
            state["chats"] += 1
            if state["chats"] > 6:
                return openai_error(401, "Invalid API key", "AuthenticationError")
        return None

    with FakeJudgeServer(revoke, reply=judge_reply) as server:
        proc, seconds, out = run_label(tmp_path, "--concurrency", "1", base_url=server.base_url, pairs=5)
    assert_one_error_line(proc, "401 Unauthorized", "Invalid API key")
    done = all_rows(out)
    assert 1 <= len(done) < 5
    assert summary_of(proc)["stopped"].startswith("judge ")


def test_404_wrong_model_named_by_the_model_list(tmp_path):
    with FakeJudgeServer(reply=judge_reply) as server:
        proc, seconds, _ = run_label(tmp_path, "--model", "no-such-judge", base_url=server.base_url)
        assert not server.chat_requests()
    assert_one_error_line(proc, server.base_url, "serves judge", "'no-such-judge'")


def test_404_wrong_model_from_the_chat_endpoint(tmp_path):
    """A server without a model list: the first chat's 404 stops the run with its message."""
    def no_list(method, path, body):
        return (404, {}, {"detail": "Not Found"}) if path.endswith("/models") else None

    with FakeJudgeServer(no_list, reply=judge_reply) as server:
        proc, seconds, out = run_label(tmp_path, "--model", "no-such-judge", base_url=server.base_url, pairs=6)
        chats = len(server.chat_requests())
    line = assert_one_error_line(proc, server.base_url, "404 Not Found", "The model `no-such-judge` does not exist")
    assert chats <= 2 and seconds < 10, (chats, seconds)  # the pairs in flight: one request each, no retries
    assert summary_of(proc)["labelled"] == 0
    print(f"\n{line}")


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_waits_as_retry_after_says(tmp_path, form):
    state = {"limited": None}

    def rate_limit(method, path, body):
        if path.endswith("/chat/completions") and state["limited"] is None:
            state["limited"] = time.monotonic()
            when = "1" if form == "seconds" else email.utils.formatdate(time.time() + 2, usegmt=True)
            status, _, payload = openai_error(429, "Rate limit reached; try again later", "RateLimitError")
            return status, {"Retry-After": when}, payload
        return None

    with FakeJudgeServer(rate_limit, reply=judge_reply) as server:
        proc, seconds, out = run_label(tmp_path, "--concurrency", "1", base_url=server.base_url, pairs=2)
        chats = server.chat_requests()
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(proc)
    assert summary["labelled"] == 2 and summary["failed"] == 0
    assert summary["request_failures"] == {"http_429": 1} and summary["retries"] == 1
    waited = chats[1][0] - state["limited"]
    assert waited >= 0.95, waited  # the backoff alone would have waited 0.25-0.75 s
    assert waited < 5
    assert "Rate limit reached" in proc.stderr
    assert all(r.get("chose", "").startswith("GOOD") for r in all_rows(out).values())


def test_400_fails_that_pair_only_and_shows_the_message_once(tmp_path):
    def too_long(method, path, body):
        text = json.dumps(body or {})
        if path.endswith("/chat/completions") and "LONG" in text and not (set(body) & {"prompt_logprobs"}):
            return openai_error(400, "This model's maximum context length is 2048 tokens. However, you requested 9000 tokens.")
        return None

    inp = tmp_path / "pairs.jsonl"
    rows = [{"message": f"What is {i} + {i}?" + (" LONG" if i < 2 else ""), "responses": [f"GOOD: {2 * i}", "bad: no idea"]}
            for i in range(4)]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeJudgeServer(too_long, reply=judge_reply) as server:
        proc, seconds, out = run_label(tmp_path, base_url=server.base_url)
    assert proc.returncode == 3, proc.stderr[-3000:]  # some pairs failed; a rerun retries them
    summary = summary_of(proc)
    assert summary["failed"] == 2 and summary["labelled"] == 2
    assert summary["request_failures"] == {"http_400": 2}  # the extension probes are not failures
    assert "maximum context length" in summary["request_errors"]["http_400"]
    assert proc.stderr.count("maximum context length") == 1
    assert "400 Bad Request" in proc.stderr


# --- servers that do not answer -----------------------------------------------------------------


def test_dead_url_stops_within_seconds(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    proc, seconds, out = run_label(tmp_path, base_url=url, pairs=8)
    line = assert_one_error_line(proc, "no judge server answers", url, "connection refused")
    assert seconds < 8, seconds
    print(f"\n[dead url] {seconds:.1f} s: {line}")


def test_server_dying_midway_keeps_labels_and_a_rerun_resumes(tmp_path):
    port = free_port()
    # per pair: the own answer and a judgement per vote; the first pair also re-asks once with
    # top log-probs after learning that the server cannot score (4 + 3 + 3 chats: 3 pairs)
    with FakeJudgeServer(port=port, reply=judge_reply, die_after=10) as server:
        proc, seconds, out = run_label(tmp_path, "--concurrency", "1", base_url=server.base_url, pairs=6)
        ended = time.monotonic()
        url = server.base_url
    line = assert_one_error_line(proc, "no judge server answers", url, "connection refused")
    after_death = ended - [t for t, *_ in server.requests][-1]  # from its last (unanswered) request
    first = all_rows(out)
    assert len(first) == 3, sorted(first)
    assert after_death < 8, after_death  # without the early stop: ~15 s of retries per pair, exit 3
    summary = summary_of(proc)
    assert summary["labelled"] == 3 and summary["failed"] == 0 and summary["not_judged"] == 3
    print(f"\n[died midway] stopped {after_death:.1f} s after the server died ({seconds:.1f} s in all): {line}")

    with FakeJudgeServer(port=port, reply=judge_reply):
        again, _, _ = run_label(tmp_path, "--concurrency", "1", base_url=url, pairs=6)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 already done, 3 to judge" in again.stdout
    rows = all_rows(out)  # asserts no duplicate
    assert sorted(rows) == [f"pairs.jsonl:{i}" for i in range(1, 7)]
    for key, row in first.items():
        assert rows[key] == row
