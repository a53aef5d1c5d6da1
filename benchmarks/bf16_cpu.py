"""bf16 vs fp32 on this CPU, stage by stage, on SmolLM2-135M-Instruct: speed and equivalence.

One run measures, side by side (fp32 first, then bf16, same inputs):

* ``matmul``:  the 2048 x 576 x 1536 matmul (SmolLM2's MLP up-projection on 2048 tokens), GFLOP/s,
               and its relative error against fp64. It tells at once whether the CPU has native bf16.
* ``vllm``:    the rollout engine (``rl.rollout.VLLMEngine``, so ``serving.vllm_settings``'s CPU settings;
               ``self_ref.generate`` and the judge server use the same) with ``dtype`` float32 and
               bfloat16, each in its own process: start-up, greedy generation of a batch
               (``vllm_prompts`` prompts x ``vllm_new_tokens``, EOS ignored so both engines do the
               same work) and of a single prompt, tokens/s. Equivalence: the share of identical
               greedy outputs and the first divergence position; the bf16 engine's log-probs of the
               fp32 engine's tokens (teacher-forced, ``prompt_logprobs``) against the fp32 engine's.
* ``sync_gap``: the RL "sync log-prob gap": mean |engine log-prob - fp32 trainer log-prob|
               (``rl.rollout.logprob_gap`` against ``models.actor.Actor`` in fp32) on temperature-1
               samples (the fp32 engine's own; the bf16 engine's log-probs of the same tokens,
               teacher-forced) and on each engine's own greedy tokens (decode-time log-probs).
* ``forward``: the RL no-grad workers' passes on one packed micro-batch (``forward_samples`` chat
               conversations of ``models/assets/tiny_chat_corpus.jsonl``): reference log-probs of the
               assistant tokens (``Actor``) and reward scores (``RewardModel``, a seeded fresh head), as
               ``rl.workers`` runs them: FSDP2 in a world of one, fp32, or weights in bf16 with the
               bf16 mixed-precision policy. Seconds (best of ``forward_repeats``), |difference|.
* ``train``:   ``train_steps`` AdamW steps of the reward model (pairwise loss) and of SFT (NLL of the
               assistant tokens) on one packed micro-batch, FSDP2 world of one, fp32 vs the bf16
               mixed-precision policy (fp32 master weights, optimizer states and gradient
               reduction: checked). Seconds per step (best after the first), step-0 loss and
               gradient difference (relative L2, cosine), the loss curves side by side.

Each stage gets a verdict: bf16 is *correct* when its equivalence figures are within the
``tol_*`` tolerances and *faster* when its speed-up is > 1; the recommended CPU default is bf16 only
when both hold. Prints a table and writes ``benchmarks/results/bf16_cpu.json``. Timed runs must not
overlap others on a shared machine:

    flock /tmp/heavy.lock python -m benchmarks.bf16_cpu [--config configs/benchmark_bf16_cpu.yaml] [--stages vllm,forward]
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serving.vllm_settings import cpu_engine_env

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
STAGES = ("matmul", "vllm", "sync_gap", "forward", "train")


@dataclass
class Bf16CpuConfig:
    """bf16 vs fp32 on CPU for every stage (vLLM, no-grad forwards, mixed-precision training)."""

    model: str = str(ROOT / "out" / "models" / "smollm2")  # HF causal LM folder (fp32)
    prompts: str = str(ROOT / "models" / "assets" / "tiny_prompts.jsonl")
    corpus: str = str(ROOT / "models" / "assets" / "tiny_chat_corpus.jsonl")
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    threads: int = 2
    seed: int = 0
    matmul_shape: list[int] = field(default_factory=lambda: [2048, 576, 1536])  # M,K,N
    vllm_prompts: int = 32
    vllm_new_tokens: int = 64
    vllm_single_new_tokens: int = 64
    vllm_sweep: list[int] = field(default_factory=lambda: [2, 4, 8, 16])  # more batch sizes (tokens/s only), to find the crossover
    vllm_sweep_tokens: int = 32
    vllm_threads: int = 0  # 0: vLLM's own choice, as the rollout engines run (1 thread "for serving" on 2 cores)
    vllm_timeout: int = 1800  # seconds per engine process
    forward_samples: int = 16
    forward_repeats: int = 2
    train_pairs: int = 2  # RM: pairs in the micro-batch; SFT: 2 x this many conversations
    train_steps: int = 3
    train_max_len: int = 128  # tokens per training conversation (bf16 steps are slow on CPUs without native bf16)
    learning_rate: float = 1e-5
    max_len: int = 256  # tokens per conversation (forward stage)
    # equivalence tolerances (bf16 keeps 8 significant bits: ~0.4% per rounding, accumulated over 30 layers)
    tol_logprob_mean: float = 0.05  # mean |delta log-prob| (nats) on the same tokens
    tol_score_rel: float = 0.05  # mean |delta reward| / std of the fp32 rewards
    tol_grad_cos: float = 0.99  # cosine of the step-0 gradients
    tol_loss_rel: float = 0.02  # |delta loss| at any step / the fp32 step-0 loss (the curves track)
    output: str = str(RESULTS / "bf16_cpu.json")

    def __post_init__(self):
        from training.config import ConfigError, check_fields

        check_fields(self)  # list fields given in code as "a,b" become lists
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"--stages: unknown {', '.join(bad)}; choose from {', '.join(STAGES)}")
        if len(self.matmul_shape) != 3:
            raise ConfigError(f"--matmul_shape: three sizes M,K,N, got {len(self.matmul_shape)}")


# ---------------------------------------------------------------------------------------- helpers


def machine_info() -> dict:
    import torch

    from models.fsdp import cpu_has_native_bf16

    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": " avx512_bf16" in flags, "amx_bf16": " amx_bf16" in flags,
        "native_bf16": cpu_has_native_bf16(),
        "cores": os.cpu_count(), "torch": torch.__version__, "load_average_start": os.getloadavg(),
    }


def chat_prompts(cfg: Bf16CpuConfig, tokenizer, n: int) -> list[list[int]]:
    from rlhf_data.tokenize import render_prompt_ids

    rows = [json.loads(line) for line in Path(cfg.prompts).read_text().splitlines() if line.strip()]
    if len(rows) < n:
        raise ValueError(f"{cfg.prompts} has {len(rows)} prompts, {n} wanted")
    return [render_prompt_ids(tokenizer, r["message"]) for r in rows[:n]]


def conversations(cfg: Bf16CpuConfig, tokenizer, n: int, swap_answers: bool = False,
                  max_len: int | None = None) -> list[tuple[list[int], list[bool]]]:
    """(ids, assistant-token mask) of the first ``n`` corpus chats; ``swap_answers``: each chat's
    answer replaced by the next chat's (a plausible rejected response to the same prompt)."""
    from rlhf_data.tokenize import tokenize_conversation

    rows = [json.loads(line)["messages"] for line in Path(cfg.corpus).read_text().splitlines() if line.strip()]
    out = []
    for i in range(n):
        msgs = rows[i]
        if swap_answers:
            answer = next(t for t in rows[(i + 1) % len(rows)] if t["role"] == "assistant")["content"]
            msgs = [t for t in msgs if t["role"] != "assistant"][:1] + [{"role": "assistant", "content": answer}]
        tc = tokenize_conversation(tokenizer, msgs, max_len or cfg.max_len)
        out.append((list(tc.input_ids), [bool(m) for m in tc.loss_mask]))
    return out


