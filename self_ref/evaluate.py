"""How well does a judge judge? ``python -m self_ref.evaluate`` on pairs whose better response is
known (``data/judge_truth_set.jsonl``: facts, advice, safety, instructions; a ``split`` column of
dev / test), in the paper's self-reference mode and its direct baseline, side by side.

    python -m self_ref.evaluate --serve out/models/smollm2 --split test --output out/judge_eval.json
    python -m self_ref.evaluate --base_url http://127.0.0.1:10080/v1 --model llama2 --mode self_reference
    python -m self_ref.evaluate --reward_model out/demo/rm --output out/demo/rm_eval.json   # a reward model

With ``--reward_model DIR`` the same pairs measure a reward model instead of a judge (no server):
a pair counts as right when the RM scores the better response higher (mode ``reward_model``:
``accuracy`` with its interval, ``by_category``, ``mean_margin`` = mean r(better) - r(worse)).
This is what the judge's labels taught the RM, checked against pairs whose answer is known.

The judge is whatever OpenAI-compatible server ``--base_url/--model`` names, or with ``--serve
DIR`` a vLLM server this command starts on 127.0.0.1 for that folder and stops at the end. Every
judge setting of ``self_ref.label`` is a flag here with the same name and default, so a labelling
run and its evaluation use one method; ``--config`` takes a YAML of them (``configs/judge_*.yaml``).

Figures per mode (each with a 95% interval from ``self_ref.stats``; n = pairs unless said):

* ``accuracy``: the pair's label picks the better response; a pair the label rejects (a tie, no
  usable vote, or agreement below ``--accept_agreement``, by default the smallest
  ``--min_agreement``) counts as wrong. Wilson interval.
* ``accuracy_decided``: the same among the pairs the label decides (n = decided pairs).
* ``consistency``: position consistency, the share of (A/B, B/A) vote pairs of one round whose
  two votes prefer the same response (raw votes, before any position-bias correction; a vote at
  exactly 0.5 prefers none). n = rounds judged in both orders; none in the pointwise format,
  which shows one response at a time.
* ``calibration``: pairs grouped by strength s = max(p, 1 - p) (``--calibration_bins`` edges,
  the last bin closed), per bin the count, the mean strength (what a calibrated judge's accuracy
  would be) and the accuracy of the judge's lean (p > 0.5: response 1). Ties have no lean and
  are left out.
* ``kept``: for each ``--min_agreement`` m, the share of pairs ``self_ref.label --min_agreement
  m`` would keep (a lean and agreement >= m) and the accuracy among them.
* ``by_category``: accuracy per category; ``pairs_per_s`` and ``seconds`` of judging.

The JSON (``--output``) holds every figure and one record per pair (the judge's own answer, each
vote with its text and probabilities) under ``modes.<mode>.pairs``. The top-level ``pairs_per_s``
is all modes' judged pairs over their total judging time.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rlhf_data import load_rows
from rlhf_data.errors import DataError, type_name
from rlhf_data.schema import validate_response_pair
from self_ref.client import OpenAIClient, RequestFailed
from self_ref.judge import MODES, JudgeFlags, JudgeSettings, judge_pair
from self_ref.prompts import JudgePrompts
from self_ref.stats import Estimate, wilson_interval
from training.cli import run_cli
from training.config import ConfigError, is_pending, parse_config
from training.progress import progress_bar

ROOT = Path(__file__).resolve().parents[1]
TRUTH_SET = ROOT / "data" / "judge_truth_set.jsonl"
SPLITS = ("dev", "test", "all")


@dataclass
class EvaluateConfig(JudgeFlags):
    """Measure a judge on pairs whose better response is known (self-reference vs direct)."""

    input: list[str] = field(default_factory=lambda: [str(TRUTH_SET)], metadata={"help": "truth set(s): message, responses, better (0/1), optional category, split", "path": "data"})
    split: str = field(default="test", metadata={"help": "dev | test | all: rows whose 'split' is this (tune on dev, report test)", "check": ("dev", "test", "all")})
    mode: str = field(default="both", metadata={"help": "self_reference | direct | both"})
    output: str = field(default="out/judge_eval.json", metadata={"help": "JSON with every figure and per-pair records", "path": "output_file"})
    base_url: list[str] = field(default_factory=lambda: ["http://127.0.0.1:23333/v1"], metadata={"help": "OpenAI-compatible base URLs (ignored with --serve)"})
    model: str = field(default="judge", metadata={"help": "model name served by the judge server(s)"})
    serve: str | None = field(default=None, metadata={"help": "HF model folder: start a local vLLM judge server for it (stopped at the end)", "path": "model"})
    serve_port: int = field(default=0, metadata={"help": "port of the --serve server on 127.0.0.1 (0: a free one)", "check": "[0, 65535]"})
    serve_dtype: str = field(default="float32", metadata={"help": "--dtype of the --serve server"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the API key"})
    min_agreement: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0], metadata={"help": "agreement thresholds for the kept-share table"})
    accept_agreement: float | None = field(default=None, metadata={"help": "a pair whose votes agree less counts as rejected (wrong) in 'accuracy' (default: the smallest --min_agreement, as self_ref.label would label with it)"})
    calibration_bins: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], metadata={"help": "strength bin edges, 0.5 to 1.0"})
    concurrency: int = field(default=16, metadata={"help": "pairs in flight", "check": ">= 1"})
    reward_model: str | None = field(default=None, metadata={"help": "measure this reward model folder instead of a judge (no server)", "path": "model"})
    rm_max_len: int = field(default=2048, metadata={"help": "max tokens of a scored conversation (as the RM's --max_len)", "check": ">= 2"})
    rm_batch_tokens: int = field(default=8192, metadata={"help": "tokens per packed reward-model forward", "check": ">= 1"})
    timeout: float = field(default=300.0, metadata={"help": "seconds per request", "check": "> 0"})
    max_retries: int = field(default=3, metadata={"help": "retries per request", "check": ">= 0"})
    limit: int = field(default=-1, metadata={"help": "evaluate at most N pairs (-1: all)", "check": "-1 or >= 1"})
    message_key: str = "message"
    responses_key: str = "responses"

    def __post_init__(self):
        self.check_judge_flags()
        if self.split not in SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.mode not in (*MODES, "both"):
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, both; got {self.mode!r}")
        if self.reward_model is not None and self.serve is not None:
            raise ConfigError("--reward_model measures a reward model, --serve a judge: give one of them")
        if self.serve is not None and not (Path(self.serve) / "config.json").exists() and not is_pending(self.serve):
            raise ConfigError(f"--serve {self.serve}: not a model folder (no config.json there)")
        if self.accept_agreement is None:
            self.accept_agreement = min(self.kept_levels())
        if not 0.0 <= self.accept_agreement <= 1.0:
            raise ConfigError("--accept_agreement must be in [0, 1]")
        self.bins()

    def modes(self) -> list[str]:
        return list(MODES) if self.mode == "both" else [self.mode]

    def kept_levels(self) -> list[float]:
        return _in_range(self.min_agreement, "--min_agreement", 0.0, 1.0)

    def bins(self) -> list[float]:
        edges = _in_range(self.calibration_bins, "--calibration_bins", 0.5, 1.0)
        if len(edges) < 2 or edges != sorted(set(edges)) or edges[0] != 0.5 or edges[-1] != 1.0:
            raise ConfigError("--calibration_bins must be increasing edges from 0.5 to 1.0, e.g. 0.5,0.75,1.0")
        return edges


def _in_range(values: list[float], flag: str, low: float, high: float) -> list[float]:
    """A list flag's numbers (parsed by the config), at least one, all in ``[low, high]``."""
    if not values or any(not low <= v <= high for v in values):
        raise ConfigError(f"{flag} needs numbers in [{low}, {high}], got {','.join(map(str, values))!r}")
    return list(values)


