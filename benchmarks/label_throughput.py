"""Pairs/s of ``self_ref.label`` against a local vLLM judge server, at several concurrencies.

Starts ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 with a tiny judge (or
``--pretrain``), labels the same kind of pairs at concurrency 1, 4, 16 and 64 (fresh output each
time), prints a table and writes ``benchmarks/results/label_throughput.json`` with the speedup
of the best concurrency over concurrency 1 (target >= 4x).

    python -m benchmarks.label_throughput [--config configs/benchmark_label_throughput.yaml]
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.tiny import TinyModelConfig, build_tiny_model
from self_ref.label import main as label_main
from serving.openai_server import VLLMServer
from training.config import parse_config

RESULTS = Path(__file__).parent / "results"
CORPUS = Path(__file__).resolve().parents[1] / "models" / "assets" / "tiny_chat_corpus.jsonl"


@dataclass
class LabelBenchmarkConfig:
    """Self-reference labelling throughput vs concurrency."""

    pretrain: str | None = None  # judge model folder; default: a fresh small random Llama (below)
    # A ~30M-parameter judge: with the 0.6M tiny model the server's per-request Python overhead,
    # not the model, is all there is to measure, and no real judge is like that.
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    concurrencies: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    min_pairs: int = 24  # pairs per run: max(min_pairs, 2 x concurrency)
    num_votes: int = 2
    max_tokens: int = 64
    reference_max_tokens: int = 64
    output: str = str(RESULTS / "label_throughput.json")


def write_pairs(path: Path, n: int) -> Path:
    lines = CORPUS.read_text().splitlines()
    rows = []
    for i in range(n):
        turns = json.loads(lines[i % len(lines)])["messages"]
        first_user = next(j for j, t in enumerate(turns) if t["role"] == "user")
        rows.append({"id": f"pair-{i}", "message": turns[: first_user + 1],
                     "responses": [turns[first_user + 1]["content"], "Sorry, I cannot help with that."]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv=None):
    cfg = parse_config(LabelBenchmarkConfig, argv)
    work = Path(tempfile.mkdtemp(prefix="label_bench_"))
    model_dir = cfg.pretrain or str(build_tiny_model(work / "judge", TinyModelConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads)))
    levels = cfg.concurrencies
    runs = []
    with VLLMServer(model_dir, served_model_name="judge", log_path=work / "server.log") as server:
        print(f"judge server ready in {server.startup_seconds:.0f}s at {server.base_url}")
        for c in levels:
            n = max(cfg.min_pairs, 2 * c)
            pairs = write_pairs(work / f"pairs_{c}.jsonl", n)
            summary = label_main([
                "--input", str(pairs), "--output", str(work / f"out_{c}.jsonl"), "--base_url", server.base_url,
                "--model", server.model, "--concurrency", str(c), "--num_votes", str(cfg.num_votes),
                "--max_tokens", str(cfg.max_tokens), "--reference_max_tokens", str(cfg.reference_max_tokens),
                "--min_agreement", "0.5",
            ])
            runs.append({"concurrency": c, "pairs": n, "seconds": summary["seconds"],
                         "pairs_per_s": summary["pairs_per_s"], "requests": summary["requests"],
                         "failed": summary["failed"]})
    base = runs[0]["pairs_per_s"]
    best = max(runs, key=lambda r: r["pairs_per_s"])
    result = {"speedup_best_over_c1": round(best["pairs_per_s"] / base, 3), "best_concurrency": best["concurrency"],
              "config": asdict(cfg) | {"pretrain": cfg.pretrain or "random Llama (built fresh)"}, "runs": runs}
    print(f"\n{'concurrency':>11}{'pairs':>7}{'seconds':>9}{'pairs/s':>9}{'vs c=1':>8}")
    for r in runs:
        print(f"{r['concurrency']:>11}{r['pairs']:>7}{r['seconds']:>9.1f}{r['pairs_per_s']:>9.2f}{r['pairs_per_s'] / base:>7.1f}x")
    print(f"\nbest / concurrency 1: {result['speedup_best_over_c1']:.1f}x  (target >= 4)")
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
