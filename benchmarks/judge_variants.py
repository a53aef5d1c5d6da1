"""What makes a small judge judge: the judge's levers, one variant at a time, against one server.

Each variant is a set of judge flags (those of ``self_ref.evaluate`` / ``self_ref.label``) and a
prompts file (optionally with some templates changed); each is run in self-reference and in direct
mode on the truth set's dev split (``--split``), and a table of accuracy, position consistency
(95% Wilson intervals), accuracy among the pairs both orders agree on, and pairs/s is printed.
Results are merged into ``benchmarks/results/judge_variants.json`` after each variant (a rerun of
some variants replaces only their entries; runs are keyed by split, judge and number of pairs),
so variants can be measured a few at a time on a busy machine.

    python -m benchmarks.judge_variants --serve out/models/smollm2               # all variants
    python -m benchmarks.judge_variants --base_url http://127.0.0.1:24000/v1 --variants small_pointwise,critique0
    python -m benchmarks.judge_variants --split test --variants paper_critique256,small_pointwise

Timings are only comparable between runs on an otherwise idle machine (wrap the command in
``flock /tmp/heavy.lock`` on a shared one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from self_ref.client import OpenAIClient
from self_ref.evaluate import TRUTH_SET, fmt, judge_items, load_truth_set, summarize
from self_ref.judge import JudgeFlags
from self_ref.prompts import JudgePrompts
from training.cli import run_cli
from training.config import ConfigError, check_fields, parse_config

RESULTS = Path(__file__).parent / "results"
SMALL = "configs/judge_small_prompts.yaml"
PAPER = "configs/self_ref_prompts.yaml"

# name -> (what it tests, prompts file, template overrides, judge flags)
VARIANTS: dict[str, tuple[str, str, dict, dict]] = {
    "paper_critique256": ("the paper's prompts, 256-token critique then the verdict (the outside review's setting)",
                          PAPER, {}, {"max_tokens": 256, "reference_max_tokens": 256}),
    "critique64": ("the paper's prompts, a 64-token critique", PAPER, {}, {"max_tokens": 64, "reference_max_tokens": 128}),
    "critique64_text": ("as critique64, the verdict from the text only (no log-probs)",
                        PAPER, {}, {"max_tokens": 64, "reference_max_tokens": 128, "score_verdict": False,
                                    "max_parse_retries": 0}),
    "critique0": ("the paper's prompts, no critique: label log-probs right after the request",
                  PAPER, {}, {"max_tokens": 0, "reference_max_tokens": 128}),
    "small_pair": ("small prompts: reference quoted next to the responses, 'which agrees with the reference', no critique",
                   SMALL, {}, {"max_tokens": 0, "reference_max_tokens": 128}),
    "small_pair_labels12": ("small_pair with labels 1/2 instead of A/B", SMALL, {"labels": ("1", "2")},
                            {"max_tokens": 0, "reference_max_tokens": 128}),
    "paper_pointwise": ("pointwise yes/no check of each response, the own answer as an earlier turn (paper layout)",
                        PAPER, {}, {"verdict": "pointwise", "max_tokens": 0, "reference_max_tokens": 128}),
    "small_pointwise": ("pointwise yes/no check of each response against the quoted own answer, no critique",
                        SMALL, {}, {"verdict": "pointwise", "max_tokens": 0, "reference_max_tokens": 128}),
    "small_pointwise_ref64": ("small_pointwise with a 64-token own answer", SMALL, {},
                              {"verdict": "pointwise", "max_tokens": 0, "reference_max_tokens": 64}),
    "small_pointwise_ref256": ("small_pointwise with a 256-token own answer", SMALL, {},
                               {"verdict": "pointwise", "max_tokens": 0, "reference_max_tokens": 256}),
    "small_pointwise_para": ("small_pointwise, the own answer cut at its first blank line (at most 128 tokens)", SMALL, {},
                             {"verdict": "pointwise", "max_tokens": 0, "reference_max_tokens": 128,
                              "reference_first_paragraph": True}),
    "small_pointwise_system": ("small_pointwise with a judge system prompt", SMALL,
                               {"system": "You are a careful, strict judge. You say Yes only to answers that are "
                                          "correct, helpful and safe, and No to wrong, useless or harmful ones."},
                               {"verdict": "pointwise", "max_tokens": 0, "reference_max_tokens": 128}),
    "small_pointwise_critique32": ("small_pointwise after a 32-token critique of each response", SMALL, {},
                                   {"verdict": "pointwise", "max_tokens": 32, "reference_max_tokens": 128,
                                    "max_parse_retries": 0}),
    "small_pointwise_4votes": ("small_pointwise, 4 votes: the second round with a sampled own answer (self-consistency)",
                               SMALL, {}, {"verdict": "pointwise", "max_tokens": 0, "reference_max_tokens": 128,
                                           "num_votes": 4, "resample_reference": True}),
}
MODES = ("self_reference", "direct")


@dataclass
class VariantsConfig:
    """Judge variants on the truth set's dev split, self-reference and direct, against one server."""

    base_url: str = field(default="", metadata={"help": "a running OpenAI-compatible judge (else --serve)"})
    model: str = field(default="judge", metadata={"help": "served model name"})
    serve: str | None = field(default=None, metadata={"help": "HF folder: start a local vLLM server for it"})
    serve_port: int = field(default=0, metadata={"help": "port of the --serve server (0: a free one)"})
    input: str = str(TRUTH_SET)
    split: str = field(default="dev", metadata={"help": "dev (tuning) | test | all"})
    variants: list[str] = field(default_factory=lambda: ["all"], metadata={"help": f"{', '.join(VARIANTS)} (or all)"})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={"help": " | ".join(MODES)})
    limit: int = field(default=-1, metadata={"help": "an evenly spaced subset of N pairs (-1: all)"})
    concurrency: int = 16
    timeout: float = 600.0
    output: str = str(RESULTS / "judge_variants.json")

    def __post_init__(self):
        check_fields(self)  # --variants / --modes given in code as "a,b" become lists
        if not self.base_url and not self.serve:
            raise ConfigError("give --base_url (a running judge) or --serve DIR")
        unknown = [v for v in self.names() if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ConfigError(f"unknown mode(s) {', '.join(bad)}; known: {', '.join(MODES)}")

    def names(self) -> list[str]:
        return list(VARIANTS) if self.variants == ["all"] else list(self.variants)


def variant_flags(name: str) -> tuple[JudgeFlags, JudgePrompts]:
    _, prompts_file, overrides, flags = VARIANTS[name]
    judge = JudgeFlags(prompts=prompts_file, **flags)
    judge.check_judge_flags()
    prompts = dataclasses.replace(judge.load_prompts(), **overrides)
    prompts.check()
    return judge, prompts


def save(cfg: VariantsConfig, judge: str, n_pairs: int, name: str, entry: dict) -> str:
    """Merge one variant's entry into ``--output`` (written after every variant, so an
    interrupted run keeps what it measured); runs are keyed by split, judge and pair count."""
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(output.read_text()).get("runs", {}) if output.exists() else {}
    key = f"{cfg.split}:{judge}:{n_pairs}"
    run = runs.setdefault(key, {"split": cfg.split, "input": cfg.input, "judge": judge, "n_pairs": n_pairs,
                                "variants": {}})
    run["variants"][name] = entry
    run["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    output.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    return key


async def run_variants(cfg: VariantsConfig, base_url: str, judge_name: str, items: list[dict]) -> dict:
    results = {}
    async with OpenAIClient(base_url, cfg.model, timeout=cfg.timeout, max_retries=3,
                            concurrency=cfg.concurrency) as client:
        for name in cfg.names():
            judge, prompts = variant_flags(name)
            entry = {"description": VARIANTS[name][0], "prompts": VARIANTS[name][1], "prompt_overrides": VARIANTS[name][2],
                     "flags": VARIANTS[name][3], "concurrency": cfg.concurrency, "modes": {}}
            for mode in cfg.modes:
                settings = judge.judge_settings(mode, 0.5)
                records, failed, seconds = await judge_items(client, prompts, settings, items, cfg.concurrency,
                                                             f"{name} {mode}")
                summary = summarize(records, [0.5, 0.75, 1.0], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 0.5)
                summary |= {"failed": failed, "seconds": round(seconds, 1),
                            "pairs_per_s": round(len(records) / seconds, 4) if seconds else None,
                            # enough to compare variants pair by pair (self_ref.evaluate keeps the texts)
                            "pairs": [{k: r[k] for k in ("id", "category", "better", "lean", "strength", "agreement")}
                                      for r in records]}
                entry["modes"][mode] = summary
                print(f"[variants] {name:28s} {mode:15s} accuracy {fmt(summary['accuracy'])}  consistency "
                      f"{fmt(summary['consistency'])}  {summary['pairs_per_s']} pairs/s", flush=True)
            entry["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
            results[name] = entry
            save(cfg, judge_name, len(items), name, entry)
    return results


def table(variants: dict) -> str:
    lines = [f"{'variant':28s}{'mode':16s}{'accuracy':22s}{'consistency':22s}{'acc. both orders agree':24s}pairs/s"]
    for name, entry in variants.items():
        for mode, m in entry["modes"].items():
            agree = next(k for k in m["kept"] if k["min_agreement"] == 1.0)
            kept = "-" if agree["accuracy"]["n"] == 0 else f"{fmt(agree['accuracy'])} n={agree['accuracy']['n']}"
            lines.append(f"{name:28s}{mode:16s}{fmt(m['accuracy']):22s}{fmt(m['consistency']):22s}{kept:24s}"
                         f"{m['pairs_per_s']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(VariantsConfig, argv)
    items = load_truth_set(cfg.input, cfg.split)
    if 0 < cfg.limit < len(items):  # evenly spaced, so a subset still spans every category
        items = [items[i * len(items) // cfg.limit] for i in range(cfg.limit)]
    server = None
    base_url = cfg.base_url
    if cfg.serve:
        from serving.openai_server import VLLMServer

        server = VLLMServer(cfg.serve, port=cfg.serve_port or None, served_model_name=cfg.model).start()
        base_url = server.base_url
        print(f"[variants] judge server ready after {server.startup_seconds:.0f} s at {base_url}")
    judge_name = Path(cfg.serve).name if cfg.serve else cfg.model
    t0 = time.perf_counter()
    try:
        new = asyncio.run(run_variants(cfg, base_url, judge_name, items))
    finally:
        if server is not None:
            server.stop()
    print(table(new))
    print(f"[variants] {len(new)} variant(s) in {time.perf_counter() - t0:.0f} s; merged into {cfg.output} "
          f"({cfg.split}:{judge_name}:{len(items)})")
    return new

if __name__ == "__main__":
    run_cli(main)
