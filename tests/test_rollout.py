"""Rollout engines (rl/rollout/): vLLM in a Ray actor, HF generate, and the trainer's Actor agree.

vLLM never runs in the pytest process: one ``ray.remote(VLLMEngine)`` actor (engine in the actor's
process, as the trainer will use it) is shared by the module. Everything is fp32 on the tiny model.
"""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.actor import Actor
from rl.rollout import (
    BackendUnavailableError,
    HFEngine,
    Rollout,
    SamplingConfig,
    VLLMEngine,
    actor_logprobs,
    flatten,
    logprob_gap,
    make_engine,
)
from rl.weight_sync import WeightSyncError
from rlhf_data.tokenize import truncate_prompt

ROOT = Path(__file__).resolve().parents[1]
PROMPT_MAX, GEN_MAX = 48, 40
CHATS = [
    "What is the capital of France?",
    "Explain photosynthesis to a child, step by step, with an example.",
    "Hi",
    "Write a haiku about the sea.",
    "List three prime numbers and say why they are prime.",
]


def has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = []
    for c in CHATS:
        ids = tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    assert len({len(p) for p in out}) > 2 and max(map(len, out)) <= PROMPT_MAX  # left padding is exercised
    return out


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def actor(hf_model):
    return Actor(hf_model).eval()


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    return HFEngine(str(tiny_model_dir), prompt_max_len=PROMPT_MAX, generate_max_len=GEN_MAX)


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    """A VLLMEngine inside a Ray actor on a private local Ray (never an existing cluster), with
    its engine core in a process of its own, as on every GPU run (VLLM_ENABLE_V1_MULTIPROCESSING=1;
    the CPU default runs it in the actor's process, which test_rl_e2e covers): every call that
    crosses into it (``collective_rpc`` arguments, sampling parameters) is msgpack-encoded there."""
    if not has_vllm():
        pytest.skip("vLLM is not installed")
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
                                       "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}})
    try:
        engine = ray.remote(num_cpus=1)(VLLMEngine).remote(
            str(tiny_model_dir), prompt_max_len=PROMPT_MAX, generate_max_len=GEN_MAX, seed=0)
        stats = ray.get(engine.get_stats.remote(), timeout=600)  # waits for the engine to start
        print(f"\n[vllm] engine start {stats['start_seconds']:.1f} s")
        yield RemoteEngine(ray, engine)
        ray.kill(engine)
    finally:
        ray.shutdown()


class RemoteEngine:
    """Calls the Ray actor's methods synchronously, so tests read like local calls."""

    def __init__(self, ray, handle):
        self.ray, self.handle = ray, handle

    def __getattr__(self, name):
        method = getattr(self.handle, name)
        return lambda *a, **k: self.ray.get(method.remote(*a, **k), timeout=600)


# --- references ----------------------------------------------------------------------------------


@torch.no_grad()
def hf_greedy(model, prompts, max_new_tokens) -> list[list[int]]:
    """Plain transformers greedy decoding, one unpadded prompt at a time."""
    out = []
    for p in prompts:
        g = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           max_new_tokens=max_new_tokens, do_sample=False)
        out.append(g[0, len(p):].tolist())
    return out


@torch.no_grad()
def reference_logprobs(model, rollouts, temperature, top_k=-1, repetition_penalty=1.0) -> list[torch.Tensor]:
    """log-probs of the *processed* distribution, written out: penalty on every token seen so far
    (prompt + response prefix), / temperature, top-k mask, log_softmax over the full vocabulary."""
    result = []
    for r in flatten(rollouts):
        seq = r.prompt_ids + r.response_ids
        logits = model(torch.tensor([seq])).logits[0].float()
        P, lps = len(r.prompt_ids), []
        for t, tok in enumerate(r.response_ids):
            x = logits[P + t - 1].clone()
            if repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq[:P + t])))
                s = x[seen]
                x[seen] = torch.where(s < 0, s * repetition_penalty, s / repetition_penalty)
            x = x / temperature
            if top_k > 0:
                x[x < x.topk(top_k).values[-1]] = -math.inf
            lps.append(F.log_softmax(x, -1)[tok])
        result.append(torch.stack(lps))
    return result


def check_shapes(groups, n_prompts, n, max_new_tokens):
    assert len(groups) == n_prompts and all(len(g) == n for g in groups)
    for r in flatten(groups):
        assert 1 <= len(r.response_ids) <= max_new_tokens
        assert len(r.response_logprobs) == len(r.response_ids)
        assert all(lp <= 1e-6 and math.isfinite(lp) for lp in r.response_logprobs)
        assert r.finish_reason in ("stop", "length")
        if r.finish_reason == "length":
            assert len(r.response_ids) == max_new_tokens


