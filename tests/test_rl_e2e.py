"""fsdp_ppo_ray.py end to end on tiny models: real Ray (a private local cluster per run), real vLLM
(CPU) rollouts, FSDP workers on gloo.

The task is learnable on purpose. The policy is SFT'd on responses made of GOOD *and* BAD words
(tests/synthetic_data.py) in equal measure, so it starts indifferent; the reward model is trained
to prefer GOOD words over BAD ones. RL must shift the policy's words towards GOOD: the sampled
reward rises within a few dozen iterations, for PPO (critic + GAE) and ReMax alike.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.synthetic_data import preference_rows, write_jsonl
from tests.trainer_runs import flags, run_script
from training.metrics_logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "fsdp_ppo_ray.py")
GAP_TOLERANCE = 1e-3  # the bound for fp32; measured values are ~1e-7

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict:
    """An SFT policy indifferent between GOOD and BAD words, a reward model that prefers GOOD,
    and prompts of the same form; all built with the project's own trainers."""
    root = tmp_path_factory.mktemp("rl_models")
    rows = preference_rows(160, seed=1)
    sft_rows = [{"messages": r["message"] + [{"role": "assistant", "content": resp}]}
                for r in rows for resp in (r["chose"], r["reject"])]
    sft_data = write_jsonl(root / "sft.jsonl", sft_rows)
    prefs = write_jsonl(root / "prefs.jsonl", preference_rows(240, seed=3))
    prompts = write_jsonl(root / "prompts.jsonl", [{"message": r["message"]} for r in preference_rows(96, seed=2)])
    run_script(str(ROOT / "train_sft.py"), [
        "--config", str(ROOT / "configs/sft_tiny.yaml"), "--pretrain", str(tiny_model_dir), "--dataset", str(sft_data),
        "--save_path", str(root / "sft"), "--max_len", "64", "--max_epochs", "4", "--eval_split", "0"])
    run_script(str(ROOT / "train_rm_llama2.py"), [
        "--config", str(ROOT / "configs/rm_tiny.yaml"), "--pretrain", str(tiny_model_dir), "--dataset", str(prefs),
        "--save_path", str(root / "rm"), "--max_len", "64", "--max_epochs", "1", "--eval_split", "0"])
    return {"sft": root / "sft", "rm": root / "rm", "prompts": prompts}


def rl_args(models, out: Path, algo: str, **overrides) -> list[str]:
    args = {"config": ROOT / f"configs/{algo}_tiny.yaml", "pretrain": models["sft"], "reward_pretrain": models["rm"],
            "prompt_data": models["prompts"], "logging_path": out / "log", "max_iterations": 20,
            "actor_learning_rate": 1e-3, "critic_learning_rate": 1e-3} | overrides
    return flags(args)


def run_rl(args, timeout=900):
    return run_script(SCRIPT, args, timeout=timeout)


def rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "log") if r["step"] > 0]


def assert_learns(out: Path) -> list[dict]:
    metrics = rows(out)
    rewards = [r["reward_mean"] for r in metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"\n[rl] reward {first:.2f} -> {last:.2f}: {[round(x, 2) for x in rewards]}")
    assert last > first + 1.0, rewards
    gaps = [r["sync_logprob_gap"] for r in metrics]
    assert max(gaps) <= GAP_TOLERANCE, gaps
    for key in ("kl", "entropy", "advantage_mean", "response_length", "time_generate", "time_reference",
                "time_reward", "time_actor_train", "time_sync", "mem_actor_mb", "mem_ref_mb", "mem_rollout_mb"):
        assert key in metrics[-1], key
    return metrics


