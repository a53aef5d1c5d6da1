"""RL against TRL: seconds per iteration and held-out reward of our RLOO / ReMax and TRL's RLOO.

Everything is shared but the trainer: the policy (``--pretrain``), one reward model, the training
prompts of each iteration (the same prompts in the same order: our driver's seeded
``rl.prompt_data.PromptSchedule``, given to TRL as an unshuffled dataset), samples per prompt,
response length, temperature, learning rate and schedule (AdamW betas 0.9 / 0.95, no warm-up,
cosine to 0.1 x), gradient clipping, the KL coefficient (k1, subtracted from the reward as
TRL's RLOO does), no reward clipping, no advantage whitening, fp32, and N iterations:

* one iteration = one batch of ``rollout_batch_size`` prompts x ``n_samples_per_prompt`` samples,
  then exactly one optimizer step on all of them. Ours: ``fsdp_ppo_ray.py --train_batch_size`` =
  the rollout's samples, ``--max_epochs 1``. TRL: ``RLOOTrainer`` with ``per_device_train_batch_size``
  = the same samples, ``gradient_accumulation_steps 1`` (so ``steps_per_generation`` 1: one
  ``generate`` per optimizer step), ``num_iterations 1``, ``max_steps`` N; one TRL ``global_step``
  is one of our iterations.
* ours: ``fsdp_ppo_ray.py`` in its own process (its own local Ray: actor, reference, reward
  worker, one vLLM CPU engine); per iteration ``time_iteration`` from its ``metrics.jsonl``.
  TRL: ``RLOOTrainer`` in its own process, rollouts with ``transformers`` ``generate`` (TRL's
  default without vLLM), reward = ``RewardScorer`` below, per iteration the time between
  consecutive ``on_step_end`` callbacks (the first from ``on_train_begin``).
* the reward model is one folder scored by one function, ``RewardScorer.score_ids``: our
  ``models.value_model.RewardModel`` over packed rows, each response ended as our RewardWorker
  ends it (``rl.trainer.reward_inputs``: up to its first EOS, EOS appended to a cut one) and read
  at its last token by length (``rl.workers.score_sequences``), never by HF's last-non-pad rule,
  which is wrong where pad == eos (SmolLM2). TRL calls the scorer as a reward function.
* held-out reward: ``heldout_rewards``, one function for every policy: one vLLM engine, greedy
  responses to the first ``max_eval_prompts`` held-out prompts, each policy's saved weights loaded
  into it in turn, scored by the same ``RewardScorer``.

Seconds: iteration 1 is warm-up (reported apart); s/iteration = median (and mean) of iterations
2..N. Startup = process start to the start of iteration 1 (imports, models, Ray and the vLLM
engine for ours; model, reference and trainer for TRL); the rest of the process's wall time
(saving the policy, shutdown) is reported as ``teardown_seconds``.

The reward model, when ``--reward_pretrain`` has none yet, is trained here with our
``train_rm_llama2.py`` (one process) from the policy on pairs built from ``data/sft_chat.jsonl``:
chosen = the file's written answer, rejected = the policy's own sampled answer (temperature
``temperature``, ``generate_max_len`` tokens) to the same question; its held-out pair accuracy is
reported.

    python -m benchmarks.rl_vs_trl --config configs/benchmark_rl_vs_trl.yaml
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.remax_vs_ppo import _fmt, env_override, installed_version, machine
from training.config import ConfigError, check_fields, parse_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
RL_SCRIPT = ROOT / "fsdp_ppo_ray.py"
RM_SCRIPT = ROOT / "train_rm_llama2.py"
SYSTEMS = {"ours_rloo": "rloo", "ours_remax": "remax", "trl_rloo": "rloo"}  # name: estimator
TARGET_RATIO = 0.5  # ours / TRL seconds per iteration
RUN_TIMEOUT_S = 3600


@dataclass
class RLvsTRLConfig:
    """Our RLOO / ReMax against TRL's RLOOTrainer: s/iteration and held-out reward, one reward model."""

    pretrain: str = str(ROOT / "out" / "models" / "smollm2")  # the policy (and the reward model's init)
    reward_pretrain: str | None = None  # a reward-model folder; default (or missing): trained into workdir/rm
    prompt_data: str = str(ROOT / "data" / "prompts_train.jsonl")
    eval_prompt_data: str = str(ROOT / "data" / "prompts_heldout.jsonl")
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    iterations: int = 8  # N: rollouts, one optimizer step each
    warmup_iterations: int = 1  # not timed
    rollout_batch_size: int = 4  # prompts per iteration
    n_samples_per_prompt: int = 4
    prompt_max_len: int = 128
    generate_max_len: int = 64
    temperature: float = 1.0
    learning_rate: float = 2e-5
    kl_coef: float = 0.05  # k1, in the reward, both sides (TRL RLOO's default beta)
    max_eval_prompts: int = 32  # held-out prompts for the before / after reward (greedy)
    worker_threads: int = 2  # torch threads of each of our Ray workers and of the vLLM engine
    trl_threads: int = 2  # torch threads of the TRL process
    vllm_cpu_kvcache_space_gb: int = 1
    seed: int = 0
    # the reward model, when it is trained here
    rm_source: str = str(ROOT / "data" / "sft_chat.jsonl")
    rm_train_pairs: int = 96
    rm_eval_pairs: int = 48
    rm_learning_rate: float = 2e-5
    rm_epochs: int = 1
    rm_max_len: int = 256
    workdir: str = str(ROOT / "out" / "bench_rl_trl")
    output: str = str(RESULTS / "rl_vs_trl.json")

    def __post_init__(self):
        check_fields(self)
        if not self.systems or any(s not in SYSTEMS for s in self.systems):
            raise ConfigError(f"--systems: comma-separated from {', '.join(SYSTEMS)}, got {','.join(self.systems)!r}")
        if self.n_samples_per_prompt < 2:
            raise ConfigError("--n_samples_per_prompt must be >= 2 (RLOO's leave-one-out baseline)")
        if not 0 <= self.warmup_iterations < self.iterations - 1:
            raise ConfigError("--iterations must exceed --warmup_iterations + 1 (at least two timed iterations)")
        if min(self.rollout_batch_size, self.max_eval_prompts, self.rm_train_pairs, self.rm_eval_pairs) < 1:
            raise ConfigError("--rollout_batch_size, --max_eval_prompts, --rm_train_pairs and --rm_eval_pairs must be >= 1")

    @property
    def samples_per_iteration(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def rm_dir(self) -> Path:
        return Path(self.reward_pretrain) if self.reward_pretrain else Path(self.workdir) / "rm"


# ---------------------------------------------------------------------------------------- the shared reward


class RewardScorer:
    """One reward model's scores, as our RewardWorker computes them; also TRL's reward function
    (``__call__`` has ``reward_funcs``' signature: prompts as chat turns, ``completion_ids``)."""

    __name__ = "reward_model"  # TRL's name for the reward in its logs

    def __init__(self, rm_dir: str | Path, token_budget: int = 4096):
        from transformers import AutoTokenizer

        from models.value_model import RewardModel

        self.tokenizer = AutoTokenizer.from_pretrained(rm_dir)
        self.model = RewardModel.from_pretrained(str(rm_dir)).eval()
        self.token_budget = token_budget

    def score_ids(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        from models.packing import balanced_micro_batches
        from rl.rollout import Rollout
        from rl.trainer import reward_inputs
        from rl.workers import score_sequences

        rollouts = [Rollout(list(p), list(r), None, "stop") for p, r in zip(prompt_ids, response_ids, strict=True)]
        batch, _ = reward_inputs(rollouts, self.tokenizer.eos_token_id)
        plan = balanced_micro_batches(batch.lengths, max(self.token_budget, max(batch.lengths)), 1)[0]
        scores = score_sequences(self.model, batch, plan, "cpu")
        return [scores[i] for i in range(len(batch))]

    def __call__(self, prompts, completions=None, completion_ids=None, **_) -> list[float]:
        from rlhf_data.tokenize import render_prompt_ids

        return self.score_ids([render_prompt_ids(self.tokenizer, p) for p in prompts], completion_ids)


# ---------------------------------------------------------------------------------------- prompts


def prompt_rows(path: str) -> list[list[dict]]:
    """The chat turns of a prompt file, in file order (what our driver reads)."""
    from rlhf_data import validate_prompt
    from rlhf_data.mixing import train_eval_rows

    rows, _, _ = train_eval_rows(path, None, validate_prompt)
    return [r["message"] for r in rows]


def iteration_prompts(cfg: RLvsTRLConfig, messages: list[list[dict]]) -> list[list[list[dict]]]:
    """Per iteration the prompts our driver samples (``PromptSchedule`` with its seed, one episode)."""
    from rl.prompt_data import PromptSchedule

    schedule = PromptSchedule(len(messages), cfg.rollout_batch_size, 1, cfg.seed)
    if schedule.total < cfg.iterations:
        raise ConfigError(f"{len(messages)} prompts give {schedule.total} iterations of {cfg.rollout_batch_size}; "
                          f"--iterations is {cfg.iterations}")
    return [[messages[i] for i in schedule.batch(k)] for k in range(cfg.iterations)]


# ---------------------------------------------------------------------------------------- one vLLM engine


def engine_generate(model_dir: str, prompts: list[list[int]], sampling: dict, engine_kwargs: dict, threads: int,
                    weights: list[str | None]) -> list[list[list[int]]]:
    """In a fresh process: one vLLM engine built from ``model_dir``; per entry of ``weights`` (a
    policy folder whose weights are loaded into the engine first, or None: as built) the response
    ids of every prompt (the first sample of each)."""
    import torch
    from safetensors.torch import load_file

    from rl.rollout import SamplingConfig, make_engine

    torch.set_num_threads(threads)
    engine = make_engine("vllm", model_dir, **engine_kwargs)
    out = []
    for folder in weights:
        if folder is not None:
            state = {}
            for f in sorted(Path(folder).glob("*.safetensors")):
                state |= load_file(str(f))
            engine.update_weights(state)
        groups = engine.generate(prompts, SamplingConfig(**sampling))
        out.append([list(g[0].response_ids) for g in groups])
    engine.shutdown()
    return out


def run_engine(cfg: RLvsTRLConfig, model_dir: Path, prompts: list[list[int]], sampling: dict,
               weights: list[str | None]) -> list[list[list[int]]]:
    engine_kwargs = {"prompt_max_len": cfg.prompt_max_len, "generate_max_len": sampling["max_new_tokens"],
                     "seed": cfg.seed, "cpu_kvcache_space_gb": cfg.vllm_cpu_kvcache_space_gb}
    with env_override(OMP_NUM_THREADS=str(cfg.worker_threads)), \
            ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(engine_generate, str(model_dir), prompts, sampling, engine_kwargs,
                           cfg.worker_threads, weights).result()


def heldout_rewards(cfg: RLvsTRLConfig, policies: dict[str, str | None], scorer: RewardScorer) -> dict:
    """Per policy (name: saved folder, None for ``--pretrain`` itself): the mean reward of its
    greedy responses to the held-out prompts, from one engine and one scorer for all."""
    from rlhf_data.tokenize import render_prompt_ids

    messages = prompt_rows(cfg.eval_prompt_data)[: cfg.max_eval_prompts]
    prompts = [render_prompt_ids(scorer.tokenizer, m) for m in messages]
    sampling = {"temperature": 0.0, "max_new_tokens": cfg.generate_max_len, "n": 1}
    t0 = time.perf_counter()
    responses = run_engine(cfg, Path(cfg.pretrain), prompts, sampling, list(policies.values()))
    out = {}
    eos = scorer.tokenizer.eos_token_id
    for name, resp in zip(policies, responses, strict=True):
        scores = scorer.score_ids(prompts, resp)
        out[name] = {"reward_mean": round(statistics.fmean(scores), 4),
                     "response_length": round(statistics.fmean(len(r) for r in resp), 1),
                     "cut_fraction": round(sum(eos not in r for r in resp) / len(resp), 3),
                     "example": scorer.tokenizer.decode(resp[0], skip_special_tokens=True)}
    print(f"[eval] {len(policies)} policies x {len(prompts)} held-out prompts in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return out


# ---------------------------------------------------------------------------------------- the reward model


def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """A command in its own process group (``pipeline.processes``), output to ``log``; its wall seconds."""
    from pipeline.processes import ProgressView, log_tail, run_command

    print(f"$ {' '.join(command)}", flush=True)
    t0 = time.perf_counter()
    code = run_command(command, log, ProgressView(), ROOT, env=env)
    if code != 0:
        raise RuntimeError(f"exit status {code}; last lines of {log}:\n" + "\n".join(log_tail(log, 40)))
    return time.perf_counter() - t0


def preference_pairs(cfg: RLvsTRLConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) pairs from ``rm_source``: the written answer over the policy's own sampled one."""
    from transformers import AutoTokenizer

    from rlhf_data.tokenize import render_prompt_ids

    rows = [json.loads(line)["messages"] for line in Path(cfg.rm_source).read_text().splitlines() if line.strip()]
    n = cfg.rm_train_pairs + cfg.rm_eval_pairs
    if len(rows) < n:
        raise ConfigError(f"{cfg.rm_source} has {len(rows)} conversations; {n} pairs were asked for")
    rows = rows[:n]
    tokenizer = AutoTokenizer.from_pretrained(cfg.pretrain)
    prompts = [render_prompt_ids(tokenizer, r[:-1]) for r in rows]
    sampling = {"temperature": cfg.temperature, "max_new_tokens": cfg.generate_max_len, "seed": cfg.seed + 1, "n": 1}
    [responses] = run_engine(cfg, Path(cfg.pretrain), prompts, sampling, [None])
    pairs = []
    for r, resp in zip(rows, responses):
        rejected = tokenizer.decode(resp, skip_special_tokens=True).strip()
        if rejected and rejected != r[-1]["content"]:
            pairs.append({"message": r[:-1], "chose": r[-1]["content"], "reject": rejected})
    return pairs[: cfg.rm_train_pairs], pairs[cfg.rm_train_pairs:]


def rm_accuracy(rm_logs: Path) -> dict | None:
    from training.metrics_logger import read_metrics

    if not (rm_logs / "metrics.jsonl").exists():
        return None
    evals = [r for r in read_metrics(rm_logs) if "eval_acc" in r]
    return {k: evals[-1][k] for k in ("eval_acc", "eval_loss", "step")} if evals else None


def build_reward_model(cfg: RLvsTRLConfig) -> dict:
    """The reward model's folder and held-out accuracy; trained here when the folder has none."""
    rm, logs = cfg.rm_dir, cfg.rm_dir.parent / f"{cfg.rm_dir.name}_logs"
    info = {"path": str(rm), "trained_here": False}
    if not (rm / "config.json").exists():
        train, evals = preference_pairs(cfg)
        data = rm.parent / f"{rm.name}_pairs"
        data.mkdir(parents=True, exist_ok=True)
        for name, pairs in (("train", train), ("eval", evals)):
            (data / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        seconds = run_logged([
            sys.executable, str(RM_SCRIPT), "--pretrain", cfg.pretrain, "--dataset", str(data / "train.jsonl"),
            "--eval_dataset", str(data / "eval.jsonl"), "--save_path", str(rm), "--logging_path", str(logs),
            "--loss", "sigmoid", "--train_batch_size", "8", "--micro_train_batch_size", "4", "--packing_samples",
            "--max_len", str(cfg.rm_max_len), "--max_epochs", str(cfg.rm_epochs),
            "--learning_rate", str(cfg.rm_learning_rate), "--lr_warmup_ratio", "0", "--seed", str(cfg.seed),
        ], logs / "stdout.log", env={"OMP_NUM_THREADS": str(cfg.worker_threads)})
        info |= {"trained_here": True, "train_seconds": round(seconds, 1), "train_pairs": len(train),
                 "eval_pairs": len(evals), "pairs": str(data),
                 "data": f"chosen: the written answer of {Path(cfg.rm_source).name}; rejected: the policy's own "
                         f"sampled answer (T={cfg.temperature}, <= {cfg.generate_max_len} tokens)"}
    info["heldout"] = rm_accuracy(logs)
    return info


# ---------------------------------------------------------------------------------------- our runs


def ours_flags(cfg: RLvsTRLConfig, estimator: str, rm: Path, run_dir: Path) -> list[str]:
    flags = {
        "pretrain": cfg.pretrain, "reward_pretrain": rm, "prompt_data": cfg.prompt_data,
        "save_path": run_dir / "policy", "logging_path": run_dir / "log",
        "advantage_estimator": estimator, "policy_loss": "auto", "init_kl_coef": cfg.kl_coef, "kl_estimator": "k1",
        "reward_clip": 0, "actor_learning_rate": cfg.learning_rate, "lr_warmup_ratio": 0.0, "max_norm": 1.0,
        "rollout_batch_size": cfg.rollout_batch_size, "n_samples_per_prompt": cfg.n_samples_per_prompt,
        "micro_rollout_batch_size": cfg.samples_per_iteration, "train_batch_size": cfg.samples_per_iteration,
        "actor_train_batch_size": cfg.samples_per_iteration, "max_epochs": 1, "num_episodes": 1,
        "max_iterations": cfg.iterations, "prompt_max_len": cfg.prompt_max_len,
        "generate_max_len": cfg.generate_max_len, "temperature": cfg.temperature, "eval_split": 0.0,
        "actor_num_gpus_per_node": 1, "ref_num_gpus_per_node": 1, "reward_num_gpus_per_node": 1,
        "vllm_num_engines": 1, "rollout_backend": "vllm", "worker_threads": cfg.worker_threads,
        "vllm_cpu_kvcache_space_gb": cfg.vllm_cpu_kvcache_space_gb, "seed": cfg.seed,
        # one epoch on one mini-batch: TRL (num_iterations 1) takes the old log-probs as the current
        # ones detached, with no extra forward; ours the engine's, equal in fp32 up to the sync gap
        "old_logprobs": "sampler",
    }
    # no evaluation prompts: the held-out reward is measured by heldout_rewards for every system
    return [f"--{k}={v}" for k, v in flags.items()] + ["--packing_samples", "--no-bf16", "--no-gradient_checkpointing"]


def run_ours(cfg: RLvsTRLConfig, name: str, rm: Path, run_dir: Path) -> dict:
    from training.metrics_logger import read_metrics

    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(cfg.worker_threads)}
    launched = time.time()
    wall = run_logged([sys.executable, str(RL_SCRIPT), *ours_flags(cfg, SYSTEMS[name], rm, run_dir)],
                      run_dir / "stdout.log", env=env)
    rows = read_metrics(run_dir / "log")
    steps = [r for r in rows if r["step"] > 0]
    if [r["step"] for r in steps] != list(range(1, cfg.iterations + 1)):
        raise RuntimeError(f"{name}: expected metrics rows 1..{cfg.iterations}, got {[r['step'] for r in steps]}")
    start = next(r["time"] for r in rows if r["step"] == 0)  # logged right before iteration 1 starts
    return {"iteration_seconds": [r["time_iteration"] for r in steps], "startup_seconds": start - launched,
            "wall_seconds": wall, "reward_curve": [r["reward_mean"] for r in steps],
            "kl_curve": [r.get("kl") for r in steps], "response_length_curve": [r.get("response_length") for r in steps],
            "policy": str(run_dir / "policy"), "log": str(run_dir / "stdout.log")}


# ---------------------------------------------------------------------------------------- TRL


def trl_args(cfg: RLvsTRLConfig, out_dir: Path) -> dict:
    """``RLOOConfig`` keyword arguments: our settings in TRL's names (see the module docstring)."""
    return dict(
        output_dir=str(out_dir), per_device_train_batch_size=cfg.samples_per_iteration,
        gradient_accumulation_steps=1, num_generations=cfg.n_samples_per_prompt, num_iterations=1,
        max_steps=cfg.iterations, max_completion_length=cfg.generate_max_len, temperature=cfg.temperature,
        top_p=1.0, top_k=0, learning_rate=cfg.learning_rate, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
        weight_decay=0.0, max_grad_norm=1.0, beta=cfg.kl_coef, epsilon=0.2, normalize_advantages=False,
        shuffle_dataset=False, seed=cfg.seed, use_cpu=True, bf16=False, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"}, disable_tqdm=True,
    )


def trl_child(spec_path: str) -> None:
    """The TRL run, in its own process (``run_trl``): train, save the policy, write the timings."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    spec = json.loads(Path(spec_path).read_text())
    cfg = RLvsTRLConfig(**spec["config"])
    torch.set_num_threads(cfg.trl_threads)
    out_dir = Path(spec["out_dir"])
    prompts = [m for batch in iteration_prompts(cfg, prompt_rows(cfg.prompt_data)) for m in batch]
    marks: dict[str, list[float]] = {"begin": [], "step_end": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks["begin"].append(time.time())

        def on_step_end(self, *_, **__):
            marks["step_end"].append(time.time())

    trainer = RLOOTrainer(model=cfg.pretrain, reward_funcs=RewardScorer(cfg.rm_dir), args=RLOOConfig(**trl_args(cfg, out_dir)),
                          train_dataset=Dataset.from_list([{"prompt": m} for m in prompts]), callbacks=[Clock()])
    trainer.train()
    trainer.save_model(str(out_dir / "policy"))
    logs = [r for r in trainer.state.log_history if "reward" in r]
    (out_dir / "timings.json").write_text(json.dumps({
        "begin": marks["begin"][0], "step_end": marks["step_end"], "log_history": logs,
        "generation_config": trainer.generation_config.to_dict(), "torch_threads": torch.get_num_threads()}))


def run_trl(cfg: RLvsTRLConfig, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / "spec.json"
    spec.write_text(json.dumps({"config": asdict(cfg) | {"reward_pretrain": str(cfg.rm_dir)}, "out_dir": str(run_dir)}))
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(cfg.trl_threads)}
    launched = time.time()
    wall = run_logged([sys.executable, "-c", "import sys; from benchmarks.rl_vs_trl import trl_child; trl_child(sys.argv[1])",
                       str(spec)], run_dir / "stdout.log", env=env)
    t = json.loads((run_dir / "timings.json").read_text())
    ends = t["step_end"]
    if len(ends) != cfg.iterations:
        raise RuntimeError(f"trl: expected {cfg.iterations} optimizer steps, got {len(ends)}")
    logs = t["log_history"]
    return {"iteration_seconds": [b - a for a, b in zip([t["begin"], *ends[:-1]], ends)],
            "startup_seconds": t["begin"] - launched, "wall_seconds": wall,
            "reward_curve": [r["reward"] for r in logs], "kl_curve": [r.get("kl") for r in logs],
            "response_length_curve": [r.get("completions/mean_length") for r in logs],
            "policy": str(run_dir / "policy"), "log": str(run_dir / "stdout.log"),
            "generation": {k: t["generation_config"].get(k) for k in ("do_sample", "temperature", "top_k", "top_p",
                                                                      "max_new_tokens", "eos_token_id")},
            "torch_threads": t["torch_threads"]}


# ---------------------------------------------------------------------------------------- report


def summarize(run: dict, warmup: int) -> dict:
    """Seconds per iteration (median, mean) after the warm-up ones, and the fixed costs."""
    its = run["iteration_seconds"]
    timed = its[warmup:]
    return {"seconds_per_iteration_median": round(statistics.median(timed), 2),
            "seconds_per_iteration_mean": round(statistics.fmean(timed), 2),
            "warmup_seconds": [round(s, 2) for s in its[:warmup]],
            "startup_seconds": round(run["startup_seconds"], 1),
            "teardown_seconds": round(run["wall_seconds"] - run["startup_seconds"] - sum(its), 1),
            "wall_seconds": round(run["wall_seconds"], 1),
            "iteration_seconds": [round(s, 2) for s in its]}


def ratios(by: dict) -> dict:
    if "trl_rloo" not in by:
        return {}
    trl = by["trl_rloo"]["seconds_per_iteration_median"]
    return {f"{name}_over_trl_rloo": round(r["seconds_per_iteration_median"] / trl, 3)
            for name, r in by.items() if name != "trl_rloo"}


def print_table(by: dict, heldout: dict, got: dict) -> None:
    print("\n| system | s/iteration (median) | mean | warm-up (it. 1) | startup s | vs TRL | held-out reward before -> after "
          "| train reward first -> last |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for name, r in by.items():
        ratio = got.get(f"{name}_over_trl_rloo", 1.0 if name == "trl_rloo" else None)
        curve = r["reward_curve"]
        print(f"| {name} | {r['seconds_per_iteration_median']:.2f} | {r['seconds_per_iteration_mean']:.2f} | "
              f"{r['warmup_seconds'][0] if r['warmup_seconds'] else '-'} | {r['startup_seconds']:.0f} | "
              f"{_fmt(ratio, '.3f')}x | {heldout['pretrain']['reward_mean']:.3f} -> {heldout[name]['reward_mean']:.3f} "
              f"| {curve[0]:.3f} -> {curve[-1]:.3f} |")
    if "ours_rloo_over_trl_rloo" in got:
        v = got["ours_rloo_over_trl_rloo"]
        print(f"\nours_rloo / trl_rloo s/iteration: {v:.3f} (target <= {TARGET_RATIO}: {'holds' if v <= TARGET_RATIO else 'MISSED'})")


# ---------------------------------------------------------------------------------------- main


def main(argv=None):
    cfg = parse_config(RLvsTRLConfig, argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rm = build_reward_model(cfg)
    acc = rm["heldout"]
    print(f"[rm] {rm['path']}: held-out pair accuracy {_fmt(acc and acc['eval_acc'], '.3f')}", flush=True)

    runs = {}
    for name in cfg.systems:  # each a fresh folder: a rerun never mixes in an old run's metrics
        run_dir = workdir / "runs" / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
        runs[name] = run_trl(cfg, run_dir) if name.startswith("trl") else run_ours(cfg, name, cfg.rm_dir, run_dir)
        s = summarize(runs[name], cfg.warmup_iterations)
        print(f"[{name}] {s['seconds_per_iteration_median']:.2f} s/iteration (median of {cfg.iterations - cfg.warmup_iterations}), "
              f"startup {s['startup_seconds']:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)

    scorer = RewardScorer(cfg.rm_dir)
    heldout = heldout_rewards(cfg, {"pretrain": None} | {n: r["policy"] for n, r in runs.items()}, scorer)
    by = {n: summarize(r, cfg.warmup_iterations) | {k: r[k] for k in r if k.endswith("_curve")}
          | {"heldout_before": heldout["pretrain"], "heldout_after": heldout[n]}
          | {k: r[k] for k in ("generation", "torch_threads", "log") if k in r} for n, r in runs.items()}
    got = ratios(by)
    summary = {
        "ratios_seconds_per_iteration": got,
        "target": {"ours_rloo_over_trl_rloo": TARGET_RATIO,
                   "holds": got.get("ours_rloo_over_trl_rloo", float("inf")) <= TARGET_RATIO if got else None},
        "systems": by,
        "heldout": heldout,
        "reward_model": rm,
        "settings": {
            "policy": cfg.pretrain, "prompts_per_iteration": cfg.rollout_batch_size,
            "samples_per_prompt": cfg.n_samples_per_prompt, "max_new_tokens": cfg.generate_max_len,
            "temperature": cfg.temperature, "learning_rate": cfg.learning_rate, "kl_coef": cfg.kl_coef,
            "iterations": cfg.iterations, "timed_iterations": f"{cfg.warmup_iterations + 1}..{cfg.iterations}",
            "heldout_prompts": cfg.max_eval_prompts, "heldout_decoding": "greedy, one vLLM engine for every policy",
            "ours": ours_flags(cfg, "ESTIMATOR", Path("RM"), Path("RUN")),
            "trl": {k: v for k, v in trl_args(cfg, Path("RUN")).items() if k != "output_dir"},
        },
        "step_mapping": ("one iteration = rollout_batch_size prompts x n_samples_per_prompt samples, then one "
                         "optimizer step on all of them; TRL: per_device_train_batch_size = those samples, "
                         "gradient_accumulation_steps 1, num_iterations 1, so one global_step = one iteration"),
        "timing": ("s/iteration = median (and mean) over iterations after the warm-up; ours: time_iteration of "
                   "fsdp_ppo_ray.py's metrics; TRL: time between consecutive on_step_end callbacks (the first "
                   "from on_train_begin); startup = process start to iteration 1; teardown = the rest (saving, exit)"),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "config": asdict(cfg),
        "machine": machine() | {"trl": installed_version("trl")},
    }
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(by, heldout, got)
    write_result(Path(cfg.output), summary)
    return summary


def write_result(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    load = f"load average {summary['loadavg_start'][0]:.2f} -> {summary['loadavg_end'][0]:.2f}"
    print(f"wrote {path} ({summary['wall_seconds']:.0f} s; {load})")


if __name__ == "__main__":
    from training.cli import run_cli

    run_cli(main)
