"""FSDP2 on 2 gloo processes (torchrun) must train exactly like one plain process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from models.actor import Actor
from serving.ports import free_port
from models.value_model import RewardModel
from tests.fsdp_reference import actor_step, global_batch, make_optimizer, reward_step

STEPS = 2
TOL = 1e-5


def run_torchrun(nproc: int, *args: str, timeout: int = 600) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", str(Path(__file__).with_name("fsdp_worker.py")), *args,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def reference(kind, model_dir, steps):
    torch.manual_seed(0)
    head = Actor.from_pretrained(model_dir) if kind == "actor" else RewardModel.from_pretrained(model_dir)
    head.train()
    opt = make_optimizer(head, "sgd")
    step = actor_step if kind == "actor" else reward_step
    batches = global_batch(kind, model_dir)
    for _ in range(steps):
        step(head, opt, batches)
    return head


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.mark.parametrize("zero_stage,gc", [(3, True), (2, False)], ids=["zero3_gc", "zero2"])
def test_two_process_fsdp_matches_single_process(tiny_model_dir, tmp_path, zero_stage, gc):
    args = ["--model_dir", str(tiny_model_dir), "--out", str(tmp_path), "--zero_stage", str(zero_stage), "--steps", str(STEPS)]
    run_torchrun(2, *args, *(["--gradient_checkpointing"] if gc else []))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2

    # sharded save -> load is exact, and training continues identically from it
    for kind in ("actor", "reward"):
        assert report[f"{kind}_reload_max_diff"] == 0.0
        assert report[f"{kind}_continue_max_diff"] == 0.0

    # full-state-dict HF folders equal a single unsharded process after the same steps
    actor_ref = reference("actor", tiny_model_dir, STEPS)
    saved_actor = AutoModelForCausalLM.from_pretrained(tmp_path / "actor_hf")
    assert max_param_diff(saved_actor, actor_ref.model) <= TOL

    rm_ref = reference("reward", tiny_model_dir, STEPS)
    saved_rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward_hf")
    assert saved_rm.config.num_labels == 1
    assert max_param_diff(saved_rm, rm_ref.model) <= TOL
    # and training moved the weights (the comparison is not between two untouched models)
    untouched = reference("reward", tiny_model_dir, 0)
    assert max_param_diff(saved_rm, untouched.model) > 1e-4
