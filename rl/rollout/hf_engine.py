"""``HFEngine``: the rollout interface on transformers' ``generate``, the fallback when vLLM is not
installed (``--rollout_backend hf``) and the reference the vLLM engine is tested against."""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from rl.rollout.engine_base import EngineBase, check_lengths, new_stats, resolve_stop_token_ids
from rl.rollout.sampling import LOGPROBS_MODES, Rollout, SamplingConfig
from rl.weight_sync import check_state_dict


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


class HFEngine(EngineBase):
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
        check_lengths(prompt_max_len, generate_max_len)
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

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                           "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
            if torch_dtype == torch.float32:  # an inference-only model: fp32 asked means no flash-attn (bf16 only)
                model_kwargs.setdefault("flash_attn", False)
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
        self.stats = new_stats()
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
