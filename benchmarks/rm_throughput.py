"""Reward-model training throughput: ours packed vs ours padded vs TRL's ``RewardTrainer``.

One run of this script trains the same tiny model (fresh, or ``--pretrain``) on the same synthetic
preference pairs three times, for the same number of optimizer steps with the same global batch,
learning rate, schedule, AdamW betas, clipping and fp32 precision:

* ``trl``:    ``trl.RewardTrainer`` (HF ``Trainer``; micro-batches of ``micro_batch_size`` pairs padded
              to their longest sequence, ``gradient_accumulation_steps`` up to the global batch);
* ``padded``: ``train_rm_llama2.main`` with the same micro-batches by count (FSDP2 ZeRO-3, one process);
* ``packed``: ``train_rm_llama2.main --packing_samples`` (token-budgeted rows, no padding, varlen SDPA).

Timing: every run takes a timestamp at the end of each optimizer step (ours: the ``time`` column of
``metrics.jsonl``, logged every step; TRL: a ``TrainerCallback.on_step_end``). The first
``warmup_steps`` steps are excluded for all three runs. Each run is repeated ``repeats`` times,
round-robin; a repeat trains the same batches in the same order, so step k is the same work every
time, and a run's seconds are the sum over timed steps of that step's fastest repeat (on a shared
2-core machine one busy spell can slow a step several-fold; all repeats are kept in the JSON).
With the default seed TRL's sampler draws the very same global batches and micro-batches as ours
(checked per step: ``same_batches_as_ours``). Real tokens = prompt + response tokens (no padding) of both sides of the pairs trained
in the timed steps: for ours, from our tokenizer and our trainer's batch order (replayed here and
checked against the logged ``tokens_per_s``); for TRL, the ``attention_mask`` sums of the batches it
trained on, its own tokenization (checked identical to ours, row by row). Real tokens/s = real
tokens / seconds. Prints a table and writes ``benchmarks/results/rm_throughput.json``.

TRL is not a dependency of the project: ``make bench-rm`` installs it first, or
``pip install "trl>=1.0,<1.17" "transformers<5.20"``.

    python -m benchmarks.rm_throughput [--config configs/benchmark_rm_throughput.yaml] [--pretrain DIR]
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from training.config import ConfigError, check_fields, parse_config

RESULTS = Path(__file__).parent / "results"
RUNS = ("trl", "padded", "packed")
TRL_INSTALL = 'pip install "trl>=1.0,<1.17" "transformers<5.20"   (or: make bench-rm)'

GOOD = "helpful clear kind honest careful accurate polite useful friendly thoughtful".split()
BAD = "rude wrong lazy vague careless false sloppy useless hostile confusing".split()
TOPICS = "weather cooking travel history science music sports money health gardens".split()


@dataclass
class RMThroughputConfig:
    """Tokens/s of reward-model training: ours packed / ours padded / TRL RewardTrainer."""

    pretrain: str | None = None  # model folder (a causal LM or a reward model); default: a fresh tiny Llama
    hidden_size: int = 256  # of the fresh tiny model
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # data: response lengths (tokens, EOS included) log-normal, clipped so prompt + response <= max_len - 2
    median_response_tokens: int = 100
    response_sigma: float = 0.8
    min_response_tokens: int = 8
    median_context_tokens: int = 12  # extra words in the user turn, log-normal too
    max_len: int = 512
    # training, the same for all runs
    steps: int = 8  # optimizer steps; the data has exactly steps x train_batch_size pairs (one epoch)
    warmup_steps: int = 1  # excluded from the timing of every run
    repeats: int = 2  # every run is repeated (round-robin: trl, padded, packed, trl, ...); per step the fastest counts
    train_batch_size: int = 32  # pairs per optimizer step
    micro_batch_size: int = 8  # pairs per padded micro-batch (ours padded, TRL)
    packing_max_tokens: int = 2560  # packed micro-batch budget: ~ micro_batch_size x 2 sides x mean sample length
    learning_rate: float = 1e-4
    seed: int = 0
    threads: int = 2
    runs: list[str] = field(default_factory=lambda: list(RUNS))  # which runs, in this order
    workdir: str | None = None  # model, data and logs (default: a temporary folder)
    output: str = str(RESULTS / "rm_throughput.json")

    def __post_init__(self):
        check_fields(self)  # --runs given in code as "a,b" becomes the list
        if not self.runs or any(r not in RUNS for r in self.runs):
            raise ConfigError(f"--runs: comma-separated from {', '.join(RUNS)}, got {','.join(self.runs)!r}")
        if self.train_batch_size % self.micro_batch_size:
            raise ConfigError("--train_batch_size must be a multiple of --micro_batch_size")
        if not 1 <= self.warmup_steps < self.steps - 1:
            raise ConfigError("--warmup_steps must be >= 1 (the first timestamp is the end of step 1) and leave two timed steps")
        if self.repeats < 1:
            raise ConfigError("--repeats must be >= 1")


# ---------------------------------------------------------------------------------------- data


def corpus_words() -> list[str]:
    """Distinct words of the shipped chat corpus: text tokenized like real answers."""
    from models.tiny import corpus_texts

    return sorted({w for t in corpus_texts() for w in t.split() if re.fullmatch(r"[A-Za-z][A-Za-z',.;:-]*", w)})


def preference_rows(cfg: RMThroughputConfig, tokenizer) -> list[dict]:
    """``steps x train_batch_size`` rows ``{message, chose, reject}`` with log-normal response lengths.

    Texts are built word by word with each word's exact token count (byte-level BPE pre-splits at
    spaces, so the count of " w1 w2 ..." is the sum over " w"): chosen responses sprinkle words from
    GOOD, rejected ones from BAD (a rule a reward model can learn); each side draws its own length.
    """
    from rlhf_data.tokenize import render_chat

    rng = np.random.default_rng(cfg.seed)
    words = corpus_words()
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words + GOOD + BAD}

    def n_tokens(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    def text(head: str, target: int, flavour: list[str] | None = None) -> str:
        """``head`` + words up to ``target`` tokens, never more (the last word is dropped if it overshoots)."""
        out, used = [head], n_tokens(head)
        while used < target:
            w = str(rng.choice(flavour)) if flavour and rng.random() < 0.15 else str(rng.choice(words))
            out.append(w)
            used += cost[w]
        if used > target and len(out) > 1:
            used -= cost[out.pop()]
        return " ".join(out)

    def lognormal(median: float, sigma: float) -> int:
        return int(round(rng.lognormal(math.log(median), sigma)))

    rows = []
    for _ in range(cfg.steps * cfg.train_batch_size):
        topic = str(rng.choice(TOPICS))
        question = f"Tell me something about {topic}."
        question = text(question, n_tokens(question) + min(lognormal(cfg.median_context_tokens, 0.8), 128))
        message = [{"role": "user", "content": question}]
        if rng.random() < 0.2:
            message = [{"role": "system", "content": "Answer briefly and honestly."}] + message
        cap = cfg.max_len - n_tokens(render_chat(tokenizer, message)[0])  # prompt + response <= max_len
        sides = []
        for flavour in (GOOD, BAD):
            n = min(max(lognormal(cfg.median_response_tokens, cfg.response_sigma), cfg.min_response_tokens), cap)
            sides.append(text(f"About {topic}:", n - 2, flavour) + ".")  # + "." + EOS: n tokens
        rows.append({"message": message, "chose": sides[0], "reject": sides[1]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def our_pairs(data: Path, tokenizer, cfg: RMThroughputConfig):
    """Rows and token ids exactly as train_rm_llama2.main reads them (same validation, order, truncation)."""
    from rlhf_data import PreferenceKeys, validate_preference
    from rlhf_data.mixing import train_eval_rows
    from rlhf_data.tokenize import tokenize_preference

    keys = PreferenceKeys("message", "chose", "reject", "margin")
    rows, _, _ = train_eval_rows(str(data), None, partial(validate_preference, keys=keys), seed=cfg.seed)
    return rows, [tokenize_preference(tokenizer, r, max_len=cfg.max_len) for r in rows]


# ---------------------------------------------------------------------------------------- runs


def timed_summary(name: str, step_ends: list[float], step_real: list[int], step_processed: list[int],
                  warmup: int, extra: dict) -> dict:
    """Seconds from the end of the warm-up steps to the end of the last step, and the tokens of those steps."""
    seconds = step_ends[-1] - step_ends[warmup - 1]
    real, processed = sum(step_real[warmup:]), sum(step_processed[warmup:])
    return {
        "run": name, "steps": len(step_ends), "timed_steps": len(step_ends) - warmup,
        "seconds": round(seconds, 3), "real_tokens": int(real), "processed_tokens": int(processed),
        "processed_over_real": round(processed / real, 4), "real_tokens_per_s": round(real / seconds, 1),
        "step_seconds": [round(b - a, 3) for a, b in zip(step_ends[warmup - 1:], step_ends[warmup:])],
        **extra,
    }


def replay_step_tokens(cfg: RMThroughputConfig, pairs) -> list[int]:
    """Real tokens of each global batch, in train_rm_llama2's batch order (its ``EpochSampler``)."""
    from training.batches import EpochSampler

    sampler = EpochSampler(len(pairs), cfg.train_batch_size, cfg.seed)
    return [sum(pairs[i].num_tokens for i in idx) for _, idx, _ in sampler.batches_from((0, 0), 1, cfg.steps)]