def packed(seqs: list[tuple[list[int], list[bool]]]):
    import torch

    from models.packing import PackedBatch

    batch = PackedBatch.from_sequences([s for s, _ in seqs])
    mask = torch.tensor([m for _, ms in seqs for m in ms], dtype=torch.bool)[None]
    return batch, mask


def init_world():
    from models.distributed import init_distributed

    return init_distributed()


def shard(model, hf_model, bf16: bool):
    """FSDP2 in a world of one, as the RL workers and trainers run on one rank."""
    import torch

    from models.fsdp import shard_model

    hf_model.config.use_cache = False
    shard_model(model, zero_stage=3, device=torch.device("cpu"), bf16=bf16, hf_model=hf_model)
    return model


def best_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


# ----------------------------------------------------------------------------------------- matmul


def stage_matmul(cfg: Bf16CpuConfig) -> dict:
    import torch

    m, k, n = cfg.matmul_shape
    g = torch.Generator().manual_seed(cfg.seed)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    exact = a.double() @ b.double()
    flops = 2 * m * k * n
    out = {"shape": [m, k, n]}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dt), b.to(dt)
        x @ y  # warm-up
        t0, iters = time.perf_counter(), 0
        while time.perf_counter() - t0 < 1.0:  # products for at least 1 s
            res = x @ y
            iters += 1
        seconds = (time.perf_counter() - t0) / iters
        out[name] = {"gflops": flops / seconds / 1e9, "seconds": seconds,
                     "rel_error_vs_fp64": float((res.double() - exact).norm() / exact.norm())}
    return out