# --- truth set --------------------------------------------------------------------------------


def validate_truth_row(record: dict, message_key: str = "message", responses_key: str = "responses") -> dict:
    """A pair with its known better response: ``message``, ``responses`` (two strings),
    ``better`` (0 or 1), optional ``category`` and ``split`` strings and ``id``."""
    row = validate_response_pair(record, message_key, responses_key)
    better = record.get("better")
    if isinstance(better, bool) or better not in (0, 1):
        got = "missing" if "better" not in record else f"got {better!r}" if isinstance(better, int) else f"got {type_name(better)}"
        raise DataError(None, None, "better", f"expected 0 or 1 (the index of the better response), {got}")
    if row["responses"][0] == row["responses"][1]:
        raise DataError(None, None, responses_key, "the two responses are identical")
    out = {**row, "better": better}
    for key in ("category", "split"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise DataError(None, None, key, f"expected a string, got {type_name(value)}")
        out[key] = value
    return out


def load_truth_set(paths: str | list[str], split: str = "all", message_key: str = "message", responses_key: str = "responses",
                   limit: int = -1) -> list[dict]:
    """The truth set's rows of ``split`` (all rows for "all"), each with an ``id``; ``paths``: one
    file or a list."""
    rows, _ = load_rows(paths, lambda r: validate_truth_row(r, message_key, responses_key))
    paths = paths if isinstance(paths, str) else ",".join(map(str, paths))  # for the messages
    items = [{**r, "id": r.get("id") or f"{Path(r['_source']).name}:{r['_row']}"} for r in rows]
    if len({i["id"] for i in items}) != len(items):
        raise ConfigError(f"{paths}: duplicate ids; give every row a unique 'id' or drop the column")
    if split != "all":
        items = [i for i in items if i["split"] == split]
        if not items:
            found = sorted({str(i["split"]) for i in rows})
            raise ConfigError(f"{paths}: no rows with split {split!r} (splits there: {', '.join(found)}); "
                              f"use --split all for a file without a split column")
    return items[:limit] if limit >= 0 else items


# --- figures from per-pair records ------------------------------------------------------------


def pair_record(item: dict, judged: dict) -> dict:
    """What the summary needs about one judged pair, and the evidence to inspect it."""
    pref = judged["preference"]
    p = pref.prob_first
    record = {
        "id": item["id"], "category": item.get("category"), "better": item["better"],
        "lean": None if pref.votes_counted == 0 or p == 0.5 else (0 if p > 0.5 else 1),
        "chosen": pref.chosen, "prob_first": p, "strength": pref.strength, "agreement": pref.agreement,
        "votes_counted": pref.votes_counted, "reject_reason": pref.reject_reason,
        "own_answer": judged["own_answer"], "votes": judged["votes"],
    }
    if "own_answers" in judged:
        record["own_answers"] = judged["own_answers"]
    return record


def _prefers_first(vote: dict) -> bool | None:
    """The raw vote's preference (before position-bias correction): True for response 1."""
    p = vote.get("p_first_raw", vote.get("p_first"))
    return None if p is None or p == 0.5 else p > 0.5


def position_consistency(records: list[dict]) -> Estimate:
    """Share of rounds (an A/B vote and the B/A vote after it) whose votes prefer one response
    (pair-format votes only; n = 0 for the pointwise format, which has no positions)."""
    agree = rounds = 0
    for r in records:
        votes = r["votes"]
        for k in range(0, len(votes) - 1, 2):
            ab, ba = votes[k], votes[k + 1]
            if {ab["order"], ba["order"]} != {"AB", "BA"} or ab.get("pointwise") or ba.get("pointwise"):
                continue  # pointwise checks see one response at a time: no position to be biased by
            rounds += 1
            x, y = _prefers_first(ab), _prefers_first(ba)
            agree += x is not None and x == y
    return wilson_interval(agree, rounds)


def summarize(records: list[dict], kept_levels: list[float], bins: list[float], accept_agreement: float = 0.5) -> dict:
    """Every figure of one mode from its pair records (module docstring); JSON-ready."""
    n = len(records)

    def decided(r: dict) -> bool:
        return r["lean"] is not None and r["agreement"] >= accept_agreement

    right = sum(decided(r) and r["lean"] == r["better"] for r in records)
    n_decided = sum(decided(r) for r in records)
    calibration = []
    for i, (low, high) in enumerate(zip(bins, bins[1:])):
        last = i == len(bins) - 2
        inside = [r for r in records if r["lean"] is not None
                  and low <= r["strength"] and (r["strength"] < high or (last and r["strength"] <= high))]
        calibration.append({
            "low": low, "high": high, "n": len(inside),
            "mean_strength": sum(r["strength"] for r in inside) / len(inside) if inside else None,
            "accuracy": wilson_interval(sum(r["lean"] == r["better"] for r in inside), len(inside)).to_dict(),
        })
    kept = []
    for level in kept_levels:
        inside = [r for r in records if r["lean"] is not None and r["agreement"] >= level]
        kept.append({
            "min_agreement": level,
            "share": wilson_interval(len(inside), n).to_dict(),
            "accuracy": wilson_interval(sum(r["lean"] == r["better"] for r in inside), len(inside)).to_dict(),
        })
    by_category = {}
    for category in sorted({str(r["category"]) for r in records if r["category"] is not None}):
        inside = [r for r in records if r["category"] == category]
        by_category[category] = wilson_interval(sum(decided(r) and r["lean"] == r["better"] for r in inside),
                                                len(inside)).to_dict()
    sources = Counter(v.get("source") for r in records for v in r["votes"])
    return {
        "n": n,
        "accuracy": wilson_interval(right, n).to_dict(),
        "accuracy_decided": wilson_interval(right, n_decided).to_dict(),
        "consistency": position_consistency(records).to_dict(),
        "picked_first": wilson_interval(sum(r["lean"] == 0 for r in records), n).to_dict(),
        "mean_strength": sum(r["strength"] for r in records) / n if n else None,
        "calibration": calibration,
        "kept": kept,
        "by_category": by_category,
        "strength_sources": dict(sources),
    }


# --- running the judge ------------------------------------------------------------------------


async def judge_items(client: OpenAIClient, prompts: JudgePrompts, settings: JudgeSettings, items: list[dict],
                      concurrency: int, desc: str = "eval") -> tuple[list[dict], int, float]:
    """Judge every item (``concurrency`` pairs in flight); per-pair records in input order, the
    number of pairs whose requests failed for good, and the seconds taken."""
    bar = progress_bar(len(items), desc, unit="pair")
    pending = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(item: dict) -> dict | None:
        nonlocal failed
        async with pending:
            try:
                judged = await judge_pair(client, prompts, settings, item["message"], item["responses"])
            except RequestFailed as e:
                failed += 1
                print(f"[eval] {item['id']}: judge request failed: {e}", file=sys.stderr)
                return None
            finally:
                bar.update(1)
            return pair_record(item, judged)

    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*[one(item) for item in items])
    finally:
        bar.close()
    return [r for r in results if r is not None], failed, time.perf_counter() - t0