def test_remax_learns_with_no_critic_overlaps_generation_and_saves_a_causal_lm(models, tmp_path):
    # one run covers ReMax and the async mode (the next rollout overlaps training); the sync
    # ReMax path runs in tests/test_ray_job_submit.py, PPO's below
    run_rl(rl_args(models, tmp_path, "remax", async_train=True, save_path=tmp_path / "policy"))
    metrics = assert_learns(tmp_path)
    assert "baseline_reward_mean" in metrics[-1] and "value_loss" not in metrics[-1]
    assert not any(k.startswith("mem_critic") for k in metrics[-1])  # no critic worker exists at all
    first = read_metrics(tmp_path / "log")[0]
    assert first["step"] == 0 and "eval_reward_mean" in first and "eval_reward_mean" in metrics[-1]
    # the sync gap is measured on a fresh probe after every sync; the ratio's denominator is the
    # engine's log-probs (no actor forward), and with stale data the ratio is no longer exactly 1
    assert "time_actor_forward" not in metrics[-1]
    assert any(abs(r["ratio_mean"] - 1) > 1e-4 for r in metrics)
    # the saved policy is a plain HF folder holding the trained weights
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    init = AutoModelForCausalLM.from_pretrained(models["sft"])
    diff = max((a - b).abs().max().item() for a, b in zip(trained.state_dict().values(), init.state_dict().values()))
    assert diff > 1e-4


def test_ppo_learns_with_critic_and_gae(models, tmp_path):
    # weights by broadcast (gloo here, NCCL on GPUs): the sync gap checked in assert_learns is
    # measured on rollouts sampled right after each broadcast
    proc = run_rl(rl_args(models, tmp_path, "ppo", save_path=tmp_path / "policy", weight_sync="broadcast"))
    assert "[sync] weights by gloo broadcast" in proc.stdout
    metrics = assert_learns(tmp_path)
    assert "value_loss" in metrics[-1] and "clip_fraction" in metrics[-1] and "mem_critic_mb" in metrics[-1]
    critic = AutoModelForSequenceClassification.from_pretrained(tmp_path / "policy_critic")
    assert critic.config.num_labels == 1


def _kill_after(args, ckpt: Path, iteration: int, timeout=600):
    """Run the job in its own process group and SIGKILL the whole group (driver, Ray, workers,
    vLLM) once its checkpoint for ``iteration`` is complete."""
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + timeout
    latest = ckpt / "latest"
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= f"iter_{iteration:06d}":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_run_resumes_like_an_uninterrupted_one(models, tmp_path):
    # the HF engine (seeded like vLLM): what is tested is the driver's and the workers' state;
    # three vLLM start-ups would triple the cost, and the other runs here cover vLLM's weight sync
    common = dict(max_iterations=4, save_steps=2, rollout_backend="hf")
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_rl(rl_args(models, ref, "ppo", ckpt_path=ref / "ckpt", **common))
    args = rl_args(models, killed, "ppo", ckpt_path=killed / "ckpt", **common)
    _kill_after(args, killed / "ckpt", 2)
    assert not (killed / "ckpt" / "iter_000004").exists()
    proc = run_rl(args)
    assert "[resume]" in proc.stdout + proc.stderr
    a, b = rows(ref), rows(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # the killed run's extra rows were dropped on resume
    for key in ("reward_mean", "policy_loss", "value_loss", "kl"):
        for x, y in zip(a, b):
            assert abs(x[key] - y[key]) <= 1e-4 * max(1.0, abs(x[key])), (key, x["step"], x[key], y[key])


def test_a_lora_actor_sends_merged_weights_to_vllm(models, tmp_path):
    """--lora_rank on the actor: the engine gets the merged weights after every update (the sync
    gap, engine vs trainer log-probs on a fresh probe, stays at fp32 noise), and the saved policy
    is a plain folder in which only the adapted projections moved."""
    run_rl(rl_args(models, tmp_path, "remax", max_iterations=3, eval_steps=-1, lora_rank=8, lora_alpha=16,
                   actor_learning_rate=3e-2, save_path=tmp_path / "policy"))
    metrics = rows(tmp_path)
    assert len(metrics) == 3 and max(r["sync_logprob_gap"] for r in metrics) <= GAP_TOLERANCE, metrics
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").state_dict()
    init = AutoModelForCausalLM.from_pretrained(models["sft"]).state_dict()
    moved = {k for k in init if not torch.equal(trained[k], init[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved), moved