# ------------------------------------------------------------------------------------------- vLLM


def vllm_worker(spec_path: str) -> None:
    """Runs in its own process (vLLM pins threads and keeps state): one engine of ``spec["dtype"]``
    built like the rollout engine; writes what it measured to ``spec["out"]``."""
    spec = json.loads(Path(spec_path).read_text())
    from vllm import SamplingParams

    from rl.rollout import SamplingConfig, VLLMEngine

    prompts, new = spec["prompts"], spec["new_tokens"]
    engine = VLLMEngine(spec["model"], prompt_max_len=spec["prompt_max_len"], generate_max_len=max(new, spec["single_new_tokens"]),
                        dtype=spec["dtype"], seed=0, enable_prefix_caching=False)
    llm = engine.llm
    import torch

    result = {"dtype": spec["dtype"], "start_seconds": engine.stats["start_seconds"], "threads": torch.get_num_threads()}

    def greedy(ps, tokens):
        # EOS ignored: both engines generate exactly the same number of tokens (same work). Not
        # min_tokens: it masks EOS out of the distribution, and the log-probs would then not be
        # full-vocabulary log-probs comparable with the trainer's.
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=0, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        rows = [{"ids": [int(t) for t in o.outputs[0].token_ids],
                 "logprobs": [float(pos[t].logprob) for pos, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
                for o in outs]
        return {"seconds": seconds, "tokens": sum(len(r["ids"]) for r in rows), "rows": rows}

    greedy(prompts[:1], 2)  # warm-up: first-call allocations
    result["batch"] = greedy(prompts, new)
    result["single"] = greedy(prompts[:1], spec["single_new_tokens"])
    result["sweep"] = {}
    for size in spec["sweep"]:  # where the two dtypes cross over: tokens/s by batch size
        r = greedy(prompts[:size], spec["sweep_tokens"])
        result["sweep"][str(size)] = {"seconds": r["seconds"], "tokens": r["tokens"]}
    if spec.get("sample"):
        t0 = time.perf_counter()
        groups = engine.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=new, seed=spec["seed"]))
        result["sampled"] = {"seconds": time.perf_counter() - t0,
                             "rows": [{"prompt": g[0].prompt_ids, "ids": g[0].response_ids,
                                       "logprobs": g[0].response_logprobs} for g in groups]}
    result["scored"] = {}
    for name, seqs in spec.get("score", {}).items():
        # teacher forcing: this engine's log-prob (and rank: 1 = its argmax) of given response tokens
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p + r} for p, r in seqs], params, use_tqdm=False)
        rows = []
        for (p, r), o in zip(seqs, outs):
            plp = o.prompt_logprobs[len(p):]
            rows.append({"logprobs": [float(d[t].logprob) for d, t in zip(plp, r)],
                         "ranks": [int(d[t].rank) for d, t in zip(plp, r)]})
        result["scored"][name] = {"seconds": time.perf_counter() - t0, "rows": rows}
    Path(spec["out"]).write_text(json.dumps(result))
    engine.shutdown()


