"""PNG plots from metrics files (``metrics.jsonl``: one row per logged step, always with ``step``).

Each figure is a row of panels; each panel draws one or more metric keys against the step. Keys
a run did not log are left out (and a panel with none of its keys is dropped), so the same panel
list serves PPO and ReMax, with or without evaluation rows. Matplotlib's Agg backend: no screen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[tuple[str, str], ...]  # (metric key, legend label)
    ylabel: str = ""


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders made) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry a finite ``key``."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row["step"])
            ys.append(float(value))
    return xs, ys


def plot_metrics(rows: list[dict], panels: list[Panel], path: str | Path, title: str) -> Path | None:
    """One figure of ``panels`` side by side; None (and no file) when no panel has data."""
    drawn = [(p, [(label, *series(rows, key)) for key, label in p.keys]) for p in panels]
    drawn = [(p, [s for s in lines if s[1]]) for p, lines in drawn]
    drawn = [(p, lines) for p, lines in drawn if lines]
    if not drawn:
        return None
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.6 * len(drawn), 3.4), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], drawn):
        for label, xs, ys in lines:
            # a handful of points (evaluation rows) gets markers so single points stay visible
            ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 12 else None, markersize=4)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def plot_calibration(buckets_by_mode: dict[str, list[dict]], path: str | Path, title: str) -> Path | None:
    """Judge calibration: accuracy per preference-strength bucket, one bar group per mode, with
    95% intervals and each bucket's pair count. A bucket is ``{"low", "high", "n", "accuracy":
    {"value", "low", "high"}}``; a calibrated judge's bars rise with strength (the diagonal)."""
    modes = [m for m, b in buckets_by_mode.items() if any(x["n"] for x in b)]
    if not modes:
        return None
    edges = sorted({(b["low"], b["high"]) for m in modes for b in buckets_by_mode[m]})
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(9.5, 3.6))
    for k, mode in enumerate(modes):
        by_edge = {(b["low"], b["high"]): b for b in buckets_by_mode[mode]}
        for i, edge in enumerate(edges):
            b = by_edge.get(edge)
            if not b or not b["n"]:
                continue
            acc = b["accuracy"]
            x = i + (k - (len(modes) - 1) / 2) * width
            ax.bar(x, acc["value"], width, color=f"C{k}", label=mode if i == 0 or edge == edges[0] else None,
                   yerr=[[acc["value"] - acc["low"]], [acc["high"] - acc["value"]]], capsize=3)
            # white on the bar; black where the bar is too short to hold it (an accuracy of 0 is a bar of 0)
            ax.text(x, 0.02, f"n={b['n']}", ha="center", va="bottom", fontsize=7, rotation=90,
                    color="white" if acc["value"] >= 0.15 else "black")
    centres = [(lo + hi) / 2 for lo, hi in edges]
    ax.plot(range(len(edges)), centres, "k--", linewidth=1, label="calibrated (accuracy = strength)")
    ax.set_xticks(range(len(edges)), [f"{lo:.2f}-{hi:.2f}" for lo, hi in edges], fontsize=8)
    ax.set_xlabel("preference strength")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    # beside the axes: bars reach 1.0 in any bucket, where a legend inside would hide them
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)