async def evaluate_modes(cfg: EvaluateConfig, base_url: str | list[str], items: list[dict]) -> dict:
    prompts = cfg.load_prompts()
    out = {"modes": {}}
    total_pairs, total_seconds = 0, 0.0
    async with OpenAIClient(base_url, cfg.model, api_key_env=cfg.api_key_env, timeout=cfg.timeout,
                            max_retries=cfg.max_retries, concurrency=cfg.concurrency, seed=cfg.seed) as client:
        base_url = base_url if isinstance(base_url, str) else ",".join(base_url)  # for the messages
        try:
            served = await client.served_models()
        except RequestFailed as e:
            raise ConfigError(f"cannot reach the judge at {base_url}: {e}") from None
        if served and cfg.model not in served:
            raise ConfigError(f"the judge at {base_url} serves {', '.join(served)}, not --model {cfg.model!r}")
        for mode in cfg.modes():
            settings = cfg.judge_settings(mode, cfg.accept_agreement)
            records, failed, seconds = await judge_items(client, prompts, settings, items, cfg.concurrency, f"eval {mode}")
            if not records:
                raise ConfigError(f"every judge request failed in {mode} mode (judge at {base_url}); see the lines above")
            summary = summarize(records, cfg.kept_levels(), cfg.bins(), cfg.accept_agreement)
            summary |= {"failed": failed, "seconds": round(seconds, 2),
                        "pairs_per_s": round(len(records) / seconds, 4) if seconds else None,
                        "settings": asdict(settings), "pairs": records}
            out["modes"][mode] = summary
            total_pairs, total_seconds = total_pairs + len(records), total_seconds + seconds
        out["client"] = {"requests": client.stats.requests, "retries": client.stats.retries,
                         "failures": dict(client.stats.failures),
                         "scoring": {"next_token": client.supports_token_scoring,
                                     "prompt_logprobs": client.supports_scoring}}
    out["pairs_per_s"] = round(total_pairs / total_seconds, 4) if total_seconds else None
    return out