def run_vllm_engine(cfg: Bf16CpuConfig, workdir: Path, dtype: str, prompts, score=None, sample=False) -> dict:
    spec = {"model": cfg.model, "dtype": dtype, "prompts": prompts, "new_tokens": cfg.vllm_new_tokens,
            "single_new_tokens": cfg.vllm_single_new_tokens, "prompt_max_len": max(map(len, prompts)) + 1,
            "seed": cfg.seed + 1, "sample": sample, "score": score or {}, "out": str(workdir / f"vllm_{dtype}.json"),
            "sweep": list(cfg.vllm_sweep), "sweep_tokens": cfg.vllm_sweep_tokens}
    spec_path = workdir / f"vllm_{dtype}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | cpu_engine_env() | {
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
    }
    if cfg.vllm_threads > 0:  # vLLM keeps OMP_NUM_THREADS threads; 2 threads on 2 busy cores spin-wait badly
        env["OMP_NUM_THREADS"] = str(cfg.vllm_threads)
    log = workdir / f"vllm_{dtype}.log"
    cmd = [sys.executable, "-c", "import sys; from benchmarks.bf16_cpu import vllm_worker; vllm_worker(sys.argv[1])",
           str(spec_path)]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=cfg.vllm_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM {dtype} engine failed ({proc.returncode}); log {log}:\n{log.read_text()[-4000:]}")
    return json.loads(Path(spec["out"]).read_text())


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def greedy_agreement(ref_rows, rows) -> dict:
    divs = [first_divergence(r["ids"], o["ids"]) for r, o in zip(ref_rows, rows)]
    diverged = [d for d in divs if d is not None]
    return {"identical": len(divs) - len(diverged), "of": len(divs),
            "first_divergence": divs, "first_divergence_min": min(diverged) if diverged else None,
            "first_divergence_median": statistics.median(diverged) if diverged else None}


def mean_abs(a, b) -> tuple[float, float]:
    diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return (sum(diffs) / len(diffs), max(diffs)) if diffs else (math.nan, math.nan)


def stage_vllm(cfg: Bf16CpuConfig, workdir: Path, tokenizer, want_gap: bool) -> dict:
    prompts = chat_prompts(cfg, tokenizer, cfg.vllm_prompts)
    fp32 = run_vllm_engine(cfg, workdir, "float32", prompts, sample=want_gap)
    # the fp32 engine's greedy and sampled tokens, scored by the bf16 engine (teacher forcing)
    score = {"greedy": [[p, r["ids"]] for p, r in zip(prompts, fp32["batch"]["rows"])]}
    if want_gap:
        score["sampled"] = [[r["prompt"], r["ids"]] for r in fp32["sampled"]["rows"]]
    bf16 = run_vllm_engine(cfg, workdir, "bfloat16", prompts, score=score)
    out = {"prompt_tokens_mean": statistics.mean(map(len, prompts)), "raw": {"fp32": fp32, "bf16": bf16}}
    for case in ("batch", "single"):
        out[case] = {name: {"tokens_per_s": r[case]["tokens"] / r[case]["seconds"], "seconds": r[case]["seconds"],
                            "tokens": r[case]["tokens"]} for name, r in (("fp32", fp32), ("bf16", bf16))}
        out[case]["agreement"] = greedy_agreement(fp32[case]["rows"], bf16[case]["rows"])
    out["start_seconds"] = {"fp32": fp32["start_seconds"], "bf16": bf16["start_seconds"]}
    out["threads"] = {"fp32": fp32["threads"], "bf16": bf16["threads"]}
    out["sweep"] = {size: {name: r["sweep"][size]["tokens"] / r["sweep"][size]["seconds"]
                           for name, r in (("fp32", fp32), ("bf16", bf16))} for size in fp32["sweep"]}
    tf = bf16["scored"]["greedy"]["rows"]
    lp_mean, lp_max = mean_abs([r["logprobs"] for r in fp32["batch"]["rows"]], [r["logprobs"] for r in tf])
    ranks = [k for r in tf for k in r["ranks"]]
    out["teacher_forced"] = {
        "logprob_abs_diff_mean": lp_mean, "logprob_abs_diff_max": lp_max,
        "bf16_argmax_share": sum(k == 1 for k in ranks) / len(ranks),  # fp32's greedy token is bf16's argmax too
        "scoring_seconds": bf16["scored"]["greedy"]["seconds"],
    }
    return out


