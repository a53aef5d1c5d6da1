"""Does the judge's own answer help more as the judge grows (the paper's premise)? A paired
reading of ``benchmarks/results/judge_variants.json``: every judge and verdict format was run on
the same truth-set pairs in self-reference and in direct mode, so the gain of the own answer is
measured pair by pair, not as the difference of two independent intervals.

    python -m benchmarks.own_answer_gain          # -> benchmarks/results/own_answer_gain.json

Per pair, right = the judge's lean picks the better response (``self_ref.evaluate``'s accuracy:
an undecided pair is wrong). For each judge and variant:

    gain      = mean over pairs of right_self_reference - right_direct     (values -1, 0, 1)
    gain(J) - gain(SmolLM2) = mean over the same pairs of the difference of the two   (-2 .. 2)

each with a 95% normal interval over pairs (``self_ref.stats.mean_interval``). With 42 pairs a
gain of 0.10 has an interval of about +-0.09.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from self_ref.stats import mean_interval

RESULTS = Path(__file__).parent / "results"
JUDGES = ("smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")  # smallest first: the baseline is the first
VARIANTS = ("small_pointwise", "small_pair")


def right_by_pair(mode: dict) -> dict[str, int]:
    return {p["id"]: int(p["lean"] is not None and p["agreement"] >= 0.5 and p["lean"] == p["better"])
            for p in mode["pairs"]}


def own_answer_gain(runs: dict, split: str = "test") -> dict:
    """``{variant: {judge: figures}}`` for the runs of ``split`` (module docstring)."""
    out: dict[str, dict] = {}
    for variant in VARIANTS:
        gains: dict[str, dict[str, int]] = {}
        for judge in JUDGES:
            run = next((r for key, r in runs.items() if key.startswith(f"{split}:{judge}:")), None)
            modes = (run or {}).get("variants", {}).get(variant, {}).get("modes", {})
            if not {"self_reference", "direct"} <= set(modes):
                continue
            sr, direct = right_by_pair(modes["self_reference"]), right_by_pair(modes["direct"])
            gains[judge] = {pid: sr[pid] - direct[pid] for pid in sr if pid in direct}
        base = JUDGES[0]
        row = {}
        for judge, gain in gains.items():
            ids = sorted(gain)
            row[judge] = {"n": len(ids),
                          "self_reference": sum(right_by_pair(_mode(runs, split, judge, variant, "self_reference")).values()) / len(ids),
                          "direct": sum(right_by_pair(_mode(runs, split, judge, variant, "direct")).values()) / len(ids),
                          "gain": mean_interval([float(gain[i]) for i in ids], bounds=(-1.0, 1.0)).to_dict()}
            if judge != base and base in gains:
                shared = [i for i in ids if i in gains[base]]
                row[judge][f"gain_minus_{base}"] = mean_interval([float(gain[i] - gains[base][i]) for i in shared],
                                                                 bounds=(-2.0, 2.0)).to_dict()
        out[variant] = row
    return out


def _mode(runs: dict, split: str, judge: str, variant: str, mode: str) -> dict:
    run = next(r for key, r in runs.items() if key.startswith(f"{split}:{judge}:"))
    return run["variants"][variant]["modes"][mode]


def fmt(e: dict) -> str:
    return f"{e['value']:+.3f} [{e['low']:+.2f}, {e['high']:+.2f}]"


def table(result: dict) -> str:
    lines = [f"{'variant':18s}{'judge':22s}{'self-ref':>9s}{'direct':>8s}  {'gain (paired)':26s}gain - gain(SmolLM2)"]
    for variant, row in result.items():
        for judge, r in row.items():
            vs = next((fmt(v) for k, v in r.items() if k.startswith("gain_minus_")), "-")
            lines.append(f"{variant:18s}{judge:22s}{r['self_reference']:9.2f}{r['direct']:8.2f}  {fmt(r['gain']):26s}{vs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    source = Path(argv[0]) if argv else RESULTS / "judge_variants.json"
    result = own_answer_gain(json.loads(source.read_text())["runs"])
    print(table(result))
    out = RESULTS / "own_answer_gain.json"
    out.write_text(json.dumps({"source": source.name, "split": "test", "variants": result}, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
