"""Two sampled responses per prompt from a policy: ``python -m self_ref.generate``.

    python -m self_ref.generate --config configs/generate_tiny.yaml \
        --pretrain out/sft_tiny --input prompts.jsonl --output pairs.jsonl
    python -m self_ref.generate --backend openai --base_url http://127.0.0.1:8000/v1 --model policy \
        --input prompts.jsonl --output pairs.jsonl

Input: prompt files (jsonl / json / parquet / save_to_disk folders, comma-separated) whose
``--input_key`` (default ``message``) is a string or chat turns ending with a user turn; a bad
row stops the run with ``error: FILE:ROW: field '...': reason`` (exit status 2).

Output: one jsonl row per prompt, the input of ``self_ref.label``:
``{"message": [turns], "responses": [str, str], "id": "<file name>:<row>", "model": NAME}``.

Backends:
* ``vllm`` (default): an offline ``vllm.LLM`` on ``--pretrain``. Prompts are rendered with the
  tokenizer's chat template (generation prompt added) and submitted together, ``n=2`` samples
  each, with a per-prompt seed derived from ``--seed`` and the row id (a resumed run samples what
  a full run would have). Rows are written as their requests finish. The engine takes this
  machine's settings from ``serving.vllm_settings`` (on CPU: float32, eager, whole-prompt prefills).
* ``openai``: the same through an OpenAI-compatible server (``/v1/chat/completions`` with
  ``n=2``; a server that ignores ``n`` gets one request per response), ``--concurrency`` requests
  in flight, retries with backoff on time-outs, dropped connections, 5xx / 429 and malformed
  bodies. The API key comes from the environment variable ``--api_key_env`` and is never logged.

Prompts longer than ``--prompt_max_len`` tokens are left-truncated (the vllm backend keeps the
last tokens and a leading BOS, ``rlhf_data.tokenize.truncate_prompt`` as the rollout engines do; the openai backend, when a tokenizer is given with ``--pretrain``, drops the oldest
turns, then the start of the first kept turn) and counted. A blank response (empty or whitespace,
which the labeller rejects) is resampled up to ``--max_resample`` times; a prompt that still lacks
two non-blank responses, or whose requests fail for good, is not written: it is counted, and the
exit status is 3 (a rerun retries exactly those).

Resumable: ids already in ``--output`` are skipped; each row is appended with one write and a
flush as soon as it is complete; a partial last line left by a killed run is removed first.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rlhf_data import load_rows, validate_prompt
from rlhf_data.tokenize import render_prompt_ids, truncate_prompt
from self_ref.client import OpenAIClient, RequestFailed
from self_ref.jsonl_store import AppendOnlyJsonl, read_done_ids
from serving.vllm_settings import cuda_available, offline_engine_kwargs, set_cpu_engine_env
from training.cli import run_cli
from training.config import ConfigError, check_fields, parse_config
from training.progress import progress_bar

NUM_RESPONSES = 2


@dataclass
class GenerateConfig:
    """Sample two responses per prompt from a policy (vLLM offline or an OpenAI-compatible server)."""

    input: list[str] = field(default_factory=list, metadata={"help": "prompt file(s): jsonl/json/parquet/save_to_disk folder", "path": "data"})
    output: str = field(default="", metadata={"help": "pairs jsonl (appended; a rerun resumes)", "path": "output_file"})
    input_key: str = field(default="message", metadata={"help": "key of the prompt (a string or chat turns ending with a user turn)"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "skip (and report) malformed prompt rows instead of stopping"})
    limit: int = field(default=-1, metadata={"help": "use at most N prompts of the input (-1: all)", "check": "-1 or >= 1"})
    backend: str = field(default="vllm", metadata={"help": "vllm (offline engine on --pretrain) or openai (a server at --base_url)", "check": ("vllm", "openai")})
    pretrain: str = field(default="", metadata={"help": "policy (HF folder or hub name); for openai: optional tokenizer for --prompt_max_len", "path": "model"})
    model: str = field(default="", metadata={"help": "name written in each row; openai: the served model (default: the server's first)"})
    # sampling
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0: greedy, as self_ref.compare_policies uses it)", "check": ">= 0"})
    top_p: float = field(default=0.95, metadata={"check": "(0, 1]"})
    max_new_tokens: int = field(default=128, metadata={"help": "max tokens per response", "check": ">= 1"})
    prompt_max_len: int = field(default=1024, metadata={"help": "longer prompts are left-truncated (and counted)", "check": ">= 1"})
    seed: int = field(default=42, metadata={"help": "per-prompt sampling seeds derive from this and the row id", "check": ">= 0"})
    max_resample: int = field(default=3, metadata={"help": "extra tries for a prompt that got a blank response", "check": ">= 0"})
    # vllm backend
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM context (default: prompt_max_len + max_new_tokens)", "check": ">= 2"})
    dtype: str = field(default="auto", metadata={"help": "vLLM dtype: auto (the model's with CUDA; float32 without, where "
                                                        "bfloat16 runs but was measured slower: serving/vllm_settings.py) | float32 | bfloat16",
                                                "check": ("auto", "float32", "bfloat16", "float16")})
    enforce_eager: bool | None = field(default=None, metadata={"help": "no CUDA graphs / compilation (default: on without CUDA)"})
    tensor_parallel_size: int = field(default=1, metadata={"check": ">= 1"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"check": "(0, 1]"})
    # openai backend
    base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={"help": "OpenAI-compatible base URL"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the API key"})
    concurrency: int = field(default=8, metadata={"help": "requests in flight", "check": ">= 1"})
    timeout: float = field(default=120.0, metadata={"help": "seconds per request", "check": "> 0"})
    max_retries: int = field(default=5, metadata={"help": "retries per request (time-outs, 5xx, dropped connections)", "check": ">= 0"})

    def __post_init__(self):
        check_fields(self)
        if not self.input or not self.output:
            raise ConfigError("--input and --output are required")
        if self.backend == "vllm" and not self.pretrain:
            raise ConfigError("--backend vllm needs --pretrain (the policy to sample from)")


# --- rows, ids, resume -------------------------------------------------------------------------


@dataclass
class Job:
    """One prompt on its way to two non-blank responses."""

    id: str
    message: list[dict]
    prompt_ids: list[int] | None = None  # vllm backend: the rendered (maybe truncated) prompt
    send_message: list[dict] | None = None  # openai backend: the (maybe truncated) turns sent
    responses: list[str] = field(default_factory=list)
    draws: int = 0  # sampling requests made (for distinct seeds)
    blank_rounds: int = 0

    @property
    def missing(self) -> int:
        return NUM_RESPONSES - len(self.responses)


def sample_seed(base: int, row_id: str, draw: int) -> int:
    """A seed that depends only on ``--seed``, the row and the draw: resumes sample like full runs."""
    return zlib.crc32(f"{base}\x00{row_id}\x00{draw}".encode()) & 0x7FFFFFFF


def load_jobs(cfg: GenerateConfig) -> list[Job]:
    rows, report = load_rows(cfg.input, partial(validate_prompt, key=cfg.input_key), cfg.skip_bad_rows)
    if report.skipped:
        print(f"[data] {report.summary()}")
    jobs = [Job(id=f"{Path(r['_source']).name}:{r['_row']}", message=r["message"]) for r in rows]
    seen: dict[str, int] = Counter(j.id for j in jobs)
    dup = [i for i, n in seen.items() if n > 1]
    if dup:
        raise ConfigError(f"--input {','.join(cfg.input)}: two files share a name, so row ids collide (e.g. {dup[0]}); "
                          "rename one of them")
    if cfg.limit >= 0:
        jobs = jobs[: cfg.limit]
    return jobs


def is_blank(text: Any) -> bool:
    return not isinstance(text, str) or not text.strip()


class Results:
    """Collects finished jobs: writes complete rows, counts everything for the summary."""

    def __init__(self, out: AppendOnlyJsonl, model_name: str, total: int):
        self.out = out
        self.model_name = model_name
        self.counts: Counter = Counter()
        self.first_error: str | None = None
        self.bar = progress_bar(total, "generate", unit="prompt")

    def accept(self, job: Job, texts: list[str], tokens: int = 0) -> bool:
        """Take new samples for ``job``; True when it still needs more (blank ones are dropped)."""
        self.counts["response_tokens"] += tokens
        good = [t for t in texts if not is_blank(t)]
        if len(good) < len(texts):
            self.counts["blank_responses"] += len(texts) - len(good)
            job.blank_rounds += 1
        job.responses.extend(good[: job.missing])
        if job.missing <= 0:
            self.out.write({"message": job.message, "responses": job.responses[:NUM_RESPONSES], "id": job.id,
                            "model": self.model_name})
            self.counts["generated"] += 1
            if job.responses[0] == job.responses[1]:
                self.counts["identical_pairs"] += 1
            self.bar.update(1)
            return False
        return True

    def fail(self, job: Job, reason: str) -> None:
        self.counts["failed"] += 1
        self.counts[f"failed: {reason.split(':')[0]}"] += 1
        if self.first_error is None:
            self.first_error = f"{job.id}: {reason}"
        self.bar.update(1)


# --- vllm backend ------------------------------------------------------------------------------


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--pretrain {name}: the tokenizer has no chat template; prompts are chat turns")
    return tokenizer


# Reusable pieces of the vllm backend (self_ref.compare_policies builds its greedy engine with them).


def vllm_lengths(cfg: GenerateConfig) -> tuple[int, int]:
    """(the engine's max_model_len, the prompt token budget) for ``cfg``."""
    max_model_len = cfg.max_model_len or cfg.prompt_max_len + cfg.max_new_tokens
    prompt_budget = min(cfg.prompt_max_len, max_model_len - cfg.max_new_tokens)
    if prompt_budget < 1:
        raise ConfigError(f"--max_model_len {max_model_len} leaves no room for a prompt after "
                          f"--max_new_tokens {cfg.max_new_tokens}")
    return max_model_len, prompt_budget


def render_truncated(tokenizer, message: list[dict], prompt_budget: int) -> tuple[list[int], bool]:
    """The chat-templated prompt ids, left-truncated to ``prompt_budget`` as every sampler here
    truncates (the end of the prompt and its generation prompt kept, and a leading BOS); True when cut."""
    return truncate_prompt(render_prompt_ids(tokenizer, message), prompt_budget, tokenizer.bos_token_id)


def make_vllm_engine(cfg: GenerateConfig, max_model_len: int):
    """An offline ``vllm.LLM`` on ``cfg.pretrain`` with this machine's settings (see the module doc)."""
    cuda = cuda_available()
    if not cuda:
        set_cpu_engine_env()  # before vLLM is imported: it reads them once
    from vllm import LLM

    return LLM(**offline_engine_kwargs(
        cfg.pretrain, max_model_len=max_model_len, cuda=cuda, dtype=cfg.dtype, seed=cfg.seed,
        enforce_eager=cfg.enforce_eager, tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization))


def run_vllm(cfg: GenerateConfig, jobs: list[Job], results: Results) -> None:
    tokenizer = load_tokenizer(cfg.pretrain)
    max_model_len, prompt_budget = vllm_lengths(cfg)
    for job in jobs:
        job.prompt_ids, truncated = render_truncated(tokenizer, job.message, prompt_budget)
        results.counts["truncated"] += truncated
    if not jobs:
        return

    from vllm import SamplingParams

    llm = make_vllm_engine(cfg, max_model_len)

    def params(job: Job) -> SamplingParams:
        n = job.missing
        seed = sample_seed(cfg.seed, job.id, job.draws)
        job.draws += n  # vLLM gives the k-th of n samples the seed + k
        return SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                              min_tokens=1, seed=seed)

    def handle(job: Job, output) -> list[Job]:
        texts = [o.text for o in output.outputs]
        tokens = sum(len(o.token_ids) for o in output.outputs)
        if results.accept(job, texts, tokens):
            if job.blank_rounds > cfg.max_resample:
                results.fail(job, f"blank: no two non-blank responses after {job.blank_rounds} rounds")
                return []
            results.counts["resampled"] += 1
            return [job]
        return []

    engine = getattr(llm, "llm_engine", None)
    if hasattr(llm, "enqueue") and engine is not None and hasattr(engine, "step"):
        # All prompts go to the engine at once (continuous batching); rows are written as they finish.
        # enqueue returns the engine's internal ids ("7-1a2b3c4d" in vLLM 0.32) while outputs carry
        # the external ones ("7"): index each job under both.
        pending: dict[str, tuple[int, Job]] = {}
        open_jobs: dict[int, Job] = {}

        def submit(batch: list[Job]) -> None:
            prompts = [{"prompt_token_ids": j.prompt_ids} for j in batch]
            for rid, job in zip(llm.enqueue(prompts, [params(j) for j in batch], use_tqdm=False), batch):
                key = id(job)
                open_jobs[key] = job
                pending[rid] = pending[rid.rsplit("-", 1)[0]] = (key, job)

        submit(jobs)
        while engine.has_unfinished_requests():
            again: list[Job] = []
            for output in engine.step():
                entry = pending.get(output.request_id) if output.finished else None
                if entry is not None and entry[0] in open_jobs:
                    job = open_jobs.pop(entry[0])
                    again += handle(job, output)
            if again:
                submit(again)
        for job in open_jobs.values():  # not expected: the engine finished without them
            results.fail(job, "engine: request finished without an output")
    else:  # older vLLM: one generate call per round
        todo = jobs
        while todo:
            outputs = llm.generate([{"prompt_token_ids": j.prompt_ids} for j in todo], [params(j) for j in todo],
                                   use_tqdm=False)
            todo = [again for job, out in zip(todo, outputs) for again in handle(job, out)]