def run_ours(cfg: RMThroughputConfig, model_dir: Path, data: Path, pairs, packing: bool, workdir: Path) -> dict:
    import train_rm_llama2
    from training.metrics_logger import read_metrics

    name = "packed" if packing else "padded"
    log_dir = Path(tempfile.mkdtemp(prefix=f"log_{name}_", dir=workdir))  # metrics.jsonl appends: a fresh folder
    argv = [
        "--pretrain", str(model_dir), "--dataset", str(data), "--max_len", str(cfg.max_len),
        "--train_batch_size", str(cfg.train_batch_size), "--micro_train_batch_size", str(cfg.micro_batch_size),
        "--max_steps", str(cfg.steps), "--max_epochs", "1", "--learning_rate", str(cfg.learning_rate),
        "--loss", "sigmoid", "--zero_stage", "3", "--no-bf16", "--no-gradient_checkpointing",
        "--seed", str(cfg.seed), "--logging_path", str(log_dir), "--logging_steps", "1",
    ]
    if packing:
        argv += ["--packing_samples", "--packing_max_tokens", str(cfg.packing_max_tokens)]
    t0 = time.perf_counter()
    train_rm_llama2.main(argv)
    wall = time.perf_counter() - t0
    torch.set_num_threads(cfg.threads)  # in case anything changed it

    logged = [r for r in read_metrics(log_dir) if "tokens_per_s" in r]
    if [r["step"] for r in logged] != list(range(1, cfg.steps + 1)):
        raise RuntimeError(f"{name}: expected one metrics row per step 1..{cfg.steps}, got steps {[r['step'] for r in logged]}")
    # real tokens of each step: the trainer's own batch order over the same tokenized pairs
    step_real = replay_step_tokens(cfg, pairs)
    # processed (with padding) / real is the ratio of the two logged rates over the same interval
    step_processed = [round(n * r["processed_tokens_per_s"] / r["tokens_per_s"]) for n, r in zip(step_real, logged)]
    step_ends = [r["time"] for r in logged]
    # cross-check the replayed token counts against the logged rates (time column: ms resolution)
    w = cfg.warmup_steps
    logged_real = sum(r["tokens_per_s"] * (b["time"] - a["time"]) for a, b, r in zip(logged[w - 1:], logged[w:], logged[w:]))
    mismatch = abs(logged_real / sum(step_real[w:]) - 1)
    if mismatch > 0.02:
        raise RuntimeError(f"{name}: replayed real tokens differ from logged tokens_per_s x step time by {mismatch:.1%}; "
                           "train_rm_llama2's batch order changed? update run_ours")
    last = logged[-1]
    return timed_summary(name, step_ends, step_real, step_processed, w, {
        "wall_seconds_incl_setup": round(wall, 2), "final_loss": round(last["loss"], 4), "final_acc": round(last["acc"], 4),
        "logged_vs_replayed_tokens": round(mismatch, 5),
    })