# --- pure helpers --------------------------------------------------------------------------------


def test_logprob_gap_by_hand():
    rollouts = [[Rollout([1, 2], [5, 6], [-1.0, -2.0], "length")], [Rollout([1], [7], [-0.5], "stop")]]
    assert logprob_gap(rollouts, [[-1.5, -2.0], torch.tensor([0.0])]) == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    with pytest.raises(ValueError, match="rollouts but"):
        logprob_gap(rollouts, [[-1.0, -2.0]])
    with pytest.raises(ValueError, match="trainer log-probs"):
        logprob_gap(rollouts, [[-1.0], [0.0]])
    with pytest.raises(ValueError, match="no sampler log-probs"):
        logprob_gap([Rollout([1], [2], None, "stop")], [[0.0]])


def test_truncate_prompt_keeps_bos():
    assert truncate_prompt([0, 5, 6, 7, 8], 3, bos_token_id=0) == ([0, 7, 8], True)
    assert truncate_prompt([9, 5, 6, 7, 8], 3, bos_token_id=0) == ([6, 7, 8], True)
    assert truncate_prompt([0, 5, 6], 3, bos_token_id=0) == ([0, 5, 6], False)
    assert truncate_prompt([0, 5, 6], 2, bos_token_id=None) == ([5, 6], True)


def test_sampling_config():
    s = SamplingConfig(temperature=0.7, top_k=5, n=4, max_new_tokens=9, seed=3)
    g = s.greedy()
    assert (g.temperature, g.n, g.top_k, g.max_new_tokens, g.seed) == (0.0, 1, -1, 9, 3)
    assert g.is_greedy and g.logprob_temperature == 1.0 and s.logprob_temperature == 0.7
    for bad in (dict(top_k=0), dict(top_p=0.0), dict(n=0), dict(max_new_tokens=0),
                dict(min_new_tokens=5, max_new_tokens=4), dict(temperature=-1.0)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_importing_rollout_is_cheap():
    code = ("import sys, rl.rollout; bad = [m for m in ('vllm', 'transformers', 'ray') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_make_engine_names_the_missing_package(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now fails, as if not installed
    with pytest.raises(BackendUnavailableError, match="pip install vllm"):
        make_engine("vllm", str(tiny_model_dir))
    with pytest.raises(ValueError, match="'vllm' or 'hf'"):
        make_engine("sglang", str(tiny_model_dir))
    engine = make_engine("hf", str(tiny_model_dir), prompt_max_len=8, generate_max_len=4)
    assert isinstance(engine, HFEngine)


# --- HFEngine ------------------------------------------------------------------------------------


def test_hf_engine_greedy_equals_plain_generate(hf_engine, hf_model, prompts):
    groups = hf_engine.generate(prompts, SamplingConfig(max_new_tokens=24).greedy())
    check_shapes(groups, len(prompts), 1, 24)
    assert [g[0].response_ids for g in groups] == hf_greedy(hf_model, prompts, 24)
    assert [g[0].prompt_ids for g in groups] == prompts


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hf_engine_logprobs_equal_actor(hf_engine, actor, prompts, temperature):
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=GEN_MAX, n=2, seed=11)
    groups = hf_engine.generate(prompts, sampling)
    check_shapes(groups, len(prompts), 2, GEN_MAX)
    gap = logprob_gap(groups, actor_logprobs(actor, groups, sampling.logprob_temperature))
    assert gap <= 1e-4, gap
    # seeded: the same seed samples the same tokens, and the global RNG is left alone
    state = torch.random.get_rng_state()
    again = hf_engine.generate(prompts, sampling)
    assert torch.equal(state, torch.random.get_rng_state())
    assert [r.response_ids for r in flatten(again)] == [r.response_ids for r in flatten(groups)]


def test_hf_engine_processed_logprobs_with_top_k_and_penalty(hf_engine, hf_model, actor, prompts):
    sampling = SamplingConfig(temperature=0.7, top_k=20, repetition_penalty=1.3, max_new_tokens=24, n=2, seed=5)
    groups = hf_engine.generate(prompts, sampling)
    ref = reference_logprobs(hf_model, groups, 0.7, top_k=20, repetition_penalty=1.3)
    assert logprob_gap(groups, ref) <= 1e-4
    # the processed distribution is not pi/T over the full vocabulary: that gap is large
    assert logprob_gap(groups, actor_logprobs(actor, groups, 0.7)) > 0.5


def test_hf_engine_truncates_and_updates_weights(tiny_model_dir, prompts, hf_model):
    engine = HFEngine(str(tiny_model_dir), prompt_max_len=PROMPT_MAX, generate_max_len=8)
    bos = AutoTokenizer.from_pretrained(tiny_model_dir).bos_token_id
    long_prompt = prompts[1] + prompts[1][1:] + prompts[3][1:]
    assert len(long_prompt) > PROMPT_MAX and long_prompt[0] == bos
    [[r]] = engine.generate([long_prompt], SamplingConfig(max_new_tokens=8).greedy())
    assert r.prompt_ids == [bos] + long_prompt[-(PROMPT_MAX - 1):]
    assert engine.get_stats()["truncated_prompts"] == 1
    with pytest.raises(ValueError, match="generate_max_len"):
        engine.generate(prompts, SamplingConfig(max_new_tokens=9))

    new_model = perturbed_model(hf_model)
    seconds = engine.update_weights(new_model.state_dict())
    assert seconds >= 0 and engine.get_stats()["weight_updates"] == 1
    groups = engine.generate(prompts, SamplingConfig(max_new_tokens=8).greedy())
    assert [g[0].response_ids for g in groups] == hf_greedy(new_model, prompts, 8)
    with pytest.raises(WeightSyncError, match="missing key"):
        engine.update_weights({k: v for k, v in new_model.state_dict().items() if "layers.1." not in k})


def perturbed_model(model):
    """A copy with visibly different outputs: every matrix moved by noise, the LM head sharpened."""
    new = AutoModelForCausalLM.from_config(model.config).eval()
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v.clone()
              for k, v in model.state_dict().items()}
        sd["lm_head.weight"] = sd["lm_head.weight"] * 4
    new.load_state_dict(sd)
    return new