# --- openai backend ----------------------------------------------------------------------------


def fit_messages(tokenizer, message: list[dict], max_len: int) -> tuple[list[dict], bool]:
    """Turns whose rendering fits ``max_len`` tokens: the oldest turns go first (keeping a system
    turn while possible), then the start of the first remaining turn's text."""
    if len(render_prompt_ids(tokenizer, message)) <= max_len:
        return message, False
    system = [message[0]] if message[0]["role"] == "system" else []
    body = message[len(system):]

    def size(turns):
        return len(render_prompt_ids(tokenizer, turns))

    while len(body) > 1 and size(system + body) > max_len:
        body = body[1:]
        while len(body) > 1 and body[0]["role"] != "user":
            body = body[1:]
    if system and size(system + body) > max_len:
        system = []
    turns = system + body
    if size(turns) > max_len:
        first = turns[0]
        content_ids = tokenizer(first["content"], add_special_tokens=False)["input_ids"]
        overhead = size([{**first, "content": ""}] + turns[1:]) if len(turns) > 1 else size([{**first, "content": ""}])
        keep = max(1, max_len - overhead)
        while True:
            text = tokenizer.decode(content_ids[-keep:])
            candidate = [{**first, "content": text}] + turns[1:]
            if size(candidate) <= max_len or keep <= 1:
                turns = candidate
                break
            keep = max(1, keep - max(1, (size(candidate) - max_len)))
    return turns, True