def run_trl(cfg: RMThroughputConfig, model_dir: Path, rows: list[dict], pairs, workdir: Path) -> dict:
    import datasets
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    # TRL's conversational preference format; the prompt turns are the same on both sides
    ds = datasets.Dataset.from_list([
        {"chosen": r["message"] + [{"role": "assistant", "content": r["chosen"]}],
         "rejected": r["message"] + [{"role": "assistant", "content": r["rejected"]}]}
        for r in rows
    ])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    args = RewardConfig(
        output_dir=str(workdir / "trl"), max_steps=cfg.steps, num_train_epochs=1,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.train_batch_size // cfg.micro_batch_size,
        learning_rate=cfg.learning_rate, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=math.ceil(0.03 * cfg.steps),  # = ours
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,  # = ours
        bf16=False, fp16=False, gradient_checkpointing=False,  # TRL defaults are bf16 + checkpointing
        use_cpu=True, dataloader_num_workers=0, max_length=cfg.max_len,
        center_rewards_coefficient=None, report_to="none", eval_strategy="no", save_strategy="no",
        logging_steps=1, seed=cfg.seed, disable_tqdm=True,
        # accelerate's seedable sampler draws randperm(n) from data_seed + epoch, and our EpochSampler from
        # seed * 100003 + epoch: the same global batches and micro-batches as ours (checked below)
        data_seed=cfg.seed * 100_003,
    )

    class Counting(RewardTrainer):
        """Counts the real (attention-mask) and processed (padded) tokens of every trained micro-batch."""

        real = processed = 0

        def compute_loss(self, model, inputs, *a, **k):
            if model.training:
                self.real += int(inputs["attention_mask"].sum())
                self.processed += inputs["input_ids"].numel()
            return super().compute_loss(model, inputs, *a, **k)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.real, self.processed, self.logs = [], [], [], []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.real.append(trainer.real - sum(self.real))
            self.processed.append(trainer.processed - sum(self.processed))

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    clock = StepClock()
    trainer = Counting(model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # clock.logs keeps the logs
    # TRL's tokenization vs ours, row by row (TRL drops rows over max_length instead of truncating)
    kept = trainer.train_dataset
    if len(kept) != len(pairs):
        raise RuntimeError(f"TRL kept {len(kept)} of {len(pairs)} rows (it drops rows longer than max_length)")
    diff_rows = sum(a != p.chosen or b != p.rejected for a, b, p in zip(kept["chosen_ids"], kept["rejected_ids"], pairs))
    diff_tokens = sum(len(a) + len(b) for a, b in zip(kept["chosen_ids"], kept["rejected_ids"])) - sum(p.num_tokens for p in pairs)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    torch.set_num_threads(cfg.threads)
    if len(clock.ends) != cfg.steps:
        raise RuntimeError(f"TRL ran {len(clock.ends)} optimizer steps, expected {cfg.steps}")
    last = [l for l in clock.logs if "loss" in l][-1]
    return timed_summary("trl", clock.ends, clock.real, clock.processed, cfg.warmup_steps, {
        "wall_seconds_train": round(wall, 2), "final_loss": round(last["loss"], 4),
        "final_acc": round(last.get("accuracy", float("nan")), 4),
        "same_batches_as_ours": clock.real == replay_step_tokens(cfg, pairs),
        "tokenization_vs_ours": {"rows_differing": int(diff_rows), "total_token_difference": int(diff_tokens)},
        "trl_args": {"optim": args.optim, "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                     "gradient_accumulation_steps": args.gradient_accumulation_steps,
                     "per_device_train_batch_size": args.per_device_train_batch_size},
        "trl": trl.__version__,
    })


def combine_repeats(runs: list[dict]) -> dict:
    """One row per run: every step's fastest time over the repeats, summed.

    The repeats train the same batches in the same order from the same weights, so step k is the
    same work each time; on a shared machine a busy spell can slow one step several-fold (OpenMP
    threads wait for a descheduled peer), and the per-step minimum drops it. All repeats stay in the row.
    """
    first = runs[0]
    if any(r["real_tokens"] != first["real_tokens"] or r["processed_tokens"] != first["processed_tokens"] for r in runs):
        raise RuntimeError(f"{first['run']}: repeats trained different tokens; they must repeat the same work")
    step_seconds = [min(s) for s in zip(*(r["step_seconds"] for r in runs))]
    seconds = sum(step_seconds)
    return first | {
        "seconds": round(seconds, 3), "real_tokens_per_s": round(first["real_tokens"] / seconds, 1),
        "step_seconds": [round(x, 3) for x in step_seconds],
        "repeat_seconds": [r["seconds"] for r in runs],
        "repeat_real_tokens_per_s": [r["real_tokens_per_s"] for r in runs],
        "repeat_step_seconds": [r["step_seconds"] for r in runs],
    }


# ---------------------------------------------------------------------------------------- main


def main(argv=None):
    cfg = parse_config(RMThroughputConfig, argv)
    if "trl" in cfg.runs and importlib.util.find_spec("trl") is None:
        print(f"trl is not installed (it is not a dependency of this project). Install it with:\n    {TRL_INSTALL}\n"
              "or leave it out: --runs padded,packed", file=sys.stderr)
        sys.exit(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    import transformers
    from transformers import AutoConfig, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the expected "score.weight MISSING" load reports, x6

    from models.tiny import TinyModelConfig, build_tiny_model

    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="bench_rm_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if cfg.pretrain:
        model_dir = Path(cfg.pretrain)
    else:
        model_dir = build_tiny_model(workdir / "tiny", TinyModelConfig(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=max(2048, cfg.max_len), seed=cfg.seed,
        ))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = write_jsonl(workdir / "prefs.jsonl", preference_rows(cfg, tokenizer))
    rows, pairs = our_pairs(data, tokenizer, cfg)
    if any(p.truncated for p in pairs):
        raise RuntimeError("some pairs exceed max_len; the generator must keep every sample within it")
    lengths = np.array([len(s) for p in pairs for s in (p.chosen, p.rejected)])
    responses = np.array([len(p.chosen) - p.chosen_prompt_len for p in pairs] + [len(p.rejected) - p.rejected_prompt_len for p in pairs])
    mcfg = AutoConfig.from_pretrained(model_dir)
    print(f"[data] {len(pairs)} pairs; sample tokens median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, "
          f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}; response median {np.median(responses):.0f}")

    attempts: dict[str, list[dict]] = {name: [] for name in cfg.runs}
    for rep in range(cfg.repeats):  # round-robin, so a busy spell of the machine hits every run alike
        for name in cfg.runs:
            print(f"\n=== {name} (repeat {rep + 1} of {cfg.repeats}) ===", flush=True)
            if name == "trl":
                attempts[name].append(run_trl(cfg, model_dir, rows, pairs, workdir))
            else:
                attempts[name].append(run_ours(cfg, model_dir, data, pairs, name == "packed", workdir))
            r = attempts[name][-1]
            print(f"[{name}] {r['seconds']:.2f} s for {r['timed_steps']} timed steps, {r['real_tokens_per_s']:,.0f} real tokens/s", flush=True)
    results = [combine_repeats(runs) for runs in attempts.values()]
    by = {r["run"]: r for r in results}

    def ratio(a, b):
        return round(by[a]["real_tokens_per_s"] / by[b]["real_tokens_per_s"], 3) if a in by and b in by else None

    summary = {
        "packed_over_trl": ratio("packed", "trl"),
        "packed_over_padded": ratio("packed", "padded"),
        "padded_over_trl": ratio("padded", "trl"),
        "target_packed_over_trl": 1.5,
        "timing": (f"end-of-optimizer-step timestamps; the first {cfg.warmup_steps} step(s) excluded for every run; "
                   f"{cfg.repeats} repeats round-robin, each step's fastest repeat counts (same batches every repeat); "
                   "real tokens = non-pad prompt+response tokens of both sides in the timed steps"),
        "config": asdict(cfg) | {"pretrain": cfg.pretrain or "tiny (built fresh)", "workdir": str(workdir)},
        "model": {k: getattr(mcfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "data": {"pairs": len(pairs), "sample_tokens_median": float(np.median(lengths)),
                 "sample_tokens_mean": round(float(lengths.mean()), 1),
                 "sample_tokens_p90": float(np.percentile(lengths, 90)), "sample_tokens_max": int(lengths.max()),
                 "response_tokens_median": float(np.median(responses))},
        "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": by["trl"]["trl"] if "trl" in by else None, "threads": torch.get_num_threads(),
        "runs": results,
    }
    print_table(results, by.get("trl"))
    for k in ("packed_over_trl", "packed_over_padded", "padded_over_trl"):
        if summary[k] is not None:
            print(f"{k}: {summary[k]:.2f}x" + ("   (target >= 1.5)" if k == "packed_over_trl" else ""))
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return summary


def print_table(results: list[dict], trl_row: dict | None) -> None:
    print(f"\n| {'run':<7} | {'steps':>11} | {'seconds':>8} | {'real tokens':>11} | {'real tokens/s':>13} "
          f"| {'processed/real':>14} | {'vs TRL':>6} |")
    print(f"|{'-' * 9}|{'-' * 12}:|{'-' * 9}:|{'-' * 12}:|{'-' * 14}:|{'-' * 15}:|{'-' * 7}:|")
    for r in results:
        vs = f"{r['real_tokens_per_s'] / trl_row['real_tokens_per_s']:.2f}x" if trl_row else "-"
        steps = f"{r['timed_steps']} of {r['steps']}"
        print(f"| {r['run']:<7} | {steps:>11} | {r['seconds']:>8.2f} | {r['real_tokens']:>11,} | "
              f"{r['real_tokens_per_s']:>13,.0f} | {r['processed_over_real']:>14.3f} | {vs:>6} |")
    print()


if __name__ == "__main__":
    from training.cli import run_cli

    run_cli(main)
