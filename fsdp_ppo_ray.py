"""PPO and ReMax with Ray workers (FSDP2 actor / reference / critic / reward models) and vLLM rollouts.

    ray job submit -- python fsdp_ppo_ray.py --advantage_estimator gae --colocate_actor_ref \
        --actor_num_gpus_per_node 4 --ref_num_gpus_per_node 4 --critic_num_gpus_per_node 2 ... \
        --pretrain SFT --reward_pretrain RM1,RM2 --prompt_data D --save_path OUT --logging_path LOG
    python fsdp_ppo_ray.py --config configs/remax_tiny.yaml --pretrain out/sft --reward_pretrain out/rm \
        --prompt_data prompts.jsonl        # no cluster: starts (and stops) a local Ray

``--advantage_estimator remax`` drops the critic: the baseline is the reward of the policy's greedy
response (Li et al. 2023). ``--async_train`` overlaps generation with training. A rerun of the
same command with ``--ckpt_path`` resumes where a killed run stopped.
"""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from rl.cluster import build_workers, start_ray, stop_ray
from rl.config import RLConfig, check_resources
from rl.prompt_data import check_tokenizers_match, load_prompt_sets
from rl.rollout import require_vllm
from rl.trainer import RLTrainer, optimizer_steps_per_iteration, total_iterations
from training.cli import run_cli
from training.config import ConfigError, parse_config


def main(argv: list[str] | None = None) -> dict:
    # vLLM is checked here, before any worker starts (and by --dry_run)
    cfg = parse_config(RLConfig, argv, checks=[check_resources, lambda c: c.rollout_backend != "vllm" or require_vllm()])

    # ---- data (every error stops here, before Ray starts)
    tokenizer = AutoTokenizer.from_pretrained(cfg.pretrain)
    check_tokenizers_match(tokenizer, cfg.reward_paths(), "--reward_pretrain")
    if cfg.uses_critic and cfg.critic_pretrain:
        check_tokenizers_match(tokenizer, [cfg.critic_pretrain], "--critic_pretrain")
    train_prompts, eval_prompts = load_prompt_sets(cfg, tokenizer)
    iterations = total_iterations(cfg, len(train_prompts))
    if iterations < 1:
        raise ConfigError("no rollout to run: check --num_episodes / --max_iterations / --rollout_batch_size")
    steps = iterations * optimizer_steps_per_iteration(cfg)
    print(f"[plan] {iterations} iterations x {cfg.samples_per_rollout} samples, {steps} optimizer steps; "
          f"{cfg.advantage_estimator} with the {cfg.effective_policy_loss} loss"
          f"{', async' if cfg.async_train else ''}")

    # ---- workers on Ray, then the loop
    started_here = start_ray(cfg)
    workers = None
    try:
        workers = build_workers(cfg, actor_steps=steps, critic_steps=steps)
        summary = RLTrainer(cfg, workers, train_prompts, eval_prompts).fit()
    finally:
        if workers is not None:
            workers.shutdown()
        stop_ray(started_here)
    print("[done] " + json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_cli(main)
