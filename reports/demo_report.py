"""The main job's report: ``OUT/report.md`` with PNG plots made from the stages' metrics files.

    python -m reports.demo_report out/demo        # (demo.py writes it after every run)
    python -m reports.demo_report out/demo dpo    # report_dpo.md from the --algo dpo files beside it

Reads what the stages left under ``OUT`` (any of them may be missing: its section says so):
``logs/{sft,rm,rl}/metrics.jsonl`` (``logs/dpo`` in place of rm and rl after ``--algo dpo``), ``judge_eval.json`` (``self_ref.evaluate``),
``rm_eval.json`` (the RM on the truth set), ``compare/summary.json`` (``self_ref.compare_policies``)
and ``summary.txt`` (the demo's summary); with ``dpo``, ``compare_dpo/`` and ``summary_dpo.txt``
(demo.py's names for an --algo dpo run beside an RL run in the same folder). Writes ``report.md``
(``report_dpo.md``) and ``report/*.png`` beside it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from reports.plots import Panel, plot_calibration, plot_metrics

SFT_PANELS = [Panel("SFT loss", (("loss", "train"), ("eval_loss", "eval")), "cross-entropy / token")]
RM_PANELS = [
    Panel("RM loss", (("loss", "train"), ("eval_loss", "eval")), "loss"),
    Panel("RM accuracy (chosen > rejected)", (("acc", "train"), ("eval_acc", "held-out")), "accuracy"),
]
DPO_PANELS = [
    Panel("DPO loss", (("loss", "train"), ("eval_loss", "held-out")), "loss"),
    Panel("DPO accuracy (implicit reward chosen > rejected)", (("acc", "train"), ("eval_acc", "held-out")), "accuracy"),
    Panel("implicit reward margin", (("reward_margin", "train"), ("eval_reward_margin", "held-out")), "beta x log-ratio"),
]
RL_PANELS = [
    Panel("reward", (("reward_mean", "rollouts (sampled)"), ("baseline_reward_mean", "greedy baseline"),
                     ("eval_reward_mean", "held-out (greedy)")), "RM score"),
    Panel("KL to the reference", (("kl", "per token"),), "nats"),
    Panel("response length", (("response_length", "rollouts"), ("eval_response_length", "held-out (greedy)")), "tokens"),
]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(est: dict | None, digits: int = 3) -> str:
    """``{"value", "low", "high", "n"}`` -> '0.700 [0.560, 0.810] (n=60)'."""
    if not est or est.get("value") is None or not est.get("n") or math.isnan(est["value"]):
        return "-"  # e.g. position consistency of a pointwise judge: no pair is shown in two orders
    return f"{est['value']:.{digits}f} [{est['low']:.{digits}f}, {est['high']:.{digits}f}] (n={est['n']})"


def image(md: list[str], path: Path | None, report_dir: Path, alt: str, missing: str) -> None:
    md.append(f"![{alt}]({path.relative_to(report_dir)})" if path is not None else f"_{missing}_")
    md.append("")


def judge_section(out: Path, figures: Path) -> list[str]:
    md = ["## The judge on the truth set", ""]
    data = read_json(out / "judge_eval.json")
    if not data or "modes" not in data:
        return md + ["_no judge evaluation (judge_eval.json) in this run_", ""]
    md += [f"Pairs whose better response is known: `{data.get('input', '?')}`. Accuracy counts an undecided pair as "
           "wrong; consistency is the share of pairs whose two orders (A/B, B/A) agree. 95% intervals.", "",
           "| mode | accuracy | position consistency | accuracy when decided |", "|---|---|---|---|"]
    for mode, m in data["modes"].items():
        md.append(f"| {mode} | {fmt(m.get('accuracy'))} | {fmt(m.get('consistency'))} | {fmt(m.get('accuracy_decided'))} |")
    md.append("")
    calib = {mode: m.get("calibration") or [] for mode, m in data["modes"].items()}
    png = plot_calibration(calib, figures / "judge_calibration.png", "judge calibration: accuracy by preference strength")
    image(md, png, out, "judge calibration", "no calibration buckets")
    return md


def rm_truth_section(out: Path) -> list[str]:
    data = read_json(out / "rm_eval.json")
    m = ((data or {}).get("modes") or {}).get("reward_model")
    if not m:
        return []
    cats = ", ".join(f"{c} {fmt(v, 2)}" for c, v in m.get("by_category", {}).items())
    return ["## The reward model on the truth set", "",
            f"Accuracy (the RM scores the better response higher) {fmt(m.get('accuracy'))} on {m.get('n', '?')} pairs; "
            f"by category: {cats or '-'}. 95% intervals.", ""]


def compare_section(out: Path, compare_dir: str = "compare", policy: str = "RL") -> list[str]:
    md = [f"## {policy} policy vs SFT policy, judged", ""]
    data = read_json(out / compare_dir / "summary.json")
    if not data:
        return md + [f"_no comparison ({compare_dir}/summary.json) in this run_", ""]
    name_a, name_b = data.get("name_a", "A"), data.get("name_b", "B")
    a, b = data.get("a") or {}, data.get("b") or {}
    ties = data.get("tie_reasons") or {}
    md += [f"The judge compared {name_a} (A) with {name_b} (B) on {data.get('n', '?')} held-out prompts, both orders; "
           "a tie counts one half. 95% intervals.", "",
           "| | value |", "|---|---|",
           f"| win rate of {name_a} over {name_b} | {fmt(data.get('win_rate'))} |",
           f"| wins / ties / losses | {data.get('wins', '?')} / {data.get('ties', '?')} / {data.get('losses', '?')}"
           + (f" (ties: {', '.join(f'{k} {v}' for k, v in ties.items())})" if ties else "") + " |",
           f"| decisive win rate (ties left out) | {fmt(data.get('decisive_win_rate'))} |",
           f"| length-controlled win rate (at equal lengths) | {fmt(data.get('length_controlled_win_rate'))} |", "",
           f"| per side | {name_b} | {name_a} |", "|---|---|---|"]
    for key, label in (("reward", "mean RM reward"), ("length_tokens", "mean length (tokens)"),
                       ("cut_at_max", "share cut at the length limit")):
        md.append(f"| {label} | {fmt(b.get(key))} | {fmt(a.get(key))} |")
    md.append("")
    for ex in data.get("examples", [])[:3]:
        md += [f"**Prompt:** {ex.get('prompt', '')}", ""]
        for side in ("a", "b"):
            name = data.get(f"name_{side}", side.upper())
            md += [f"- *{name}*: {ex.get(f'response_{side}', '')!s}"]
        md.append("")
    return md


def algo_artefact(name: str, algo: str) -> str:
    """The name of an algorithm's own artefact: ``--algo dpo`` keeps its files beside RL's in one
    folder (``summary.txt`` -> ``summary_dpo.txt``, ``compare`` -> ``compare_dpo``); demo.py writes
    by this rule and the report reads by it."""
    if algo != "dpo":
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}_dpo{dot}{suffix}"


def write_report(out: str | Path, algo: str = "remax") -> Path:
    out = Path(out)
    dpo = algo == "dpo"
    figures = out / "report"
    md = ["# Demo report" + (" (DPO)" if dpo else ""), "",
          f"Made from the artefacts under `{out}` by `python -m reports.demo_report {out}{' dpo' if dpo else ''}`.", ""]
    summary = out / algo_artefact("summary.txt", algo)
    if summary.is_file():
        md += ["## Summary", "", "```", summary.read_text().rstrip(), "```", ""]
    md += judge_section(out, figures)
    md += ["## Training curves", ""]
    after_sft = ((("dpo", DPO_PANELS, "DPO"),) if dpo else (("rm", RM_PANELS, "reward model"), ("rl", RL_PANELS, "RL")))
    for name, panels, title in (("sft", SFT_PANELS, "SFT"), *after_sft):
        rows = read_jsonl(out / "logs" / name / "metrics.jsonl")
        png = plot_metrics(rows, panels, figures / f"{name}.png", title) if rows else None
        md.append(f"### {title}")
        md.append("")
        image(md, png, out, title, f"no metrics at logs/{name}/metrics.jsonl")
    if not dpo:
        md += rm_truth_section(out)
    md += compare_section(out, algo_artefact("compare", algo), "DPO" if dpo else "RL")
    path = out / algo_artefact("report.md", algo)
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["remax"], ["ppo"], ["dpo"]):
        raise SystemExit("usage: python -m reports.demo_report OUT_DIR [remax|ppo|dpo]")
    print(f"wrote {write_report(*sys.argv[1:])}")
