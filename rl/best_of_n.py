"""Best-of-n rejection sampling: ``n`` sampled responses per prompt, scored by one or more reward
models; per prompt the best response is kept as SFT data and (best, worst) as a preference pair.

    prompts (ids "<file name>:<row>") -> chunks of --chunk_size prompts
      -> a rollout engine (rl.rollout: vLLM, or HF generate), n samples each, one seed per prompt
      -> each reward model scores every sample (packed no-grad passes: rl.workers.score_sequences)
      -> total = sum_k w_k * score_k (rl.trainer.total_reward, as RL combines --reward_weights)
      -> select_best_worst -> samples.jsonl (the record), sft.jsonl, pairs.jsonl

**What is scored.** The response *text*, tokenized with the prompt as a reward model is trained
on it (``rlhf_data.tokenize.tokenize_prompt_response``: one end-of-turn token ends it), not the
sampler's token ids: whoever reads the written files re-tokenizes the text, and a sampler's ids
may split text differently from the tokenizer. So the rewards written are those of the saved
text, and equal a plain ``AutoModelForSequenceClassification`` forward on those ids.

**Resumable** like ``self_ref.label``: ``samples.jsonl`` holds one row per finished prompt (its n
samples, their rewards, best and worst), appended with one flushed write as each chunk finishes;
``sft.jsonl`` and ``pairs.jsonl`` are views of it, written right after each row. A rerun skips
the prompt ids already in ``samples.jsonl`` and first appends any view row a kill left out, so a
killed run loses at most the chunk in flight and its files end as an uninterrupted run's would:
each prompt's seed depends only on ``--seed`` and its id, not on the chunk it falls in.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from models.packing import pack_sequences
from rl.experience import SequenceBatch
from rl.rollout import SamplingConfig
from rl.trainer import total_reward
from rl.workers import score_sequences
from rlhf_data import load_rows, validate_prompt
from rlhf_data.tokenize import render_prompt_ids, tokenize_prompt_response
from self_ref.generate import is_blank, sample_seed
from self_ref.jsonl_store import AppendOnlyJsonl, read_done_ids
from training.config import ConfigError
from training.progress import progress_bar

SAMPLES, SFT, PAIRS, SUMMARY, SETTINGS = "samples.jsonl", "sft.jsonl", "pairs.jsonl", "summary.json", "settings.json"


# --- selection (pure) ------------------------------------------------------------------------


def select_best_worst(totals: Sequence[float], usable: Sequence[bool] | None = None) -> tuple[int, int] | None:
    """The selection rule: ``(best, worst)``, the indices of the highest and of the lowest total
    reward among the usable samples (all, when ``usable`` is None). A tie goes to the first index,
    so the choice is deterministic. None when no sample is usable (a blank response cannot be an
    SFT target or a pair side: the trainers refuse blank text)."""
    candidates = [i for i in range(len(totals)) if usable is None or usable[i]]
    if not candidates:
        return None
    best = max(candidates, key=lambda i: (totals[i], -i))
    worst = min(candidates, key=lambda i: (totals[i], i))
    return best, worst


def sft_row(record: dict) -> dict | None:
    """The best response as an SFT conversation (``train_sft.py``'s ``messages``); None without one."""
    if record["best"] is None:
        return None
    best = record["samples"][record["best"]]
    return {"messages": record["message"] + [{"role": "assistant", "content": best["response"]}],
            "id": record["id"], "reward": best["reward"]}


def pair_row(record: dict) -> dict | None:
    """(best, worst) as a preference pair in ``train_rm_llama2.py`` / ``train_dpo.py``'s keys:
    ``margin`` = the reward gap (>= 0), ``strength`` = sigmoid(gap), the Bradley-Terry probability
    that the best beats the worst under the (combined) reward, in [0.5, 1] as ``--loss strength``
    takes it. None when there is no best, or the best and worst are the same text."""
    if record["best"] is None:
        return None
    best, worst = record["samples"][record["best"]], record["samples"][record["worst"]]
    if best["response"] == worst["response"]:
        return None
    gap = best["reward"] - worst["reward"]
    return {"message": record["message"], "chose": best["response"], "reject": worst["response"],
            "margin": gap, "strength": 1.0 / (1.0 + math.exp(-gap)), "id": record["id"]}


# --- prompts -----------------------------------------------------------------------------------


@dataclass
class Prompt:
    id: str  # "<file name>:<row>", the resume key
    message: list[dict]
    prompt_ids: list[int] = field(default_factory=list)  # chat-templated (the engine truncates)


def load_prompts(files: list[str], input_key: str, skip_bad_rows: bool, max_samples: int, log=print) -> list[Prompt]:
    """Validated prompt rows (a bad row: one error naming file, row and field), the first
    ``max_samples`` (-1: all), with ids unique across the files."""
    rows, report = load_rows(files, partial(validate_prompt, key=input_key), skip_bad_rows)
    if report.skipped:
        log(f"[data] {report.summary()}")
    prompts = [Prompt(f"{Path(r['_source']).name}:{r['_row']}", r["message"]) for r in rows]
    ids = Counter(p.id for p in prompts)
    if len(ids) < len(prompts):
        clash = next(i for i, n in ids.items() if n > 1)
        raise ConfigError(f"--prompt_data: two files share a name, so prompt ids collide (e.g. {clash}); rename one")
    return prompts if max_samples < 0 else prompts[:max_samples]


# --- scoring -----------------------------------------------------------------------------------


class RewardScorer:
    """The reward models, resident for the whole run; each sample's score from each of them and
    the weighted total, in packed no-grad passes of at most ``batch_tokens`` tokens."""

    def __init__(self, paths: list[str], weights: list[float], tokenizer, max_len: int, batch_tokens: int,
                 dtype: torch.dtype = torch.float32):
        from models.value_model import RewardModel

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.models = [RewardModel.from_pretrained(p, dtype=dtype).to(self.device).eval() for p in paths]
        self.weights, self.tokenizer, self.max_len, self.batch_tokens = weights, tokenizer, max_len, batch_tokens

    def sequences(self, items: Sequence[tuple[list[dict], str]]) -> SequenceBatch:
        """(message, response) pairs tokenized as reward-model training tokenizes them."""
        samples = [tokenize_prompt_response(self.tokenizer, m, r, self.max_len) for m, r in items]
        return SequenceBatch([s.input_ids for s in samples], [s.prompt_len for s in samples])

    def score(self, batch: SequenceBatch) -> tuple[list[list[float]], list[float]]:
        """``(per_sample[i][k], total[i])``: model k's score of sample i, and sum_k w_k * score."""
        plan = pack_sequences(batch.lengths, max(self.batch_tokens, max(batch.lengths)))
        scores = []
        for model in self.models:
            by_index = score_sequences(model, batch, plan, self.device)
            scores.append(torch.tensor([by_index[i] for i in range(len(batch))]))
        total = total_reward(scores, self.weights, ended=torch.ones(len(batch), dtype=torch.bool))
        return torch.stack(scores, 1).tolist(), total.tolist()


# --- outputs and resume ------------------------------------------------------------------------


class BestOfNFiles:
    """``samples.jsonl`` (the record of finished prompts) and its views ``sft.jsonl`` and
    ``pairs.jsonl`` in one folder; see the module doc for the write order that makes them resumable."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths = {name: folder / name for name in (SAMPLES, SFT, PAIRS)}
        self.views = {SFT: sft_row, PAIRS: pair_row}

    def check_settings(self, settings: dict) -> None:
        """A rerun continues only a run with the same ``settings`` (what decides the samples and
        their rewards: models, sampling, seed): rows of two settings mixed in one folder would
        make a dataset no single command produced. The first run records them."""
        path = self.folder / SETTINGS
        if path.exists():
            old = json.loads(path.read_text(encoding="utf-8"))
            diff = [k for k in settings if old.get(k) != settings[k]]
            if diff:
                k = diff[0]
                raise ConfigError(f"--output {self.folder} holds a run with other settings (--{k} was {old.get(k)!r}, "
                                  f"now {settings[k]!r}{f'; also {len(diff) - 1} more' if len(diff) > 1 else ''}): "
                                  "rerun with its flags to continue it, or use a new --output")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")

    def records(self) -> list[dict]:
        """The finished prompts' rows (a partial last line left by a kill is cut off first)."""
        path = self.paths[SAMPLES]
        read_done_ids(path)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def open(self) -> list[dict]:
        """The records so far, after appending any view row a kill left out; then ready to append."""
        records = self.records()
        self.out = {name: AppendOnlyJsonl(path) for name, path in self.paths.items()}
        for name, view in self.views.items():
            have = read_done_ids(self.paths[name])
            for record in records:
                if record["id"] not in have and (row := view(record)) is not None:
                    self.out[name].write(row)
        return records

    def write(self, record: dict) -> None:
        self.out[SAMPLES].write(record)  # first: once it is on disk the prompt is done
        for name, view in self.views.items():
            if (row := view(record)) is not None:
                self.out[name].write(row)

    def close(self) -> None:
        for f in getattr(self, "out", {}).values():
            f.close()


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class ScoringStats:
    tokens: int = 0  # tokens through reward models, every model counted
    seconds: float = 0.0


def sample_and_score(engine, scorer: RewardScorer, chunk: list[Prompt], sampling: SamplingConfig, seed: int,
                     tokenizer, scoring: ScoringStats) -> list[dict]:
    """One chunk: n samples per prompt (one engine call, a seed per prompt), scored; a record each."""
    requests = [([p.prompt_ids], replace(sampling, seed=sample_seed(seed, p.id, 0))) for p in chunk]
    groups = [request[0] for request in engine.generate_batches(requests)]
    texts = [[tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in g] for g in groups]

    batch = scorer.sequences([(p.message, t) for p, ts in zip(chunk, texts) for t in ts])
    t0 = time.perf_counter()
    per_model, totals = scorer.score(batch)
    scoring.seconds += time.perf_counter() - t0
    scoring.tokens += sum(batch.lengths) * len(scorer.models)

    records, i = [], 0
    for p, group, ts in zip(chunk, groups, texts):
        samples = []
        for rollout, text in zip(group, ts):
            samples.append({"response": text, "rewards": per_model[i], "reward": totals[i],
                            "tokens": len(rollout.response_ids), "ended": rollout.finish_reason == "stop"})
            i += 1
        chosen = select_best_worst([s["reward"] for s in samples], [not is_blank(s["response"]) for s in samples])
        best, worst = chosen if chosen else (None, None)
        records.append({"id": p.id, "message": p.message, "samples": samples, "best": best, "worst": worst})
    return records


def run_best_of_n(engine, scorer: RewardScorer, prompts: list[Prompt], sampling: SamplingConfig, seed: int,
                  chunk_size: int, tokenizer, files: BestOfNFiles) -> dict:
    """Every prompt of ``prompts`` (those still to do), ``chunk_size`` at a time, each chunk's
    records written as it finishes (the engine left-truncates long prompts and counts them).
    Returns this run's throughput."""
    for p in prompts:
        p.prompt_ids = render_prompt_ids(tokenizer, p.message)
    scoring = ScoringStats()

    def rates() -> dict:
        gen = engine.get_stats()
        return {"generate_tokens_per_s": _rate(gen["generated_tokens"], gen["generate_seconds"]),
                "score_tokens_per_s": _rate(scoring.tokens, scoring.seconds)}

    bar = progress_bar(len(prompts), "best-of-n", unit="prompt")
    try:
        for start in range(0, len(prompts), chunk_size):
            chunk = prompts[start:start + chunk_size]
            for record in sample_and_score(engine, scorer, chunk, sampling, seed, tokenizer, scoring):
                files.write(record)
            bar.update(len(chunk))
            bar.set_postfix(rates())
    finally:
        bar.close()
    gen = engine.get_stats()
    return {"prompts_this_run": len(prompts), "truncated_prompts": gen["truncated_prompts"],
            "generated_tokens": gen["generated_tokens"], "generate_seconds": round(gen["generate_seconds"], 3),
            "scored_tokens": scoring.tokens, "score_seconds": round(scoring.seconds, 3), **rates()}


def _rate(tokens: int, seconds: float) -> float | None:
    return round(tokens / seconds, 1) if seconds > 0 else None


def summarize(records: list[dict]) -> dict:
    """What every finished prompt adds up to: the mean total reward of all samples, of the kept
    (best) ones and of the worst, and the counts of what could not be kept."""
    rewards = [s["reward"] for r in records for s in r["samples"]]
    kept = [r["samples"][r["best"]]["reward"] for r in records if r["best"] is not None]
    worst = [r["samples"][r["worst"]]["reward"] for r in records if r["worst"] is not None]

    def mean(xs):
        return round(sum(xs) / len(xs), 6) if xs else None

    return {
        "prompts": len(records), "samples": len(rewards),
        "mean_reward_all": mean(rewards), "mean_reward_kept": mean(kept), "mean_reward_worst": mean(worst),
        "sft_rows": len(kept), "pairs": sum(pair_row(r) is not None for r in records),
        "identical_pairs": sum(r["best"] is not None and pair_row(r) is None for r in records),
        "no_usable_response": sum(r["best"] is None for r in records),
        "blank_responses": sum(is_blank(s["response"]) for r in records for s in r["samples"]),
        "cut_at_max_new_tokens": sum(not s["ended"] for r in records for s in r["samples"]),
    }
