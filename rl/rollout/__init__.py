"""Rollouts for PPO / ReMax: sample responses from the policy with vLLM (or HF ``generate``),
with the sampler's log-probs of the sampled tokens, and load the trainer's new weights into the
running engine.

    engine = make_engine("vllm", "out/sft_tiny", prompt_max_len=512, generate_max_len=256)
    groups = engine.generate(prompt_token_ids, SamplingConfig(temperature=1.0, n=4, seed=1))
    greedy = engine.generate(prompt_token_ids, SamplingConfig(max_new_tokens=256).greedy())  # ReMax baseline
    seconds = engine.update_weights(full_state_dict(actor.model))  # after each policy update

``generate`` returns, per prompt, ``n`` ``Rollout``\\ s (prompt ids as sent, response ids, the
sampler's log-prob of each sampled token, finish reason). Both engines are plain classes that also
work as Ray actors (``ray.remote(VLLMEngine).remote(model_dir, ...)``): constructor arguments are
picklable, methods return plain Python data, and vLLM is imported only when a ``VLLMEngine`` is
built, so ``import rl.rollout`` is cheap (no vLLM, no transformers).

    sampling.py     Rollout, SamplingConfig, flatten: what an engine takes and gives
    logprob_gap.py  logprob_gap (the stale-weights detector), actor_logprobs (the trainer's side)
    engine_base.py  stop tokens, prompt truncation (rlhf_data.tokenize.truncate_prompt), statistics
    vllm_engine.py  VLLMEngine (serving.vllm_settings builds it for this machine)
    hf_engine.py    HFEngine

**Which log-probs (both engines report the same kind).** vLLM 0.32 reports by default
``logprobs_mode="raw_logprobs"``: ``log_softmax`` of the model's logits *before* penalties,
temperature and top-k/top-p (see ``vllm/v1/sample/sampler.py``). Those are not the log-probs of the
distribution the token was drawn from unless the temperature is 1, so they cannot be compared with
``models.actor.Actor(..., temperature=T)``. Both engines therefore default to
``"processed_logprobs"``: ``log_softmax`` of the logits after, in vLLM's order, min-tokens masking,
repetition penalty, division by the temperature and top-k/top-p masking (masked tokens at -inf,
the kept ones renormalised) -- exactly the distribution sampled from. ``HFEngine`` reads the same
thing from ``generate(output_scores=True)`` (HF's scores are the processed logits, same processors
in the same order; its repetition penalty is replaced by one that ignores left padding, which HF's
would penalise). Greedy decoding (temperature < 1e-5) reports ``log_softmax`` of the (penalised)
logits at temperature 1 in both engines. ``logprobs_mode="raw_logprobs"`` is available in both for
callers that want vLLM's default.

Consequently the sampler's log-probs equal the trainer's ``Actor(batch, token_mask, temperature=T)``
(full-vocabulary ``log_softmax(logits / T)``) when ``top_k=-1``, ``top_p=1``,
``repetition_penalty=1`` and ``min_new_tokens=0`` (the PPO / ReMax defaults); with other settings
the sampler's distribution *is* different from pi/T and ``logprob_gap`` measures that too.
``logprob_gap`` between the engine and the trainer is the stale-weights detector: about 1e-5 in
fp32 when the engine holds the trainer's weights, large when a sync was missed.
"""

from __future__ import annotations

from typing import Any

from rl.rollout.engine_base import model_stop_token_ids, resolve_stop_token_ids
from rl.rollout.hf_engine import HFEngine
from rl.rollout.logprob_gap import actor_logprobs, logprob_gap
from rl.rollout.sampling import GREEDY_EPS, LOGPROBS_MODES, BackendUnavailableError, Rollout, SamplingConfig, flatten
from rl.rollout.vllm_engine import VLLMEngine, require_vllm, vllm_sampling_kwargs

__all__ = [
    "GREEDY_EPS", "LOGPROBS_MODES", "BackendUnavailableError", "HFEngine", "Rollout", "SamplingConfig", "VLLMEngine",
    "actor_logprobs", "flatten", "logprob_gap", "make_engine", "model_stop_token_ids", "require_vllm",
    "resolve_stop_token_ids", "vllm_sampling_kwargs",
]


def make_engine(backend: str, model_dir: str, **kwargs: Any) -> VLLMEngine | HFEngine:
    """``backend`` "vllm" or "hf"; keyword arguments go to the engine's constructor. "vllm"
    without vLLM installed raises ``BackendUnavailableError`` naming the package to install."""
    if backend == "vllm":
        require_vllm()
        return VLLMEngine(model_dir, **kwargs)
    if backend == "hf":
        return HFEngine(model_dir, **kwargs)
    raise ValueError(f"rollout backend must be 'vllm' or 'hf', got {backend!r}")