class OpenAIGenerator:
    """Samples through an OpenAI-compatible server with the shared client (retries, several
    servers, dead-server benching: ``self_ref.client``)."""

    def __init__(self, cfg: GenerateConfig, results: Results):
        self.cfg = cfg
        self.results = results
        self.client = OpenAIClient(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env or "OPENAI_API_KEY",
                                   timeout=cfg.timeout, max_retries=cfg.max_retries,
                                   concurrency=cfg.concurrency, seed=cfg.seed)
        self.n_supported = True

    async def aclose(self) -> None:
        self.results.counts["retries"] += self.client.stats.retries
        await self.client.aclose()

    async def served_model(self) -> str:
        models = await self.client.served_models()
        if not models:
            raise ConfigError(f"--base_url {self.cfg.base_url}: /models lists no model; pass --model")
        self.client.model = models[0]
        return models[0]

    async def sample(self, job: Job, n: int) -> list[str]:
        seed = sample_seed(self.cfg.seed, job.id, job.draws)
        job.draws += n
        choices = await self.client.chat_choices(
            job.send_message, n=n, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
            max_tokens=self.cfg.max_new_tokens, seed=seed)
        return [c["message"]["content"] for c in choices][:n]

    async def run_job(self, job: Job) -> None:
        try:
            while job.missing > 0:
                n = job.missing if self.n_supported else 1
                texts = await self.sample(job, n)
                if n > 1 and len(texts) < n and self.n_supported:
                    self.n_supported = False
                    print(f"[generate] the server answered {len(texts)} choice(s) for n={n}; "
                          "asking once per response from now on", file=sys.stderr)
                if self.results.accept(job, texts):
                    if job.blank_rounds > self.cfg.max_resample:
                        self.results.fail(job, f"blank: no two non-blank responses after {job.blank_rounds} rounds")
                        return
                    if len(texts) and any(is_blank(t) for t in texts):
                        self.results.counts["resampled"] += 1
        except RequestFailed as e:
            self.results.fail(job, str(e))