# --- VLLMEngine in a Ray actor ------------------------------------------------------------------


def test_vllm_greedy_equals_hf_greedy(vllm_engine, hf_engine, hf_model, prompts):
    greedy = SamplingConfig(max_new_tokens=GEN_MAX).greedy()
    groups = vllm_engine.generate(prompts, greedy)
    check_shapes(groups, len(prompts), 1, GEN_MAX)
    vllm_ids = [g[0].response_ids for g in groups]
    assert vllm_ids == hf_greedy(hf_model, prompts, GEN_MAX)
    hf_groups = hf_engine.generate(prompts, greedy)
    assert vllm_ids == [g[0].response_ids for g in hf_groups]
    # greedy log-probs are log_softmax(logits) (temperature 1) in both engines
    assert logprob_gap(groups, [r.response_logprobs for r in flatten(hf_groups)]) <= 1e-3


def test_vllm_sampling_params_stop_at_the_end_of_turn_token(vllm_engine, hf_engine, tiny_model_dir, prompts):
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    params = vllm_engine._sampling_params(SamplingConfig(temperature=0.7, max_new_tokens=GEN_MAX, n=2), 3)
    assert params.stop_token_ids == [eos] == hf_engine.eos_token_ids and not params.ignore_eos
    assert (params.n, params.max_tokens, params.seed) == (2, GEN_MAX, 3)
    # a response stops at its first EOS and keeps it; "stop" means exactly that
    for r in flatten(vllm_engine.generate(prompts, SamplingConfig(max_new_tokens=GEN_MAX, n=4, seed=1))):
        assert (r.finish_reason == "stop") == (r.response_ids[-1] == eos) and eos not in r.response_ids[:-1]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_equal_actor(vllm_engine, actor, prompts, temperature):
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=GEN_MAX, n=3, seed=7)
    groups = vllm_engine.generate(prompts, sampling)
    check_shapes(groups, len(prompts), 3, GEN_MAX)
    assert len({tuple(r.response_ids) for r in flatten(groups)}) == len(prompts) * 3  # distinct samples
    gap = logprob_gap(groups, actor_logprobs(actor, groups, temperature))
    print(f"\n[vllm] T={temperature}: mean |logprob_vllm - logprob_actor| = {gap:.2e}")
    assert gap <= 1e-3, gap
    if temperature != 1.0:  # vLLM reports the tempered (processed) log-probs, not the raw ones
        assert logprob_gap(groups, actor_logprobs(actor, groups, 1.0)) > 0.05
    again = vllm_engine.generate(prompts, sampling)
    assert [r.response_ids for r in flatten(again)] == [r.response_ids for r in flatten(groups)]


