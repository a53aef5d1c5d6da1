"""Best-of-n rejection sampling: n responses per prompt, scored by reward models; the best kept.

    python best_of_n.py --config configs/best_of_n_tiny.yaml --pretrain out/sft --reward_pretrain out/rm \
        --prompt_data prompts.jsonl --output out/best_of_n
    python best_of_n.py --pretrain SFT --reward_pretrain RM1,RM2 --reward_weights 0.7,0.3 \
        --prompt_data prompts.jsonl --n_samples_per_prompt 8 --output OUT

Writes to ``--output``: ``sft.jsonl`` (the best response per prompt, for ``train_sft.py``),
``pairs.jsonl`` (best vs worst, for ``train_rm_llama2.py`` / ``train_dpo.py``), ``samples.jsonl``
(every sample with each reward model's score and the total) and ``summary.json`` (mean reward of
all samples vs the kept ones, tokens/s). A rerun of the same command continues a killed run.
The rule and the formats: ``rl.best_of_n``; the page: docs/best_of_n.md.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rl.best_of_n import SUMMARY, BestOfNFiles, RewardScorer, load_prompts, run_best_of_n, summarize
from rl.prompt_data import check_tokenizers_match
from rl.rollout import SamplingConfig, make_engine, require_vllm
from self_ref.generate import load_tokenizer
from training.cli import run_cli
from training.config import ConfigError, check_count, check_fields, parse_config
from training.sharded_model import load_dtype


@dataclass
class BestOfNConfig:
    """Best-of-n rejection sampling: n samples per prompt, scored by reward models, the best kept."""

    pretrain: str = field(default="", metadata={"help": "the policy to sample from (HF causal LM folder)", "path": "model"})
    reward_pretrain: list[str] = field(default_factory=list, metadata={"help": "reward-model folders (they must share the policy's tokenizer)", "path": "model"})
    reward_weights: list[float] = field(default_factory=list, metadata={"help": "weights combining the reward models, one per --reward_pretrain (none: 1 each, their sum)"})
    prompt_data: list[str] = field(default_factory=list, metadata={"help": "prompt files (jsonl/json/parquet/save_to_disk)", "path": "data"})
    input_key: str = field(default="message", metadata={"help": "the prompt field: chat turns ending with a user turn, or a string"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "skip (and report) malformed prompt rows instead of stopping"})
    max_samples: int = field(default=-1, metadata={"help": "use the first N prompts (-1: all)", "check": "-1 or >= 1"})
    output: str = field(default="", metadata={"help": "folder of sft.jsonl, pairs.jsonl, samples.jsonl, summary.json (a rerun resumes)", "path": "output"})
    # sampling
    n_samples_per_prompt: int = field(default=4, metadata={"help": "responses sampled per prompt", "check": ">= 2"})
    max_new_tokens: int = field(default=128, metadata={"help": "max tokens per response", "check": ">= 1"})
    prompt_max_len: int = field(default=1024, metadata={"help": "longer prompts are left-truncated for the policy (and counted)", "check": ">= 1"})
    temperature: float = field(default=1.0, metadata={"check": "> 0"})
    top_p: float = field(default=1.0, metadata={"check": "(0, 1]"})
    seed: int = field(default=42, metadata={"help": "each prompt's sampling seed derives from this and its id", "check": ">= 0"})
    chunk_size: int = field(default=32, metadata={"help": "prompts per engine call; a kill loses at most the chunk in flight", "check": ">= 1"})
    rollout_backend: str = field(default="vllm", metadata={"help": "vllm | hf (transformers generate, when vLLM is absent)", "check": ("vllm", "hf")})
    vllm_gpu_memory_utilization: float = field(default=0.5, metadata={"help": "the engine's share of GPU memory (the reward models share the GPU)", "check": "(0, 1]"})
    bf16: bool = field(default=False, metadata={"help": "bf16 weights for the reward models and the engine (default: fp32 reward models; the engine in bf16 on CUDA, fp32 on CPU)"})
    # scoring
    rm_max_len: int = field(default=2048, metadata={"help": "max tokens of a scored prompt + response (as the RM's --max_len)", "check": ">= 2"})
    rm_batch_tokens: int = field(default=8192, metadata={"help": "tokens per packed reward-model forward", "check": ">= 1"})

    def __post_init__(self):
        check_fields(self)
        if not self.pretrain or not self.reward_pretrain or not self.prompt_data or not self.output:
            raise ConfigError("--pretrain, --reward_pretrain, --prompt_data and --output are required")
        if self.reward_weights:
            check_count("--reward_weights", self.reward_weights, len(self.reward_pretrain), "reward models (--reward_pretrain)")

    def reward_weight_list(self) -> list[float]:
        return list(self.reward_weights) or [1.0] * len(self.reward_pretrain)

    def sample_settings(self) -> dict:
        """What decides the samples and their rewards: a rerun into the same --output must match."""
        keys = ("input_key", "n_samples_per_prompt", "max_new_tokens", "prompt_max_len", "temperature", "top_p",
                "seed", "rollout_backend", "bf16", "rm_max_len")
        return {"pretrain": os.path.abspath(self.pretrain),
                "reward_pretrain": [os.path.abspath(p) for p in self.reward_pretrain],
                "reward_weights": self.reward_weight_list(), **{k: getattr(self, k) for k in keys}}


def main(argv: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    cfg = parse_config(BestOfNConfig, argv)
    if cfg.rollout_backend == "vllm":
        require_vllm()

    # ---- prompts and tokenizers: every mistake stops here, before a model loads
    tokenizer = load_tokenizer(cfg.pretrain)
    check_tokenizers_match(tokenizer, cfg.reward_pretrain, "--reward_pretrain")
    prompts = load_prompts(cfg.prompt_data, cfg.input_key, cfg.skip_bad_rows, cfg.max_samples)
    files = BestOfNFiles(Path(cfg.output))
    files.check_settings(cfg.sample_settings())
    done = {r["id"] for r in files.records()}
    todo = [p for p in prompts if p.id not in done]
    print(f"[best-of-n] {len(prompts)} prompts, {len(prompts) - len(todo)} already in {cfg.output}, "
          f"{len(todo)} to sample ({cfg.n_samples_per_prompt} each) with {cfg.rollout_backend}: {cfg.pretrain}")

    # ---- models, then the loop
    run: dict = {"prompts_this_run": 0}
    files.open()
    try:
        if todo:
            engine_kwargs = {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization} if cfg.rollout_backend == "vllm" else {}
            engine = make_engine(cfg.rollout_backend, cfg.pretrain, prompt_max_len=cfg.prompt_max_len,
                                 generate_max_len=cfg.max_new_tokens, seed=cfg.seed,
                                 dtype="bfloat16" if cfg.bf16 else "auto", **engine_kwargs)
            scorer = RewardScorer(cfg.reward_pretrain, cfg.reward_weight_list(), tokenizer, cfg.rm_max_len,
                                  cfg.rm_batch_tokens, dtype=load_dtype(cfg.bf16, trainable=False))
            sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p,
                                      max_new_tokens=cfg.max_new_tokens, n=cfg.n_samples_per_prompt)
            run = run_best_of_n(engine, scorer, todo, sampling, cfg.seed, cfg.chunk_size, tokenizer, files)
    finally:
        files.close()

    summary = {**summarize(files.records()), **run, "wall_seconds": round(time.perf_counter() - t0, 2),
               "reward_models": cfg.reward_pretrain, "reward_weights": cfg.reward_weight_list(), "policy": cfg.pretrain}
    (Path(cfg.output) / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[best-of-n] mean reward: kept {summary['mean_reward_kept']} vs all {summary['mean_reward_all']} "
          f"(worst {summary['mean_reward_worst']}); generation {run.get('generate_tokens_per_s')} tokens/s, "
          f"scoring {run.get('score_tokens_per_s')} tokens/s; {summary['sft_rows']} SFT rows, {summary['pairs']} pairs")
    print("[best-of-n] " + json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_cli(main)
