"""The driver's small pieces: experience layout, prompt schedule and truncation, running reward
moments, merging rank results, and the config's checks (each a clear one-line error)."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from rl.config import RLConfig
from rl.experience import SequenceBatch, pad_responses, unpad_responses
from rl.prompt_data import PromptSchedule, tokenize_prompts
from rl.running_moments import RunningMoments
from rl.worker_group import merge_rank_results
from training.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_sequence_batch_masks_exactly_the_response_tokens():
    batch = SequenceBatch([[5, 6, 7, 8], [9, 10], [11, 12, 13]], [2, 1, 2])
    packed, mask = batch.packed([2, 0])
    assert packed.input_ids.tolist() == [[11, 12, 13, 5, 6, 7, 8]]
    assert mask.tolist() == [[False, False, True, False, False, True, True]]
    parts = batch.split_responses([2, 0], packed.input_ids[mask])
    assert [p.tolist() for p in parts] == [[13], [7, 8]]
    assert batch.response_lens == [2, 1, 1]
    with pytest.raises(ValueError, match="sample 1: prompt length 2 of a 2-token sequence leaves no response"):
        SequenceBatch([[1, 2, 3], [1, 2]], [1, 2])


def test_pad_and_unpad_round_trip():
    rows = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0])]
    padded, mask = pad_responses(rows)
    assert padded.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.sum().item() == 4
    assert [r.tolist() for r in unpad_responses(padded, [3, 1])] == [[1, 2, 3], [4]]


def test_prompt_schedule_is_a_pure_function_of_seed_and_iteration():
    s = PromptSchedule(num_prompts=10, batch_size=4, num_episodes=3, seed=7)
    assert s.total == 6  # 2 full batches per episode, the partial one dropped
    episode0 = s.batch(0) + s.batch(1)
    assert len(set(episode0)) == 8 and all(0 <= i < 10 for i in episode0)
    assert s.batch(2) != s.batch(0)  # a new shuffle each episode
    assert PromptSchedule(10, 4, 3, 7).batch(5) == s.batch(5)  # a resumed run sees the same prompts


def test_running_moments_equal_the_moments_of_everything_seen():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3, 2, size=n) for n in (5, 1, 17, 8)]
    m = RunningMoments()
    for c in chunks:
        m.update(torch.tensor(c))
    all_ = np.concatenate(chunks)
    assert abs(m.mean - all_.mean()) < 1e-9 and abs(m.var - all_.var()) < 1e-9 and m.count == len(all_)
    x = torch.tensor([1.0, 5.0])
    assert torch.allclose(m.normalize(x), (x - all_.mean()) / all_.std(), atol=1e-6)
    restored = RunningMoments()
    restored.load_state_dict(m.state_dict())
    assert restored.state_dict() == m.state_dict()


def test_merge_rank_results_catches_lost_and_duplicated_samples():
    assert merge_rank_results([{0: "a", 2: "c"}, {1: "b"}], 3, "x") == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="1 of 3 samples were not returned"):
        merge_rank_results([{0: "a"}, {1: "b"}], 3, "ref")
    with pytest.raises(RuntimeError, match="sample 0 returned by two ranks"):
        merge_rank_results([{0: "a"}, {0: "a", 1: "b"}], 2, "ref")


def test_prompts_over_the_limit_are_truncated_or_dropped_and_counted(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"message": [{"role": "user", "content": "hi"}]},
            {"message": [{"role": "user", "content": "a long question " * 40}]}]
    short = len(tokenize_prompts(rows[:1], tok, 10_000, "truncate").prompts[0])
    kept = tokenize_prompts(rows, tok, short + 5, "truncate")
    assert len(kept) == 2 and kept.truncated == 1 and len(kept.prompts[1]) == short + 5
    assert kept.prompts[1][0] == tok.bos_token_id or tok.bos_token_id is None  # BOS survives left truncation
    dropped = tokenize_prompts(rows, tok, short + 5, "drop")
    assert len(dropped) == 1 and dropped.dropped == 1
    assert kept.end_token_id == dropped.end_token_id == tok.eos_token_id  # where the RMs read a response's score


def test_a_reward_model_with_another_eos_is_refused(tiny_model_dir, tmp_path):
    from rl.prompt_data import check_tokenizers_match

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.eos_token = "<|end|>"  # same vocabulary, another end-of-turn token
    other.save_pretrained(tmp_path / "rm")
    check_tokenizers_match(tok, [str(tiny_model_dir)], "--reward_pretrain")  # the same tokenizer passes
    with pytest.raises(ConfigError, match=r"--reward_pretrain .*: its EOS token '<\|end\|>' differs from the policy's '</s>'"):
        check_tokenizers_match(tok, [str(tmp_path / "rm")], "--reward_pretrain")


BASE = ["--pretrain", "p", "--reward_pretrain", "r", "--prompt_data", "d"]


@pytest.mark.parametrize("flags, message", [
    ([], "--pretrain, --reward_pretrain and --prompt_data are required"),
    (BASE + ["--advantage_estimator", "grpo"], "--advantage_estimator must be one of gae, remax, rloo"),
    (BASE + ["--advantage_estimator", "rloo"], "rloo needs --n_samples_per_prompt >= 2"),
    (BASE + ["--rollout_batch_size", "6", "--train_batch_size", "4"], "must divide the samples of a rollout"),
    (BASE + ["--actor_num_gpus_per_node", "3", "--rollout_batch_size", "8", "--train_batch_size", "8"],
     "must split evenly over the 3 actor rank"),
    (BASE + ["--kl_estimator", "k4"], "--kl_estimator must be one of k1, k2, k3"),
    (BASE + ["--async_train", "--policy_loss", "reinforce"], "needs the importance ratio to the behaviour policy"),
    (BASE + ["--async_train", "--old_logprobs", "trainer"], "can only come from the sampler"),
    (BASE + ["--weight_sync", "nccl"], "--weight_sync must be one of auto, object_store, broadcast"),
    (BASE + ["--weight_sync", "broadcast", "--rollout_backend", "hf"], "needs --rollout_backend vllm"),
    (BASE + ["--missing_eos_penalty", "-1"], "--missing_eos_penalty must be >= 0, got -1.0"),
    (BASE + ["--missing_eos_penalty", "nan"], "--missing_eos_penalty must be a finite number, got nan"),
])
def test_config_errors_are_one_clear_line(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config(RLConfig, flags, paths=False)


def test_policy_loss_and_clip_defaults_follow_the_estimator():
    remax = parse_config(RLConfig, paths=False, argv=BASE + ["--advantage_estimator", "remax"])
    assert remax.effective_policy_loss == "reinforce" and remax.effective_reward_clip == 5.0
    assert not remax.uses_critic and not remax.effective_whiten
    ppo = parse_config(RLConfig, paths=False, argv=BASE)
    assert ppo.effective_policy_loss == "ppo" and ppo.effective_reward_clip == 10.0 and ppo.effective_whiten
    remax_async = parse_config(RLConfig, paths=False, argv=BASE + ["--advantage_estimator", "remax", "--async_train"])
    assert remax_async.effective_policy_loss == "ppo"  # the ratio to the behaviour policy is required
    # old log-probs: the sampler's where nothing needs the trainer's (async; REINFORCE in fp32)
    assert remax.effective_old_logprobs == "sampler" and remax_async.effective_old_logprobs == "sampler"
    assert ppo.effective_old_logprobs == "trainer"
    remax_bf16 = parse_config(RLConfig, paths=False, argv=BASE + ["--advantage_estimator", "remax", "--bf16"])
    assert remax_bf16.effective_old_logprobs == "trainer"
    assert ppo.missing_eos_penalty is None  # TRL's default: no penalty
    assert parse_config(RLConfig, paths=False, argv=BASE + ["--missing_eos_penalty", "1.5"]).missing_eos_penalty == 1.5


def test_weight_sync_auto_broadcasts_only_with_gpus_and_vllm():
    from rl.trainer import resolve_weight_sync

    cfg = parse_config(RLConfig, paths=False, argv=BASE)
    assert resolve_weight_sync(cfg, use_gpu=True) == "broadcast"
    assert resolve_weight_sync(cfg, use_gpu=False) == "object_store"
    assert resolve_weight_sync(parse_config(RLConfig, paths=False, argv=BASE + ["--rollout_backend", "hf"]), use_gpu=True) == "object_store"
    assert resolve_weight_sync(parse_config(RLConfig, paths=False, argv=BASE + ["--weight_sync", "broadcast"]), use_gpu=False) == "broadcast"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                        if p.name.startswith(("ppo", "remax"))))
def test_shipped_rl_configs_parse(name):
    cfg = parse_config(RLConfig, ["--config", str(ROOT / "configs" / name)] + BASE, paths=False)
    assert cfg.advantage_estimator in ("gae", "remax")


def test_a_reward_model_with_another_tokenizer_is_refused_before_ray_starts(tiny_model_dir, tmp_path):
    from models.tiny import TinyModelConfig, build_tiny_model
    from tests.trainer_runs import run_script

    other = build_tiny_model(tmp_path / "other", TinyModelConfig(vocab_size=2048))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"message": "hello"}\n' * 4)
    proc = run_script(str(ROOT / "fsdp_ppo_ray.py"), ["--pretrain", str(tiny_model_dir), "--reward_pretrain", str(other),
                                                      "--prompt_data", str(prompts), "--rollout_batch_size", "4", "--packing_samples",
                                                      "--train_batch_size", "4"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --reward_pretrain {other}: its tokenizer differs")
    assert "[ray]" not in proc.stdout