def test_vllm_sampled_and_greedy_in_one_call_equal_separate_calls(vllm_engine, hf_engine, prompts):
    """ReMax's request: the sampled and the greedy responses of the same prompts in one engine
    call give what two calls give (per-request seeds; argmax)."""
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=GEN_MAX, n=2, seed=11)
    greedy = sampling.greedy()
    for engine in (vllm_engine, hf_engine):
        both = engine.generate_batches([(prompts, sampling), (prompts, greedy)])
        assert len(both) == 2
        check_shapes(both[0], len(prompts), 2, GEN_MAX)
        check_shapes(both[1], len(prompts), 1, GEN_MAX)
        apart = [engine.generate(prompts, sampling), engine.generate(prompts, greedy)]
        for together, alone in zip(both, apart):
            assert [r.response_ids for r in flatten(together)] == [r.response_ids for r in flatten(alone)]
            assert logprob_gap(together, [r.response_logprobs for r in flatten(alone)]) <= 1e-5
    assert vllm_engine.generate_batches([]) == []


def test_vllm_processed_logprobs_with_top_k_and_penalty(vllm_engine, hf_model, prompts):
    sampling = SamplingConfig(temperature=0.7, top_k=20, repetition_penalty=1.3, max_new_tokens=24, n=2, seed=5)
    groups = vllm_engine.generate(prompts, sampling)
    ref = reference_logprobs(hf_model, groups, 0.7, top_k=20, repetition_penalty=1.3)
    assert logprob_gap(groups, ref) <= 1e-3


def test_vllm_truncates_long_prompts(vllm_engine, prompts, tiny_model_dir):
    bos = AutoTokenizer.from_pretrained(tiny_model_dir).bos_token_id
    long_prompt = prompts[1] + prompts[1][1:] + prompts[3][1:]
    assert len(long_prompt) > PROMPT_MAX and long_prompt[0] == bos
    before = vllm_engine.get_stats()["truncated_prompts"]
    groups = vllm_engine.generate([long_prompt, prompts[0]], SamplingConfig(max_new_tokens=8, seed=1))
    assert groups[0][0].prompt_ids == [bos] + long_prompt[-(PROMPT_MAX - 1):]
    assert groups[1][0].prompt_ids == prompts[0]
    assert len(groups[0][0].response_ids) == 8
    assert vllm_engine.get_stats()["truncated_prompts"] == before + 1
    with pytest.raises(ValueError, match="generate_max_len"):
        vllm_engine.generate(prompts, SamplingConfig(max_new_tokens=GEN_MAX + 1))


def test_vllm_weight_sync_and_stale_detector(vllm_engine, hf_model, actor, prompts):
    old_sd = {k: v.clone() for k, v in hf_model.state_dict().items()}
    new_model = perturbed_model(hf_model)
    new_actor = Actor(new_model).eval()
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=GEN_MAX, n=2, seed=3)
    greedy = SamplingConfig(max_new_tokens=GEN_MAX).greedy()
    try:
        seconds = vllm_engine.update_weights(new_model.state_dict())  # through the Ray object store
        print(f"\n[vllm] update_weights (auto: disk, the engine core is another process): {seconds * 1000:.0f} ms")
        with pytest.raises(ValueError, match="transport 'inprocess' needs VLLM_ENABLE_V1_MULTIPROCESSING=0"):
            vllm_engine.update_weights(new_model.state_dict(), transport="inprocess")
        groups = vllm_engine.generate(prompts, sampling)
        gap_new = logprob_gap(groups, actor_logprobs(new_actor, groups, 1.0))
        gap_old = logprob_gap(groups, actor_logprobs(actor, groups, 1.0))
        print(f"[vllm] gap vs new weights {gap_new:.2e}, vs old weights {gap_old:.2f}")
        assert gap_new <= 1e-3 and gap_old > 0.05, (gap_new, gap_old)
        new_greedy = [g[0].response_ids for g in vllm_engine.generate(prompts, greedy)]
        assert new_greedy == hf_greedy(new_model, prompts, GEN_MAX)
        assert new_greedy != hf_greedy(hf_model, prompts, GEN_MAX)

        # a wrong dict is refused before the engine is touched; the engine keeps serving
        bad = dict(new_model.state_dict())
        with pytest.raises(WeightSyncError, match="missing key"):
            vllm_engine.update_weights({k: v for k, v in bad.items() if k != "model.norm.weight"})
        with pytest.raises(WeightSyncError, match="wrong shape"):
            vllm_engine.update_weights(bad | {"model.norm.weight": torch.ones(3)})
        with pytest.raises(WeightSyncError, match="actor.model"):
            vllm_engine.update_weights({f"model.{k}": v for k, v in bad.items()})
        assert [g[0].response_ids for g in vllm_engine.generate(prompts, greedy)] == new_greedy

        # back to the old weights through the other transport (safetensors folder + weights_path)
        seconds = vllm_engine.update_weights(old_sd, transport="disk")
        print(f"[vllm] update_weights (disk transport): {seconds * 1000:.0f} ms")
        groups = vllm_engine.generate(prompts, sampling)
        assert logprob_gap(groups, actor_logprobs(actor, groups, 1.0)) <= 1e-3
        assert [g[0].response_ids for g in vllm_engine.generate(prompts, greedy)] == hf_greedy(hf_model, prompts, GEN_MAX)
        assert vllm_engine.get_stats()["weight_updates"] == 2
    finally:
        vllm_engine.update_weights(old_sd)  # later tests see the checkpoint's weights


