"""The judge on a server without vLLM's extensions (lmdeploy and the like), which no other test
runs: the real vLLM server (the shared ``vllm_judge`` fixture, tiny model) behind a proxy that
refuses every extension the client uses, the way such a server does (``NoExtensionsProxy``: 400
for a request carrying ``prompt_logprobs`` / ``continue_final_message`` / ``add_generation_prompt``
/ ``logprob_token_ids`` ..., 404 for ``/tokenize`` and ``/detokenize``).

The client must learn on first use that nothing is there (each pair in flight may probe at once,
none may fail for it), fall back to the ``top_logprobs`` of the generated tokens, then to the text
only, and give exactly the verdicts that path gives when the client is told up front that the
extensions are missing.

llama-cpp-python (a real non-vLLM OpenAI server that runs on CPU) is not used: PyPI has only its
sdist for this platform (no wheel), and building llama.cpp takes many minutes on 2 cores.
"""

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from self_ref.client import OpenAIClient
from self_ref.judge import judge_pair, own_answer_of
from self_ref.prompts import DEFAULT_PROMPTS
from self_ref.label import LabelConfig, main as label_main
from tests.judge_servers import NoExtensionsProxy, vllm_judge  # noqa: F401  (session fixture)
from tests.test_self_ref_label import all_rows, label_args, write_pairs

pytestmark = pytest.mark.timeout(600)

N_PAIRS = 3


async def _labels_the_judge_says(base_url: str, cfg: LabelConfig, pairs: list[dict]) -> tuple[str, str]:
    """The two tokens most often among the top log-probs of the first token of the judgement
    requests. A random tiny judge rarely has "A" or "B" there, so with the default labels the
    ``top_logprobs`` fallback would find nothing and every vote would be text only."""
    prompts = cfg.load_prompts()
    settings = cfg.judge_settings(cfg.mode, cfg.min_agreement)
    seen: Counter = Counter()
    async with OpenAIClient(base_url, cfg.model, timeout=cfg.timeout, concurrency=1) as client:
        for pair in pairs:
            own = await own_answer_of(client, prompts, settings, pair["message"])
            for a, b in ((0, 1), (1, 0)):
                messages = prompts.judgement_messages(pair["message"], own, pair["responses"][a], pair["responses"][b])
                choice = await client.chat(messages, max_tokens=1, temperature=0.0, logprobs=True,
                                           top_logprobs=settings.top_logprobs)
                tokens = {t["token"].strip() for t in choice["logprobs"]["content"][0]["top_logprobs"]}
                seen.update(t for t in tokens if t and t.lower() != "verdict")
    firsts: list[str] = []
    for token, _ in seen.most_common():
        if all(token.lower() != f.lower() for f in firsts):
            firsts.append(token)
        if len(firsts) == 2:
            return firsts[0], firsts[1]
    pytest.fail(f"the judge's top tokens give no two labels: {seen}")


async def _direct(base_url: str, cfg: LabelConfig, pairs: list[dict]) -> list[dict]:
    """Each pair judged straight at vLLM by a client told that the extensions are missing."""
    prompts = cfg.load_prompts()
    settings = cfg.judge_settings(cfg.mode, cfg.min_agreement)
    async with OpenAIClient(base_url, cfg.model, timeout=cfg.timeout, concurrency=1) as client:
        client.supports_token_scoring = client.supports_scoring = False
        judged = [await judge_pair(client, prompts, settings, p["message"], p["responses"]) for p in pairs]
        assert client.stats.failures == {}
    return judged


