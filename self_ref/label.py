"""Label response pairs with self-reference AI feedback: ``python -m self_ref.label``.

    python -m self_ref.label --input pairs.jsonl --output prefs.jsonl \
        --base_url http://127.0.0.1:10080/v1,http://127.0.0.1:10081/v1 --model llama2 --num_votes 4
    python -m self_ref.label --config configs/judge_small.yaml --input ... --output ... --model judge

The judge's method (mode, prompts, critique length, votes, verdict scoring, position-bias
correction) is the same set of flags as ``python -m self_ref.evaluate`` (``JudgeFlags``), so a
method measured there labels the same way here; ``configs/judge_*.yaml`` hold measured sets.

Input rows: ``message`` (a string or chat turns ending with a user turn) and ``responses`` (two
strings); keys are flags. Output: one row per labelled pair, in the schema ``train_rm_llama2.py``
reads (``message``, ``chose``, ``reject``, ``margin``) plus the evidence (votes, strength, the
judge's own answer, model). Pairs the judge does not agree on go to ``--rejects`` with the reason.

Resumable and lossless: each pair's row is appended (one write, flushed) as soon as it is
judged; a rerun of the same command skips every id already in the output or rejects file (a
partial last line left by a kill is removed first), so after crashes, kill -9 or dead servers
the files hold each pair exactly once. A pair whose requests fail for good is not written; it is
counted, and the next rerun retries it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from rlhf_data import load_rows
from rlhf_data.schema import validate_response_pair
from self_ref.client import OpenAIClient, RequestFailed
from self_ref.jsonl_store import AppendOnlyJsonl, read_done_ids
from self_ref.judge import MODES, JudgeFlags, judge_pair, preference_row
from training.cli import run_cli
from training.config import ConfigError, parse_config
from training.progress import progress_bar


@dataclass
class LabelConfig(JudgeFlags):
    """Label response pairs with a self-reference judge."""

    input: str = field(default="", metadata={"help": "pairs file(s): jsonl/json/parquet with message + responses"})
    output: str = field(default="", metadata={"help": "preferences jsonl (appended; resumable)"})
    rejects: str | None = field(default=None, metadata={"help": "rejected pairs jsonl (default: OUTPUT with .rejects.jsonl)"})
    base_url: str = field(default="http://127.0.0.1:23333/v1", metadata={"help": "comma-separated OpenAI-compatible base URLs"})
    model: str = field(default="", metadata={"help": "model name served by the judge server(s)"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the API key"})
    message_key: str = "message"
    responses_key: str = "responses"
    mode: str = field(default="self_reference", metadata={"help": "self_reference (own answer first) | direct (the paper's baseline)"})
    min_agreement: float = field(default=0.75, metadata={"help": "reject pairs whose votes agree less than this (2 votes: both orders must agree; 4: 3 of 4)"})
    concurrency: int = field(default=16, metadata={"help": "pairs in flight"})
    timeout: float = field(default=120.0, metadata={"help": "seconds per request"})
    max_retries: int = field(default=5, metadata={"help": "retries per request (timeouts, 5xx, dropped connections)"})
    skip_bad_rows: bool = False
    limit: int = field(default=-1, metadata={"help": "label at most N pairs of the input (-1: all)"})

    def __post_init__(self):
        if not self.input or not self.output or not self.model:
            raise ConfigError("--input, --output and --model are required")
        self.check_judge_flags()
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")


async def label_all(cfg: LabelConfig, items: list[dict], out: AppendOnlyJsonl, rejects: AppendOnlyJsonl) -> dict:
    prompts = cfg.load_prompts()
    settings = cfg.judge_settings(cfg.mode, cfg.min_agreement)
    counts: Counter = Counter()
    agreements: list[float] = []
    sources: Counter = Counter()
    bar = progress_bar(len(items), "label", unit="pair")
    pending = asyncio.Semaphore(cfg.concurrency)

    async with OpenAIClient(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, timeout=cfg.timeout,
                           max_retries=cfg.max_retries, concurrency=cfg.concurrency, seed=cfg.seed) as client:

        async def one(item):
            async with pending:
                try:
                    judged = await judge_pair(client, prompts, settings, item["message"], item["responses"])
                except RequestFailed:
                    counts["failed"] += 1
                    bar.update(1)
                    return
                row = preference_row(item["id"], item["message"], item["responses"], judged, cfg.model)
                sources.update(v["source"] for v in row["votes"])
                if "reject_reason" in row:
                    rejects.write(row)
                    counts["rejected"] += 1
                    counts[f"rejected: {row['reject_reason'].split(' ')[0]}"] += 1
                else:
                    out.write(row)
                    counts["labelled"] += 1
                    agreements.append(row["agreement"])
                bar.update(1)
                if agreements:
                    bar.set_postfix(agreement=f"{sum(agreements) / len(agreements):.2f}", rejected=counts["rejected"])

        await asyncio.gather(*[one(item) for item in items])
        stats = client.stats
    bar.close()
    return {
        "labelled": counts["labelled"], "rejected": counts["rejected"], "failed": counts["failed"],
        "reject_reasons": {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("rejected: ")},
        "mean_agreement": sum(agreements) / len(agreements) if agreements else None,
        "strength_sources": dict(sources),
        "requests": stats.requests, "retries": stats.retries, "request_failures": dict(stats.failures),
    }


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(LabelConfig, argv)
    rows, report = load_rows(cfg.input, partial(validate_response_pair, message_key=cfg.message_key,
                                                responses_key=cfg.responses_key), cfg.skip_bad_rows)
    if report.skipped:
        print(f"[data] {report.summary()}")
    items = [{**r, "id": r.get("id") or f"{Path(r['_source']).name}:{r['_row']}"} for r in rows]
    if len({i["id"] for i in items}) != len(items):
        raise ConfigError(f"{cfg.input}: duplicate ids; give every row a unique 'id' or drop the column")
    if cfg.limit >= 0:
        items = items[: cfg.limit]
    output = Path(cfg.output)
    rejects_path = Path(cfg.rejects) if cfg.rejects else output.with_suffix(".rejects.jsonl")
    done = read_done_ids(output) | read_done_ids(rejects_path)
    todo = [i for i in items if i["id"] not in done]
    print(f"[label] {len(items)} pairs, {len(items) - len(todo)} already done, {len(todo)} to judge "
          f"with {cfg.model} at {cfg.base_url} ({cfg.num_votes} votes each)")

    out, rej = AppendOnlyJsonl(output), AppendOnlyJsonl(rejects_path)
    t0 = time.perf_counter()
    try:
        summary = asyncio.run(label_all(cfg, todo, out, rej))
    finally:
        out.close()
        rej.close()
    seconds = time.perf_counter() - t0
    summary |= {"seconds": round(seconds, 2), "pairs_per_s": round(len(todo) / seconds, 3) if seconds else None,
                "output": str(output), "rejects": str(rejects_path)}
    print("[label] " + json.dumps(summary))
    if summary["failed"]:
        print(f"[label] {summary['failed']} pairs failed (judge unreachable after retries); rerun the same command to retry them")
    return summary


if __name__ == "__main__":
    # exit status 3: some items failed for good; a rerun of the same command retries them
    raise SystemExit(3 if run_cli(main)["failed"] else 0)