def test_vllm_weight_broadcast_from_a_gloo_group(vllm_engine, hf_model, actor, prompts):
    """--weight_sync broadcast on CPU: this process, as the actor's rank 0, broadcasts a state dict
    over gloo to the engine's worker, which runs in the engine core's own process as on GPUs (the
    NCCL path is the same code; the checkpoint's shapes reach it through msgpack, which turns
    tuples into lists: the first GPU sync used to stop there); the engine then samples with the
    new weights. A dict that does not fit arrives, is refused, and leaves the engine serving its
    current weights, and the next sync works."""
    from rl.weight_broadcast import BroadcastGroup

    ray, handle = vllm_engine.ray, vllm_engine.handle
    old_sd = {k: v.clone() for k, v in hf_model.state_dict().items()}
    new_model = perturbed_model(hf_model)
    greedy = SamplingConfig(max_new_tokens=GEN_MAX).greedy()
    group = BroadcastGroup()
    host, port, token = group.open(world_size=2)  # engine on this node: bound to 127.0.0.1
    assert host == "127.0.0.1"
    joined = handle.join_weight_group.remote(host, port, token, 1, 2, "gloo")
    group.join(host, port, token, 0, 2, "gloo")
    ray.get(joined, timeout=120)
    try:
        received = handle.receive_weights.remote()
        group.send(new_model.state_dict())
        ray.get(received, timeout=300)
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=GEN_MAX, n=2, seed=3)
        groups = vllm_engine.generate(prompts, sampling)
        assert logprob_gap(groups, actor_logprobs(Actor(new_model).eval(), groups, 1.0)) <= 1e-3
        new_greedy = [g[0].response_ids for g in vllm_engine.generate(prompts, greedy)]
        assert new_greedy == hf_greedy(new_model, prompts, GEN_MAX) != hf_greedy(hf_model, prompts, GEN_MAX)

        received = handle.receive_weights.remote()
        group.send({k: v for k, v in old_sd.items() if k != "model.norm.weight"})
        with pytest.raises(ray.exceptions.RayTaskError, match="missing key"):
            ray.get(received, timeout=300)
        assert [g[0].response_ids for g in vllm_engine.generate(prompts, greedy)] == new_greedy

        received = handle.receive_weights.remote()
        group.send(old_sd)
        ray.get(received, timeout=300)
        assert [g[0].response_ids for g in vllm_engine.generate(prompts, greedy)] == hf_greedy(hf_model, prompts, GEN_MAX)
    finally:
        group.close()
        vllm_engine.update_weights(old_sd)  # later tests see the checkpoint's weights


def test_vllm_throughput_report(vllm_engine, prompts):
    """Not a speed assertion (shared 2-core machine): records tokens/s for the report."""
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=GEN_MAX, n=8, seed=0)
    groups = vllm_engine.generate(prompts * 4, sampling)
    stats = vllm_engine.get_stats()
    n_tok = sum(len(r.response_ids) for r in flatten(groups))
    print(f"\n[vllm] {len(flatten(groups))} rollouts, {n_tok} tokens at "
          f"{stats['last_generate_tokens_per_s']:.0f} tok/s; totals {stats}")
    assert stats["rollouts"] > 0 and stats["generated_tokens"] >= n_tok