def stage_sync_gap(cfg: Bf16CpuConfig, vllm: dict) -> dict:
    """Engine log-probs against the fp32 trainer's on the same tokens (``rl.rollout.logprob_gap``)."""
    import torch

    from models.actor import Actor
    from rl.rollout import Rollout, actor_logprobs, logprob_gap

    fp32, bf16 = vllm["raw"]["fp32"], vllm["raw"]["bf16"]
    actor = Actor.from_pretrained(cfg.model).eval()
    actor.model.config.use_cache = False
    sampled = [Rollout(r["prompt"], r["ids"], r["logprobs"], "") for r in fp32["sampled"]["rows"]]
    t0 = time.perf_counter()
    trainer = actor_logprobs(actor, sampled, temperature=1.0)
    seconds = time.perf_counter() - t0
    bf16_tf = [Rollout(r.prompt_ids, r.response_ids, row["logprobs"], "")
               for r, row in zip(sampled, bf16["scored"]["sampled"]["rows"])]
    prompts = [r["prompt"] for r in fp32["sampled"]["rows"]]
    greedy = {}
    for name, res in (("fp32", fp32), ("bf16", bf16)):
        rolls = [Rollout(p, r["ids"], r["logprobs"], "") for p, r in zip(prompts, res["batch"]["rows"])]
        greedy[name] = logprob_gap(rolls, actor_logprobs(actor, rolls, temperature=1.0))
    del actor

    def outside_clip(rolls, eps=0.2) -> float:
        """Share of tokens whose PPO ratio exp(trainer - engine) already lies outside [1 - eps,
        1 + eps] before any update: their gradient would be clipped for precision alone."""
        d = torch.cat([torch.as_tensor(t) - torch.as_tensor(r.response_logprobs) for r, t in zip(rolls, trainer)])
        return float(((d.exp() < 1 - eps) | (d.exp() > 1 + eps)).float().mean())

    return {
        "sampled_tokens": sum(len(r.response_ids) for r in sampled),
        "sampled": {"fp32": logprob_gap(sampled, trainer), "bf16": logprob_gap(bf16_tf, trainer)},
        "ppo_ratio_outside_clip": {"fp32": outside_clip(sampled), "bf16": outside_clip(bf16_tf)},
        "greedy": greedy,
        "trainer_seconds": seconds,
    }


# ------------------------------------------------------------------------------------ forwards


def stage_forward(cfg: Bf16CpuConfig, tokenizer) -> dict:
    import torch

    from models.actor import Actor
    from models.value_model import RewardModel

    seqs = conversations(cfg, tokenizer, cfg.forward_samples)
    batch, mask = packed(seqs)
    warm_batch, warm_mask = packed(seqs[:2])
    out = {"samples": len(seqs), "tokens": batch.num_tokens, "scored_tokens": int(mask.sum())}

    def variants(load):
        """(fp32 module, bf16 module): the bf16 one loaded with bf16 weights, as the workers load
        frozen models under --bf16 (``model.to(bfloat16)`` would also round RoPE's fp32
        ``inv_freq`` buffer, which loading keeps), and run under the bf16 policy."""
        torch.manual_seed(cfg.seed)
        fp32 = load(torch.float32)
        bf16 = load(torch.bfloat16)
        # a reward model's fresh head is drawn at load time: give both the same one (rounded)
        bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
        return shard(fp32, fp32.model, False).eval(), shard(bf16, bf16.model, True).eval()

    with torch.no_grad():
        res = {}
        for name, mod in zip(("fp32", "bf16"), variants(lambda dt: Actor.from_pretrained(cfg.model, dtype=dt))):
            mod(warm_batch, token_mask=warm_mask)
            seconds, o = best_time(lambda: mod(batch, token_mask=mask).log_probs[mask].float(), cfg.forward_repeats)
            res[name] = (seconds, o)
        diff = (res["bf16"][1] - res["fp32"][1]).abs()
        out["ref_logprobs"] = {"fp32": {"seconds": res["fp32"][0]}, "bf16": {"seconds": res["bf16"][0]},
                               "abs_diff_mean": float(diff.mean()), "abs_diff_max": float(diff.max()),
                               "fp32_logprob_mean": float(res["fp32"][1].mean())}
        res = {}
        for name, mod in zip(("fp32", "bf16"), variants(lambda dt: RewardModel.from_pretrained(cfg.model, dtype=dt))):
            mod(warm_batch)
            seconds, o = best_time(lambda: mod(batch).float(), cfg.forward_repeats)
            res[name] = (seconds, o)
        f, b = res["fp32"][1], res["bf16"][1]
        fl, bl = f.tolist(), b.tolist()
        pairs = [(i, j) for i in range(len(fl)) for j in range(i + 1, len(fl))]
        same_order = sum((fl[i] > fl[j]) == (bl[i] > bl[j]) for i, j in pairs) / max(len(pairs), 1)
        out["rm_scores"] = {"fp32": {"seconds": res["fp32"][0]}, "bf16": {"seconds": res["bf16"][0]},
                            "abs_diff_mean": float((b - f).abs().mean()), "abs_diff_max": float((b - f).abs().max()),
                            "fp32_score_std": float(f.std()),
                            "rel_diff": float((b - f).abs().mean() / f.std()),
                            "pair_order_agreement": same_order}
    return out