async def _run_openai(cfg: GenerateConfig, jobs: list[Job], results: Results) -> None:
    gen = OpenAIGenerator(cfg, results)
    try:
        if not cfg.model:
            cfg.model = await gen.served_model()
            results.model_name = cfg.model
        await asyncio.gather(*[gen.run_job(j) for j in jobs])
    finally:
        await gen.aclose()


def run_openai(cfg: GenerateConfig, jobs: list[Job], results: Results) -> None:
    tokenizer = load_tokenizer(cfg.pretrain) if cfg.pretrain else None
    for job in jobs:
        job.send_message = job.message
        if tokenizer is not None:
            job.send_message, truncated = fit_messages(tokenizer, job.message, cfg.prompt_max_len)
            results.counts["truncated"] += truncated
    if jobs or not cfg.model:
        asyncio.run(_run_openai(cfg, jobs, results))


# --- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(GenerateConfig, argv)
    jobs = load_jobs(cfg)
    output = Path(cfg.output)
    done = read_done_ids(output)
    todo = [j for j in jobs if j.id not in done]
    where = cfg.pretrain if cfg.backend == "vllm" else f"{cfg.model or '(served model)'} at {cfg.base_url}"
    print(f"[generate] {len(jobs)} prompts, {len(jobs) - len(todo)} already in {output}, {len(todo)} to sample "
          f"({NUM_RESPONSES} responses each) with {cfg.backend}: {where}")

    out = AppendOnlyJsonl(output)
    results = Results(out, cfg.model or cfg.pretrain, len(todo))
    t0 = time.perf_counter()
    try:
        if todo:
            (run_vllm if cfg.backend == "vllm" else run_openai)(cfg, todo, results)
    finally:
        results.bar.close()
        out.close()
    seconds = time.perf_counter() - t0
    c = results.counts
    summary = {
        "prompts": len(jobs), "already_done": len(jobs) - len(todo), "generated": c["generated"],
        "failed": c["failed"], "truncated": c["truncated"], "resampled": c["resampled"],
        "blank_responses": c["blank_responses"], "identical_pairs": c["identical_pairs"],
        "response_tokens": c["response_tokens"], "retries": c["retries"], "seconds": round(seconds, 2),
        "prompts_per_s": round(c["generated"] / seconds, 3) if seconds and c["generated"] else None,
        "backend": cfg.backend, "model": results.model_name, "output": str(output),
    }
    print("[generate] " + json.dumps(summary))
    if c["failed"]:
        print(f"[generate] {c['failed']} prompts failed (first: {results.first_error}); "
              "rerun the same command to retry them", file=sys.stderr)
    return summary


if __name__ == "__main__":
    # exit status 3: some items failed for good; a rerun of the same command retries them
    raise SystemExit(3 if run_cli(main)["failed"] else 0)
