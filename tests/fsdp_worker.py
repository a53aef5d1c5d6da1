"""Run under torchrun by test_fsdp.py: a few FSDP2 training steps of the actor and the reward
model on a fixed global batch, then full and sharded saves, a sharded reload and one more step.
``--bf16``: the same under the bf16 mixed-precision policy (test_bf16.py)."""

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.actor import Actor  # noqa: E402
from models.distributed import init_distributed  # noqa: E402
from models.fsdp import full_state_dict, load_sharded, save_hf_pretrained, save_sharded, shard_model  # noqa: E402
from models.value_model import RewardModel  # noqa: E402
from tests.fsdp_reference import actor_step, global_batch, make_optimizer, reward_step  # noqa: E402


def build(kind, model_dir, args, env, optimizer):
    torch.manual_seed(0)  # the fresh reward head is drawn from the RNG: same on every rank
    head = Actor.from_pretrained(model_dir) if kind == "actor" else RewardModel.from_pretrained(model_dir)
    shard_model(head, zero_stage=args.zero_stage, device=env.device, bf16=args.bf16,
                gradient_checkpointing=args.gradient_checkpointing, hf_model=head.model)
    head.train()
    return head, make_optimizer(head, optimizer)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--zero_stage", type=int, default=3)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fp32 master weights)")
    args = p.parse_args()
    env = init_distributed()
    out = Path(args.out)
    report = {"world_size": env.world_size}

    for kind, step_fn in (("actor", actor_step), ("reward", reward_step)):
        # training equivalence (SGD: see make_optimizer) -> full HF folder
        head, opt = build(kind, args.model_dir, args, env, "sgd")
        batches = global_batch(kind, args.model_dir)
        for _ in range(args.steps):
            step_fn(head, opt, batches, env.rank, env.world_size)
        save_hf_pretrained(head.model, out / f"{kind}_hf")

        # resume with AdamW state: a fresh model + optimizer loaded from the shards continues exactly
        head, opt = build(kind, args.model_dir, args, env, "adamw")
        step_fn(head, opt, batches, env.rank, env.world_size)
        save_sharded(out / f"{kind}_ckpt", head, [opt])
        resumed, opt2 = build(kind, args.model_dir, args, env, "adamw")
        load_sharded(out / f"{kind}_ckpt", resumed, [opt2])
        a, b = full_state_dict(head), full_state_dict(resumed)
        step_fn(head, opt, batches, env.rank, env.world_size)
        step_fn(resumed, opt2, batches, env.rank, env.world_size)
        c, d = full_state_dict(head), full_state_dict(resumed)
        if env.is_main:
            report[f"{kind}_reload_max_diff"] = max((a[k] - b[k]).abs().max().item() for k in a)
            report[f"{kind}_continue_max_diff"] = max((c[k] - d[k]).abs().max().item() for k in c)
    if env.is_main:
        (out / "report.json").write_text(json.dumps(report))
    torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
    torch.distributed.destroy_process_group()


def run() -> None:
    main()
    gc.collect()  # FSDP's cycles hold the gloo group: freed now, not at interpreter shutdown (training.cli.run_cli)


if __name__ == "__main__":
    run()