# ----------------------------------------------------------------------------------------- train


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def train_run(cfg: Bf16CpuConfig, kind: str, bf16: bool, data, ref_grads=None) -> dict:
    """``train_steps`` AdamW steps on one packed micro-batch; returns losses, step times and (with
    ``ref_grads``) the step-0 gradient comparison, plus what the precision policy kept in fp32."""
    import torch
    import torch.nn.functional as F

    from models.actor import Actor
    from models.value_model import RewardModel
    from training.optim import build_optimizer

    torch.manual_seed(cfg.seed)  # the RM's fresh head: the same draw in both runs
    model = RewardModel.from_pretrained(cfg.model) if kind == "rm" else Actor.from_pretrained(cfg.model)
    shard(model, model.model, bf16).train()
    opt = build_optimizer(model, cfg.learning_rate)
    batch, mask, n_pairs = data
    compute_dtypes = set()
    probe = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    hook = probe.register_forward_pre_hook(lambda m, a: compute_dtypes.add(str(m.weight.dtype)))

    def loss_fn():
        if kind == "rm":
            r = model(batch)
            return -F.logsigmoid(r[:n_pairs] - r[n_pairs:]).mean()
        lp = model(batch, token_mask=mask).log_probs
        return -(lp * mask).sum() / mask.sum()

    losses, seconds, out = [], [], {}
    for step in range(cfg.train_steps):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        if step == 0:
            grads = {n: _local(p.grad).detach().float().clone() for n, p in model.named_parameters()}
            out["grad_dtypes"] = sorted({str(p.grad.dtype) for p in model.parameters()})
            if ref_grads is not None:
                dot = sum(float((grads[n] * ref_grads[n]).sum()) for n in grads)
                na = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
                nb = math.sqrt(sum(float(g.square().sum()) for g in ref_grads.values()))
                diff = math.sqrt(sum(float((grads[n] - ref_grads[n]).square().sum()) for n in grads))
                out["grad_cosine"], out["grad_rel_l2"] = dot / (na * nb), diff / nb
            else:
                out["grads"] = grads
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
    hook.remove()
    out |= {
        "losses": losses, "step_seconds": seconds,
        "seconds_per_step": min(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "compute_dtypes": sorted(compute_dtypes),
        "param_dtypes": sorted({str(_local(p).dtype) for p in model.parameters()}),
        "optimizer_state_dtypes": sorted({str(v.dtype) for s in opt.state.values() for v in s.values()
                                          if hasattr(v, "dtype")}),
    }
    del model, opt
    return out


def stage_train(cfg: Bf16CpuConfig, tokenizer) -> dict:
    import torch

    n = cfg.train_pairs
    chosen = conversations(cfg, tokenizer, n, max_len=cfg.train_max_len)
    rejected = conversations(cfg, tokenizer, n, swap_answers=True, max_len=cfg.train_max_len)
    rm_batch, _ = packed(chosen + rejected)
    sft_batch, sft_mask = packed(conversations(cfg, tokenizer, 2 * n, max_len=cfg.train_max_len))
    out = {}
    for kind, data in (("rm", (rm_batch, None, n)), ("sft", (sft_batch, sft_mask, n))):
        fp32 = train_run(cfg, kind, False, data)
        grads = fp32.pop("grads")
        bf16 = train_run(cfg, kind, True, data, ref_grads=grads)
        del grads
        # relative to the starting loss: a loss trained towards 0 makes |delta| / loss meaningless
        rel = [abs(b - f) / abs(fp32["losses"][0]) for f, b in zip(fp32["losses"], bf16["losses"])]
        out[kind] = {"tokens": data[0].num_tokens, "fp32": fp32, "bf16": bf16,
                     "loss_rel_diff_step0": rel[0], "loss_rel_diff_max": max(rel),
                     "grad_cosine": bf16.pop("grad_cosine"), "grad_rel_l2": bf16.pop("grad_rel_l2")}
    torch.manual_seed(cfg.seed)
    return out


# ------------------------------------------------------------------------------------------ table


def verdict(speedup: float | None, correct: bool | None) -> str:
    if speedup is None:
        return ""
    if correct is None:  # a figure with no equivalence of its own (start-up, the bare matmul)
        return "bf16 faster" if speedup > 1.0 else "bf16 slower"
    if correct is False:
        return "fp32 (bf16 not equivalent)"
    return "bf16" if speedup > 1.0 and correct else "fp32 (bf16 slower)"


def build_rows(cfg: Bf16CpuConfig, r: dict) -> list[dict]:
    rows = []

    def row(stage, unit, f, b, higher_is_better, equivalence, correct):
        if higher_is_better is None or not (f and b):
            speedup = None  # not a speed
        else:
            speedup = b / f if higher_is_better else f / b
        rows.append({"stage": stage, "unit": unit, "fp32": f, "bf16": b, "speedup": speedup,
                     "equivalence": equivalence, "correct": correct, "default": verdict(speedup, correct)})

    if "matmul" in r:
        m = r["matmul"]
        row("matmul " + "x".join(map(str, m["shape"])), "GFLOP/s", m["fp32"]["gflops"], m["bf16"]["gflops"], True,
            f"rel. error vs fp64: fp32 {m['fp32']['rel_error_vs_fp64']:.1e}, bf16 {m['bf16']['rel_error_vs_fp64']:.1e}", None)
    if "vllm" in r:
        v = r["vllm"]
        tf = v["teacher_forced"]
        ok = tf["logprob_abs_diff_mean"] <= cfg.tol_logprob_mean
        a = v["batch"]["agreement"]
        row(f"vLLM greedy {cfg.vllm_prompts} prompts x {cfg.vllm_new_tokens}", "tokens/s",
            v["batch"]["fp32"]["tokens_per_s"], v["batch"]["bf16"]["tokens_per_s"], True,
            f"identical {a['identical']}/{a['of']}, 1st divergence median {a['first_divergence_median']} "
            f"(min {a['first_divergence_min']}); |dlogp| mean {tf['logprob_abs_diff_mean']:.3f} "
            f"max {tf['logprob_abs_diff_max']:.2f}", ok)
        s = v["single"]["agreement"]
        row(f"vLLM greedy 1 prompt x {cfg.vllm_single_new_tokens}", "tokens/s", v["single"]["fp32"]["tokens_per_s"],
            v["single"]["bf16"]["tokens_per_s"], True,
            "identical" if s["identical"] else f"diverges at token {s['first_divergence'][0]}", ok)
        for size, tps in v.get("sweep", {}).items():
            row(f"vLLM greedy {size} prompts x {cfg.vllm_sweep_tokens}", "tokens/s", tps["fp32"], tps["bf16"], True,
                "(speed only)", None)
        row("vLLM engine start-up", "s", v["start_seconds"]["fp32"], v["start_seconds"]["bf16"], False, "", None)
    if "sync_gap" in r:
        g = r["sync_gap"]
        row("sync log-prob gap vs fp32 trainer (T=1 samples)", "nats/token", g["sampled"]["fp32"], g["sampled"]["bf16"],
            None, f"greedy tokens: fp32 {g['greedy']['fp32']:.1e}, bf16 {g['greedy']['bf16']:.1e}; PPO ratio outside "
            f"[0.8, 1.2] before any update: fp32 {g['ppo_ratio_outside_clip']['fp32']:.2%}, "
            f"bf16 {g['ppo_ratio_outside_clip']['bf16']:.2%} of tokens", None)
    if "forward" in r:
        f = r["forward"]
        lp, rm = f["ref_logprobs"], f["rm_scores"]
        row(f"ref log-probs {f['samples']} x ~{f['tokens'] // f['samples']} tokens", "s", lp["fp32"]["seconds"],
            lp["bf16"]["seconds"], False, f"|dlogp| mean {lp['abs_diff_mean']:.3f} max {lp['abs_diff_max']:.2f}",
            lp["abs_diff_mean"] <= cfg.tol_logprob_mean)
        row(f"RM scores {f['samples']} x ~{f['tokens'] // f['samples']} tokens", "s", rm["fp32"]["seconds"],
            rm["bf16"]["seconds"], False,
            f"|dscore| mean {rm['abs_diff_mean']:.3f} = {rm['rel_diff']:.3f} std; pair order {rm['pair_order_agreement']:.3f}",
            rm["rel_diff"] <= cfg.tol_score_rel)
    if "train" in r:
        for kind, label in (("rm", "RM"), ("sft", "SFT")):
            t = r["train"][kind]
            ok = (t["grad_cosine"] >= cfg.tol_grad_cos and t["loss_rel_diff_max"] <= cfg.tol_loss_rel
                  and t["bf16"]["param_dtypes"] == ["torch.float32"]
                  and t["bf16"]["optimizer_state_dtypes"] == ["torch.float32"])
            row(f"{label} train step ({t['tokens']} tokens)", "s/step", t["fp32"]["seconds_per_step"],
                t["bf16"]["seconds_per_step"], False,
                f"step-0 grad cos {t['grad_cosine']:.4f}, rel L2 {t['grad_rel_l2']:.3f}; loss rel diff "
                f"max {t['loss_rel_diff_max']:.4f} over {cfg.train_steps} steps", ok)
    return rows


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def print_table(rows: list[dict]) -> None:
    width = max(len(r["stage"]) for r in rows)
    print(f"\n{'stage':<{width}}  {'unit':<10} {'fp32':>9} {'bf16':>9} {'speed-up':>8}  {'default':<26} equivalence")
    print("-" * (width + 120))
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"{r['stage']:<{width}}  {r['unit']:<10} {fmt(r['fp32']):>9} {fmt(r['bf16']):>9} {sp:>8}  "
              f"{r['default']:<26} {r['equivalence']}")