def evaluate_reward_model(cfg: EvaluateConfig, items: list[dict]) -> dict:
    """The reward model as a scorer: right when r(better) > r(worse)."""
    from training.reward_scoring import score_conversations

    t0 = time.perf_counter()
    rewards = score_conversations(cfg.reward_model, [(it["message"], r) for it in items for r in it["responses"]],
                                  cfg.rm_max_len, cfg.rm_batch_tokens,
                                  sources=[(it["_source"], it["_row"]) for it in items for _ in (0, 1)])
    seconds = time.perf_counter() - t0
    records = []
    for i, it in enumerate(items):
        pair = rewards[2 * i: 2 * i + 2]
        margin = pair[it["better"]] - pair[1 - it["better"]]
        records.append({"id": it["id"], "category": it["category"], "better": it["better"], "rewards": pair,
                        "margin": margin, "right": margin > 0})
    by_category = {c: wilson_interval(sum(r["right"] for r in records if r["category"] == c),
                                      sum(r["category"] == c for r in records)).to_dict()
                   for c in sorted({str(r["category"]) for r in records if r["category"] is not None})}
    summary = {"n": len(records), "accuracy": wilson_interval(sum(r["right"] for r in records), len(records)).to_dict(),
               "by_category": by_category,
               "mean_margin": sum(r["margin"] for r in records) / len(records) if records else None,
               "seconds": round(seconds, 2), "pairs_per_s": round(len(records) / seconds, 4) if seconds else None,
               "pairs": records}
    return {"modes": {"reward_model": summary}, "pairs_per_s": summary["pairs_per_s"]}


