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

Fails fast, in one line on stderr with exit status 2 (what is finished stays written; a rerun of
the same command resumes): a bad setting (checked before any request), a judge that refuses the
key, the model or the URL (HTTP 401 / 403 / 404, with the server's own words), and judge servers
that do not answer at all (checked with ``/models`` first, and again whenever every server stops
answering mid-run).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

from rlhf_data import load_rows
from rlhf_data.schema import validate_response_pair
from self_ref.client import OpenAIClient, RequestFailed, ServerUnusable
from self_ref.jsonl_store import AppendOnlyJsonl, read_done_ids
from self_ref.judge import MODES, JudgeFlags, judge_pair, preference_row
from training.cli import run_cli
from training.config import ConfigError, check_output_path, parse_config, same_path
from training.progress import progress_bar


@dataclass
class LabelConfig(JudgeFlags):
    """Label response pairs with a self-reference judge."""

    input: list[str] = field(default_factory=list, metadata={"help": "pairs file(s): jsonl/json/parquet with message + responses", "path": "data"})
    output: str = field(default="", metadata={"help": "preferences jsonl (appended; resumable)", "path": "output_file"})
    rejects: str | None = field(default=None, metadata={"help": "rejected pairs jsonl (default: OUTPUT with .rejects.jsonl)", "path": "output_file"})
    base_url: list[str] = field(default_factory=lambda: ["http://127.0.0.1:23333/v1"], metadata={"help": "OpenAI-compatible base URLs (requests spread over them)"})
    model: str = field(default="", metadata={"help": "model name served by the judge server(s)"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the API key"})
    message_key: str = "message"
    responses_key: str = "responses"
    mode: str = field(default="self_reference", metadata={"help": "self_reference (own answer first) | direct (the paper's baseline)"})
    min_agreement: float = field(default=0.75, metadata={"help": "reject pairs whose votes agree less than this (2 votes: both orders must agree; 4: 3 of 4)", "check": "[0, 1]"})
    concurrency: int = field(default=16, metadata={"help": "pairs in flight", "check": ">= 1"})
    timeout: float = field(default=120.0, metadata={"help": "seconds per request", "check": "> 0"})
    max_retries: int = field(default=5, metadata={"help": "retries per request (timeouts, 5xx, 429, dropped connections)", "check": ">= 0"})
    skip_bad_rows: bool = False
    limit: int = field(default=-1, metadata={"help": "label at most N pairs of the input (-1: all)", "check": "-1 or >= 1"})

    def __post_init__(self):
        if not self.input or not self.output or not self.model:
            raise ConfigError("--input, --output and --model are required")
        self.check_judge_flags()
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.check_run_flags()

    def rejects_path(self) -> Path:
        return Path(self.rejects) if self.rejects else Path(self.output).with_suffix(".rejects.jsonl")

    def check_run_flags(self) -> None:
        """The labelling run's own settings, before any request (one ``ConfigError`` naming the
        flag; value ranges are the fields' rules, input and output paths ``parse_config``'s)."""
        urls = self.base_url
        if not urls:
            raise ConfigError("--base_url is empty; give the judge server's URL, e.g. http://127.0.0.1:23333/v1")
        for url in urls:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
            except ValueError as e:
                raise ConfigError(f"--base_url {url!r} is not a URL ({e})") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"--base_url {url!r} must be an http(s) URL with a host, e.g. http://127.0.0.1:23333/v1")
        if not self.rejects:  # the default rejects file is a path no flag names: check it here
            for item in self.input:
                if same_path(self.rejects_path(), item):
                    raise ConfigError(f"--output's rejects file {self.rejects_path()} is also --input: "
                                      "give --rejects another file")
            check_output_path("--output's rejects file", str(self.rejects_path()), "file")
        if same_path(self.output, self.rejects_path()):
            raise ConfigError(f"--rejects {self.rejects_path()} is also --output: give the rejected pairs their own file")


async def label_all(cfg: LabelConfig, items: list[dict], out: AppendOnlyJsonl, rejects: AppendOnlyJsonl) -> dict:
    prompts = cfg.load_prompts()
    settings = cfg.judge_settings(cfg.mode, cfg.min_agreement)
    counts: Counter = Counter()
    agreements: list[float] = []
    sources: Counter = Counter()
    pending = asyncio.Semaphore(cfg.concurrency)
    stopped: ServerUnusable | None = None
    _quiet_failed_requests(asyncio.get_running_loop())
    bar = None

    async with OpenAIClient(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, timeout=cfg.timeout,
                           max_retries=cfg.max_retries, concurrency=cfg.concurrency, seed=cfg.seed) as client:
        if items:
            await check_judge(client, cfg)  # a dead server, a refused key or a wrong model: stop here
        bar = progress_bar(len(items), "label", unit="pair")

        async def one(item):
            async with pending:
                try:
                    judged = await judge_pair(client, prompts, settings, item["message"], item["responses"])
                except ServerUnusable:
                    raise  # the whole run stops (below)
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

        tasks = [asyncio.ensure_future(one(item)) for item in items]
        try:
            await asyncio.gather(*tasks)
        except ServerUnusable as e:
            # every pair in flight or waiting is dropped unwritten (a rerun does it); rows already
            # written stay: each is one whole, flushed line
            stopped = e
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        stats = client.stats
        # what the server turned out to offer for scoring the verdict (None: never tried)
        extensions = {"next_token": client.supports_token_scoring, "prompt_logprobs": client.supports_scoring}
    if stopped is not None:
        bar.leave = False  # the error line replaces the bar
    bar.close()
    summary = {
        "labelled": counts["labelled"], "rejected": counts["rejected"], "failed": counts["failed"],
        "reject_reasons": {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("rejected: ")},
        "mean_agreement": sum(agreements) / len(agreements) if agreements else None,
        "strength_sources": dict(sources),
        "requests": stats.requests, "retries": stats.retries, "request_failures": dict(stats.failures),
        "judge_extensions": extensions,
    }
    if stats.messages:
        summary["request_errors"] = dict(stats.messages)
    if stopped is not None:
        summary["stopped"] = str(stopped)
        summary["not_judged"] = len(items) - counts["labelled"] - counts["rejected"] - counts["failed"]
    return summary


def _quiet_failed_requests(loop: asyncio.AbstractEventLoop) -> None:
    """No "Task exception was never retrieved" for a failed request: a pair that fails (or a run
    that stops) may leave a sibling request's task (pointwise checks run side by side) unawaited;
    its failure is counted with the pair already."""
    previous = loop.get_exception_handler()

    def handler(loop, context):
        if isinstance(context.get("exception"), RequestFailed):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def check_judge(client: OpenAIClient, cfg: LabelConfig) -> None:
    """Before the first pair: some server answers, takes the key, and serves ``--model``."""
    try:
        listed = await client.probe_servers()
    except ServerUnusable as e:
        raise ConfigError(str(e)) from None
    for url, served in listed.items():
        if served and cfg.model not in served:
            raise ConfigError(f"the judge at {url} serves {', '.join(served)}, not --model {cfg.model!r}")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(LabelConfig, argv)
    rows, report = load_rows(cfg.input, partial(validate_response_pair, message_key=cfg.message_key,
                                                responses_key=cfg.responses_key), cfg.skip_bad_rows)
    if report.skipped:
        print(f"[data] {report.summary()}")
    items = [{**r, "id": r.get("id") or f"{Path(r['_source']).name}:{r['_row']}"} for r in rows]
    if len({i["id"] for i in items}) != len(items):
        raise ConfigError(f"{','.join(cfg.input)}: duplicate ids; give every row a unique 'id' or drop the column")
    if cfg.limit >= 0:
        items = items[: cfg.limit]
    output = Path(cfg.output)
    rejects_path = cfg.rejects_path()
    done = read_done_ids(output) | read_done_ids(rejects_path)
    todo = [i for i in items if i["id"] not in done]
    print(f"[label] {len(items)} pairs, {len(items) - len(todo)} already done, {len(todo)} to judge "
          f"with {cfg.model} at {','.join(cfg.base_url)} ({cfg.num_votes} votes each)")

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
    if "stopped" in summary:
        # one line on stderr, exit status 2 (run_cli); finished pairs are in the files, a rerun resumes
        raise ConfigError(summary["stopped"])
    if summary["failed"]:
        print(f"[label] {summary['failed']} pairs failed (requests failed after retries or were refused: see "
              "request_failures); rerun the same command to retry them")
    return summary


if __name__ == "__main__":
    # exit status 3: some items failed for good; a rerun of the same command retries them
    raise SystemExit(3 if run_cli(main)["failed"] else 0)