# ------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    from training.config import parse_config

    cfg = parse_config(Bf16CpuConfig, argv)
    stages = cfg.stages
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    results: dict = {"config": asdict(cfg), "machine": machine_info()}
    print(f"[bf16_cpu] {cfg.model}; machine {json.dumps(results['machine'])}", flush=True)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bf16_cpu_") as tmp:
        if "matmul" in stages:
            results["matmul"] = stage_matmul(cfg)
            print(f"[bf16_cpu] matmul {json.dumps(results['matmul'])}", flush=True)
        if "vllm" in stages or "sync_gap" in stages:
            from rl.rollout import require_vllm

            require_vllm()
            t0 = time.perf_counter()
            vllm = stage_vllm(cfg, Path(tmp), tokenizer, want_gap="sync_gap" in stages)
            print(f"[bf16_cpu] vllm in {time.perf_counter() - t0:.0f} s", flush=True)
            if "sync_gap" in stages:
                init_world()
                results["sync_gap"] = stage_sync_gap(cfg, vllm)
                print(f"[bf16_cpu] sync gap {json.dumps(results['sync_gap'])}", flush=True)
            vllm.pop("raw")
            if "vllm" in stages:
                results["vllm"] = vllm
        if "forward" in stages:
            init_world()
            t0 = time.perf_counter()
            results["forward"] = stage_forward(cfg, tokenizer)
            print(f"[bf16_cpu] forward in {time.perf_counter() - t0:.0f} s: {json.dumps(results['forward'])}", flush=True)
        if "train" in stages:
            init_world()
            t0 = time.perf_counter()
            results["train"] = stage_train(cfg, tokenizer)
            print(f"[bf16_cpu] train in {time.perf_counter() - t0:.0f} s", flush=True)
    results["machine"]["load_average_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - t_all
    results["table"] = build_rows(cfg, results)
    print_table(results["table"])
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n[bf16_cpu] {results['seconds']:.0f} s; wrote {out}")
    return results


if __name__ == "__main__":
    main()