# --- report -----------------------------------------------------------------------------------


def fmt(e: dict, digits: int = 3) -> str:
    """``0.714 [0.563, 0.829]`` (or ``-`` for no data)."""
    if not e or e.get("n", 0) == 0 or e.get("value") is None or math.isnan(e["value"]):
        return "-"
    return f"{e['value']:.{digits}f} [{e['low']:.2f}, {e['high']:.2f}]"


def format_report(result: dict) -> str:
    modes = result["modes"]
    if "reward_model" in modes:
        m = modes["reward_model"]
        cats = ", ".join(f"{c} {v['value']:.2f} (n={v['n']})" for c, v in m["by_category"].items())
        return (f"reward model: accuracy {fmt(m['accuracy'])} on {m['n']} pairs, mean margin r(better) - r(worse) "
                f"{m['mean_margin']:+.4f}" + (f"\nreward model: by category: {cats}" if cats else ""))
    lines = [f"{'mode':16s}{'accuracy':22s}{'acc. decided':22s}{'consistency':22s}{'picked 1st':8s}  pairs/s"]
    for mode, m in modes.items():
        lines.append(f"{mode:16s}{fmt(m['accuracy']):22s}{fmt(m['accuracy_decided']):22s}{fmt(m['consistency']):22s}"
                     f"{m['picked_first']['value']:<8.2f}  {m['pairs_per_s']}")
    for mode, m in modes.items():
        lines.append(f"\n{mode}: calibration (strength bin: n, mean strength, accuracy of the lean)")
        for b in m["calibration"]:
            mean = "-" if b["mean_strength"] is None else f"{b['mean_strength']:.3f}"
            lines.append(f"  {b['low']:.2f}-{b['high']:.2f}  n={b['n']:<4d} strength {mean:6s} accuracy {fmt(b['accuracy'])}")
        lines.append(f"{mode}: kept by min_agreement (share kept, accuracy among kept)")
        for k in m["kept"]:
            lines.append(f"  >= {k['min_agreement']:.2f}  kept {fmt(k['share'])}  accuracy {fmt(k['accuracy'])}")
        cats = ", ".join(f"{c} {v['value']:.2f} (n={v['n']})" for c, v in m["by_category"].items())
        if cats:
            lines.append(f"{mode}: by category: {cats}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(EvaluateConfig, argv)
    items = load_truth_set(cfg.input, cfg.split, cfg.message_key, cfg.responses_key, cfg.limit)
    if cfg.reward_model:
        print(f"[eval] {len(items)} pairs ({cfg.split} split of {','.join(cfg.input)}); reward model {cfg.reward_model}")
        return write_result(cfg, items, evaluate_reward_model(cfg, items))
    server = None
    base_url = cfg.base_url
    if cfg.serve:
        from serving.openai_server import VLLMServer

        output = Path(cfg.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        server = VLLMServer(cfg.serve, port=cfg.serve_port or None, served_model_name=cfg.model,
                            log_path=output.with_suffix(".server.log"), extra_args=["--dtype", cfg.serve_dtype])
        print(f"[eval] starting a vLLM judge server for {cfg.serve} on {server.base_url} (log {server.log_path})")
        try:
            server.start()
        except (RuntimeError, TimeoutError) as e:
            raise ConfigError(f"the judge server for {cfg.serve} did not start: {str(e).splitlines()[0]}; "
                              f"log {server.log_path}") from None
        print(f"[eval] judge server ready after {server.startup_seconds:.0f} s")
        base_url = server.base_url
    print(f"[eval] {len(items)} pairs ({cfg.split} split of {','.join(cfg.input)}); judge {cfg.model} at "
          f"{base_url if isinstance(base_url, str) else ','.join(base_url)}; "
          f"modes {', '.join(cfg.modes())}; {cfg.num_votes} votes, critique {cfg.max_tokens} tokens")
    try:
        result = asyncio.run(evaluate_modes(cfg, base_url, items))
    finally:
        if server is not None:
            server.stop()
    return write_result(cfg, items, result)


def write_result(cfg: EvaluateConfig, items: list[dict], result: dict) -> dict:
    scorer = {"reward_model": cfg.reward_model} if cfg.reward_model else {"judge": cfg.serve or cfg.model}
    result = {"input": ",".join(cfg.input), "split": cfg.split, "n_pairs": len(items), **scorer,
              **({} if cfg.reward_model else {"prompts": cfg.prompts or "configs/self_ref_prompts.yaml"}),
              "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)}, **result}
    print(format_report(result))
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"[eval] wrote {output}; pairs/s {result['pairs_per_s']}")
    return result


if __name__ == "__main__":
    run_cli(main)
