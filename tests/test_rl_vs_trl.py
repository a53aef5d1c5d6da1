"""benchmarks/rl_vs_trl.py's shared pieces: TRL's reward function is our reward model's score, TRL
sees our driver's prompts (same token ids, same prompts per iteration), and the timing summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from benchmarks.rl_vs_trl import RLvsTRLConfig, RewardScorer, iteration_prompts, prompt_rows, ratios, summarize
from models.fsdp import save_hf_pretrained
from models.packing import PackedBatch
from models.value_model import RewardModel
from rlhf_data.tokenize import render_prompt_ids, tokenize_prompt_response

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "data" / "prompts_train.jsonl"


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(str(tiny_model_dir))  # a random score head
    out = tmp_path_factory.mktemp("rm") / "rm"
    save_hf_pretrained(rm.model, out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_trl_reward_function_returns_our_reward_model_scores(rm_dir):
    """Called as TRL calls a reward function (chat-turn prompts, completion ids: the sampled tokens,
    the EOS included when sampled), the scorer gives per conversation what the RewardModel gives
    the RM-training tokenization of the same texts; a cut response is read with EOS appended."""
    rows = [json.loads(line) for line in (ROOT / "data" / "sft_chat.jsonl").read_text().splitlines()[:6]]
    tok = AutoTokenizer.from_pretrained(rm_dir)
    prompts = [r["messages"][:-1] for r in rows]
    answers = [r["messages"][-1]["content"] for r in rows]
    full = [tokenize_prompt_response(tok, p, a, 512).input_ids for p, a in zip(prompts, answers)]
    completion_ids = [list(ids[len(render_prompt_ids(tok, p)):]) for ids, p in zip(full, prompts)]
    completion_ids[1] = completion_ids[1][:5]  # cut at the length limit: no EOS of its own
    scorer = RewardScorer(rm_dir, token_budget=64)  # several packed micro-batches
    got = scorer(prompts=prompts, completions=["unused"] * len(prompts), completion_ids=completion_ids,
                 trainer_state=None, log_extra=None, log_metric=None)

    rm = RewardModel.from_pretrained(str(rm_dir)).eval()
    for i, (p, ids) in enumerate(zip(prompts, full)):
        if i == 1:
            ids = render_prompt_ids(tok, p) + completion_ids[1] + [tok.eos_token_id]
        with torch.no_grad():
            expected = rm(PackedBatch.from_sequences([torch.tensor(list(ids))])).item()
        assert abs(got[i] - expected) <= 1e-5
    assert len(set(round(g, 6) for g in got)) == len(got)  # a real head: distinct scores


def test_trl_sees_our_prompt_ids_and_our_prompts_per_iteration(tiny_model_dir):
    from trl.trainer.utils import RepeatSampler

    cfg = RLvsTRLConfig(pretrain=str(tiny_model_dir), iterations=5, rollout_batch_size=4, n_samples_per_prompt=3)
    messages = prompt_rows(str(PROMPTS))
    per_iteration = iteration_prompts(cfg, messages)
    # TRL's dataset is these batches in order; with shuffle_dataset=False its sampler gives step k
    # the k-th group of rollout_batch_size prompts, each n_samples_per_prompt times
    dataset = [m for batch in per_iteration for m in batch]
    order = list(RepeatSampler(dataset, mini_repeat_count=3, batch_size=4, repeat_count=1, shuffle=False))
    for k, batch in enumerate(per_iteration):
        step = [dataset[i] for i in order[k * 12:(k + 1) * 12]]
        assert step == [m for m in batch for _ in range(3)]
    assert per_iteration[0] != messages[:4]  # the driver's seeded order, not the file's
    # TRL tokenizes the prompts itself: the same ids our driver's engines get
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    trl_ids = tok.apply_chat_template(conversation=dataset, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
    assert [list(x) for x in trl_ids] == [render_prompt_ids(tok, m) for m in dataset]


def test_summary_excludes_warmup_and_splits_fixed_costs():
    run = {"iteration_seconds": [9.0, 2.0, 4.0, 3.0], "startup_seconds": 30.0, "wall_seconds": 60.0}
    s = summarize(run, warmup=1)
    assert s["seconds_per_iteration_median"] == 3.0 and s["seconds_per_iteration_mean"] == 3.0
    assert s["warmup_seconds"] == [9.0] and s["teardown_seconds"] == 12.0
    by = {"ours_rloo": s, "trl_rloo": summarize(run | {"iteration_seconds": [1.0, 6.0, 6.0]}, warmup=1)}
    assert ratios(by) == {"ours_rloo_over_trl_rloo": 0.5}
