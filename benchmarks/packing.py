"""Forward+backward throughput of the tiny model: packed rows vs padded micro-batches.

Same samples, same model, same LM loss. Lengths are log-normal (median 128, sigma 1.0, clipped to
[8, 1024], seed 0). Padded: micro-batches of 8 in dataset order, padded to their longest sample.
Packed: best-fit-decreasing rows under a 4096-token budget, attention through ``varlen_sdpa``
(and, for the record, the masked-SDPA alternative). Prints a table and writes
``benchmarks/results/packing.json``.

    python -m benchmarks.packing [--config configs/benchmark_packing.yaml] [--pretrain DIR]
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from models.packing import PackedBatch, pack_sequences
from models.tiny import build_tiny_model
from training.config import parse_config

RESULTS = Path(__file__).parent / "results"


@dataclass
class PackingBenchmarkConfig:
    """Packed vs padded tokens/s."""

    pretrain: str | None = None  # model folder; default: a fresh tiny model
    num_samples: int = 256
    median_length: int = 128
    sigma: float = 1.0
    min_length: int = 8
    max_length: int = 1024
    seed: int = 0
    padded_batch_size: int = 8
    token_budget: int = 4096
    repeats: int = 2
    threads: int = 2
    output: str = str(RESULTS / "packing.json")


def sample_lengths(cfg: PackingBenchmarkConfig) -> list[int]:
    rng = np.random.default_rng(cfg.seed)
    raw = rng.lognormal(mean=np.log(cfg.median_length), sigma=cfg.sigma, size=cfg.num_samples)
    return np.clip(np.round(raw), cfg.min_length, cfg.max_length).astype(int).tolist()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


def run_padded(model, seqs, batch_size, pad_id):
    processed = 0
    for s in range(0, len(seqs), batch_size):
        batch = seqs[s : s + batch_size]
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(batch):
            ids[i, : len(x)], mask[i, : len(x)] = x, 1
        targets = ids.masked_fill(mask == 0, -100)[:, 1:]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        lm_loss(logits, targets).backward()
        processed += ids.numel()
    return processed


def run_packed(model, seqs, rows):
    processed = 0
    for row in rows:
        pb = PackedBatch.from_sequences([seqs[i] for i in row])
        logits = model(input_ids=pb.input_ids, **pb.attention_kwargs()).logits
        lm_loss(logits, pb.next_token_targets()).backward()
        processed += pb.num_tokens
    return processed


def timed(fn, model, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        processed = fn()
        best = min(best, time.perf_counter() - t0)
    return best, processed


def main(argv=None):
    cfg = parse_config(PackingBenchmarkConfig, argv)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model_dir = cfg.pretrain or str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    lengths = sample_lengths(cfg)
    vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    g = torch.Generator().manual_seed(cfg.seed)
    seqs = [torch.randint(10, vocab, (n,), generator=g) for n in lengths]
    real = sum(lengths)
    rows = pack_sequences(lengths, cfg.token_budget)

    results = []
    for name, attn, fn_factory in [
        ("padded (sdpa)", "sdpa", lambda m: lambda: run_padded(m, seqs, cfg.padded_batch_size, 0)),
        ("packed (varlen_sdpa)", "varlen_sdpa", lambda m: lambda: run_packed(m, seqs, rows)),
        ("packed (masked_sdpa)", "masked_sdpa", lambda m: lambda: run_packed(m, seqs, rows)),
    ]:
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
        model.train()
        seconds, processed = timed(fn_factory(model), model, cfg.repeats)
        results.append({
            "run": name, "seconds": round(seconds, 3), "real_tokens": real, "processed_tokens": processed,
            "processed_over_real": round(processed / real, 4), "tokens_per_s": round(real / seconds, 1),
        })
    padded, packed, masked = results
    summary = {
        "speedup": round(packed["tokens_per_s"] / padded["tokens_per_s"], 3),
        "processed_over_real": packed["processed_over_real"],
        "varlen_over_masked_sdpa": round(packed["tokens_per_s"] / masked["tokens_per_s"], 3),
        "num_rows": len(rows), "num_padded_batches": -(-len(seqs) // cfg.padded_batch_size),
        "config": asdict(cfg) | {"pretrain": cfg.pretrain or "tiny (built fresh)"},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": results,
    }
    print(f"\n{'run':<24}{'seconds':>9}{'tokens/s':>11}{'processed/real':>16}")
    for r in results:
        print(f"{r['run']:<24}{r['seconds']:>9.2f}{r['tokens_per_s']:>11.0f}{r['processed_over_real']:>16.3f}")
    print(f"\nspeedup packed/padded: {summary['speedup']:.2f}x   (target >= 2.0)")
    print(f"packed processed/real: {summary['processed_over_real']:.3f}  (target <= 1.02)")
    print(f"varlen_sdpa / masked_sdpa: {summary['varlen_over_masked_sdpa']:.2f}x")
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