@pytest.mark.parametrize("critique", [0, 16], ids=["no_critique", "critique"])
def test_labelling_without_vllm_extensions_uses_the_fallback(vllm_judge, tmp_path, critique):
    pairs_path = write_pairs(tmp_path / "pairs.jsonl", N_PAIRS, offset=80)
    pairs = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    out = tmp_path / "out.jsonl"
    # the default prompts with labels the tiny judge actually puts in its top log-probs
    probe = LabelConfig(input=str(pairs_path), output=str(tmp_path / "unused.jsonl"), base_url=vllm_judge.base_url,
                        model=vllm_judge.model, max_tokens=critique, reference_max_tokens=16, min_agreement=0.5, timeout=20)
    labels = asyncio.run(_labels_the_judge_says(vllm_judge.base_url, probe, pairs))
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({**yaml.safe_load(Path(DEFAULT_PROMPTS).read_text()), "labels": list(labels)}))
    with NoExtensionsProxy(vllm_judge.base_url) as proxy:
        args = label_args(vllm_judge, pairs_path, out, base_url=proxy.base_url, max_tokens=critique,
                          reference_max_tokens=16, concurrency=N_PAIRS, prompts=prompts)
        summary = label_main(args)
        refused = dict(proxy.refused)
    print(f"\n[non-vLLM, max_tokens={critique}, labels {labels}] refused by the proxy: {refused}; summary: "
          f"{ {k: summary[k] for k in ('labelled', 'rejected', 'failed', 'strength_sources', 'request_failures', 'judge_extensions')} }")

    # it probed (the pairs in flight at once), learned that nothing is there, and no pair failed for it
    assert refused.get("tokenize", 0) >= 1
    assert sum(v for k, v in refused.items() if "prompt_logprobs" in k or "logprob_token_ids" in k) >= 1
    assert summary["judge_extensions"] == {"next_token": False, "prompt_logprobs": False}
    assert summary["failed"] == 0 and summary["labelled"] + summary["rejected"] == N_PAIRS
    assert summary["request_failures"] == {} and "request_errors" not in summary
    # the strength came from the fallback only: top log-probs of generated tokens, else the text
    assert summary["strength_sources"] and set(summary["strength_sources"]) <= {"top_logprobs", "text"}
    assert sum(summary["strength_sources"].values()) == 2 * N_PAIRS
    if critique == 0:  # read from the first tokens' top log-probs (after a critique: only after "Verdict:")
        assert summary["strength_sources"].get("top_logprobs", 0) >= N_PAIRS, summary["strength_sources"]

    # the same verdicts as the fallback path computed straight at vLLM
    cfg = LabelConfig(input=str(pairs_path), output=str(tmp_path / "unused.jsonl"), base_url=vllm_judge.base_url,
                      model=vllm_judge.model, max_tokens=critique, reference_max_tokens=16, min_agreement=0.5, timeout=20,
                      prompts=str(prompts))
    direct = asyncio.run(_direct(vllm_judge.base_url, cfg, pairs))
    rows = all_rows(out)
    assert sorted(rows) == sorted(f"pairs.jsonl:{i}" for i in range(1, N_PAIRS + 1))
    for i, judged in enumerate(direct, 1):
        row = rows[f"pairs.jsonl:{i}"]
        assert row["judge_answer"] == judged["own_answer"]
        for got, want in zip(row["votes"], judged["votes"], strict=True):
            assert {k: got[k] for k in ("order", "verdict", "source", "text")} == \
                   {k: want[k] for k in ("order", "verdict", "source", "text")}
            assert (got["p_a"] is None) == (want["p_a"] is None)
            if got["p_a"] is not None:
                assert got["p_a"] == pytest.approx(want["p_a"], abs=1e-4)
        pref = judged["preference"]
        assert row.get("reject_reason") == pref.reject_reason
        assert row["strength"] == pytest.approx(pref.strength, abs=1e-4)


def test_an_lmdeploy_server_without_logprobs_mode_stops_the_run_with_the_flag_to_add(vllm_judge, tmp_path):
    """lmdeploy's PyTorch backend refuses every request that asks for log-probs (HTTP 400) unless
    started with --logprobs-mode; every vote asks for them. The labeller stops at the first
    refusal with one line naming the flag, instead of failing pair after pair."""
    from training.config import ConfigError

    pairs_path = write_pairs(tmp_path / "pairs.jsonl", N_PAIRS, offset=80)
    with NoExtensionsProxy(vllm_judge.base_url, refuse_logprobs=True) as proxy:
        args = label_args(vllm_judge, pairs_path, tmp_path / "out.jsonl", base_url=proxy.base_url, max_tokens=0,
                          reference_max_tokens=16, concurrency=N_PAIRS)
        with pytest.raises(ConfigError, match=r"refuses log-probs .*not enabled logprobs_mode.* must be started with "
                                              r"--logprobs-mode raw_logprobs"):
            label_main(args)
        refused = dict(proxy.refused)
    assert 1 <= refused["logprobs"] <= N_PAIRS  # the pairs in flight at most, then nothing more was sent
