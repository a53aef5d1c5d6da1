"""Every stage on a real chat model whose pad token is its EOS (SmolLM2-135M-Instruct: ChatML,
pad = eos = ``<|im_end|>`` = 2), and the RL reward read where the reward model was trained to read it.

SmolLM2's template ends an assistant turn with ``"<|im_end|>\\n"``; a sampler stops at
``<|im_end|>``. The canonical end of a scored response (``rlhf_data.tokenize.end_response``): the
response up to its first end-of-turn token, the token appended where it is missing. RM training
and RL scoring both use it; these tests hold them to the same numbers.
"""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from models.actor import scored_positions
from models.value_model import RewardModel
from rl.prompt_data import tokenize_prompts
from rl.rollout import (
    HFEngine, Rollout, SamplingConfig, model_stop_token_ids, resolve_stop_token_ids, vllm_sampling_kwargs,
)
from rl.trainer import reward_inputs, total_reward
from rl.workers import score_sequences
from rlhf_data.collate import collate_pairs
from rlhf_data.tokenize import end_response, tokenize_conversation, tokenize_preference, tokenize_prompt_response

IM_END = 2  # SmolLM2's <|im_end|>: its EOS and its pad
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
LONG_ANSWER = "Paris is the capital of France, and it is also its largest city by far. " * 12


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_smollm2_pads_with_its_end_of_turn_token(smol_tok):
    # the premise of every test below
    assert smol_tok.eos_token_id == smol_tok.pad_token_id == IM_END
    assert smol_tok.convert_ids_to_tokens(IM_END) == "<|im_end|>" and smol_tok.bos_token_id == 1


def test_end_response_is_one_end_token_and_nothing_after():
    assert end_response([5, 6, 2, 198], 2) == ([5, 6, 2], True)  # ChatML's "\n" after <|im_end|> dropped
    assert end_response([5, 2, 7, 2], 2) == ([5, 2], True)  # a sampler stops at the first
    assert end_response([5, 6], 2) == ([5, 6, 2], False)  # cut at the length limit: appended
    with pytest.raises(ValueError, match="no EOS token"):
        end_response([5], None)


# --- SFT -----------------------------------------------------------------------------------------


def test_sft_mask_trains_each_im_end_but_not_the_newline_after_it(smol_tok):
    from train_sft import micro_batch

    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    conv = tokenize_conversation(smol_tok, messages, max_len=512)
    assert smol_tok.decode(conv.input_ids) == smol_tok.apply_chat_template(messages, tokenize=False)
    trained = [t for t, m in zip(conv.input_ids, conv.loss_mask) if m]
    assert smol_tok.decode(trained) == "Hello!<|im_end|>Blue.<|im_end|>"
    # the default system turn and the user turns end with <|im_end|> too: 5 in all, the assistants' trained
    ends = [i for i, t in enumerate(conv.input_ids) if t == IM_END]
    assert [conv.loss_mask[i] for i in ends] == [False, False, True, False, True]
    assert smol_tok.decode(conv.input_ids[ends[2] + 1]) == "\n" and not conv.loss_mask[ends[2] + 1]

    # padded with pad = <|im_end|>, as train_sft.py batches without packing: the scored positions
    # (the loss) still hold both trained <|im_end|>s and none of the padding with the same id
    short = tokenize_conversation(smol_tok, messages[:2], max_len=512)
    convs = [short, conv]
    batch, mask = micro_batch(convs, [0, 1], packing=False, pad_id=smol_tok.pad_token_id, device="cpu")
    assert batch.input_ids.shape == (2, len(conv.input_ids))
    pads = batch.input_ids[0, len(short.input_ids):]
    assert len(pads) > 0 and (pads == IM_END).all()  # padding looks exactly like an end of turn
    flat = batch.input_ids.reshape(-1)
    scored = scored_positions(batch, mask)
    assert int((flat[scored] == IM_END).sum()) == 1 + 2  # one in the short chat, two in the long one
    assert not ((scored >= len(short.input_ids)) & (scored < batch.input_ids.shape[1])).any()  # no padding
    assert len(scored) == sum(sum(c.loss_mask[1:]) for c in convs)  # what train_sft counts as trained tokens


# --- reward-model samples ------------------------------------------------------------------------


def test_rm_sample_ends_at_the_first_im_end(smol_tok):
    s = tokenize_prompt_response(smol_tok, QUESTION, ANSWER, max_len=512)
    response = s.input_ids[s.prompt_len:]
    assert response == smol_tok(ANSWER, add_special_tokens=False)["input_ids"] + [IM_END]  # no "\n", no 2nd EOS
    assert smol_tok.convert_ids_to_tokens(response[-2:]) == [".", "<|im_end|>"]
    # a response cut at max_len ends with <|im_end|> too, right after the last content token kept
    cut = tokenize_prompt_response(smol_tok, QUESTION, LONG_ANSWER, max_len=2 * s.prompt_len + 8)
    content = smol_tok(LONG_ANSWER, add_special_tokens=False)["input_ids"]
    assert cut.truncated and cut.prompt_len == s.prompt_len and len(cut.input_ids) == 2 * s.prompt_len + 8
    assert cut.input_ids[cut.prompt_len:] == content[: len(cut.input_ids) - cut.prompt_len - 1] + [IM_END]

    # padded with pad = eos (train_rm_llama2.py without packing): the RM reads the final
    # <|im_end|> of each sample, located by length (pad-id search would stop one token early)
    pair = tokenize_preference(smol_tok, {"message": QUESTION, "chosen": ANSWER, "rejected": LONG_ANSWER},
                               max_len=2 * s.prompt_len + 8)
    pb = collate_pairs([pair], packing=False, pad_token_id=smol_tok.pad_token_id)
    last = pb.batch.last_token_indices()
    flat = pb.batch.input_ids.reshape(-1)
    assert (flat[last] == IM_END).all()
    assert last.tolist() == [len(pair.chosen) - 1, pb.batch.input_ids.shape[1] + len(pair.rejected) - 1]


# --- rollouts ------------------------------------------------------------------------------------


def test_hf_engine_on_smollm2_stops_at_im_end(smollm2_dir, smol_tok):
    engine = HFEngine(str(smollm2_dir), prompt_max_len=128, generate_max_len=24)
    assert engine.eos_token_ids == [IM_END] and engine.pad_token_id == IM_END
    prompt = tokenize_prompts([{"message": QUESTION}], smol_tok, 128, "truncate").prompts[0]
    short = tokenize_prompts([{"message": [{"role": "user", "content": "Hi"}]}], smol_tok, 128, "truncate").prompts[0]
    # two prompts of different lengths: the shorter is left-padded with pad = <|im_end|>
    groups = engine.generate([prompt, short], SamplingConfig(max_new_tokens=12).greedy())
    r = groups[0][0]
    assert smol_tok.decode(r.response_ids) == ANSWER + "<|im_end|>"
    assert r.finish_reason == "stop" and r.response_ids.count(IM_END) == 1 and r.response_ids[-1] == IM_END
    assert len(r.response_logprobs) == len(r.response_ids)
    other = groups[1][0]  # stopped at its own first <|im_end|>, not carried on by the padding
    assert other.finish_reason == "stop" and other.response_ids.count(IM_END) == 1


def test_vllm_sampling_params_carry_the_end_of_turn_token(smollm2_dir, smol_tok):
    stops = model_stop_token_ids(str(smollm2_dir))  # what VLLMEngine computes from its folder
    assert stops == [IM_END]
    kwargs = vllm_sampling_kwargs(SamplingConfig(temperature=0.7, max_new_tokens=8, n=2), 5, stops)
    assert kwargs["stop_token_ids"] == [IM_END] and "ignore_eos" not in kwargs
    assert (kwargs["max_tokens"], kwargs["n"], kwargs["seed"], kwargs["temperature"]) == (8, 2, 5, 0.7)
    # the tokenizer's EOS is a stop token even where a config names other EOS ids or none
    assert resolve_stop_token_ids(SimpleNamespace(eos_token_id=[0]), None, smol_tok) == [0, IM_END]
    assert resolve_stop_token_ids(None, None, smol_tok) == [IM_END]


# --- the RL reward is the RM's score of the conversation as it was trained --------------------------


def rl_and_rm_scores(model_dir):
    """RL scoring of (a) a response that ended with the stop token and (b) one cut at the length
    limit, through the driver's and the reward worker's own functions; and the RM's scores of the
    same conversations tokenized as train_rm_llama2.py tokenizes them, batched as its training and
    evaluation batch them (packed, and padded: pad == eos for SmolLM2)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(str(model_dir)).eval()  # a random score head
    rm.model.config.use_cache = False  # packed rows (what the reward worker's setup does)

    prompts = tokenize_prompts([{"message": QUESTION}], tok, 10_000, "truncate")  # as rl.prompt_data does
    prompt = prompts.prompts[0]
    max_len = 2 * len(prompt) + 8  # the prompt stays whole; the long response is cut
    pair = tokenize_preference(tok, {"message": QUESTION, "chosen": ANSWER, "rejected": LONG_ANSWER}, max_len)
    assert pair.chosen_prompt_len == pair.rejected_prompt_len == len(prompt)
    with torch.no_grad():
        rm_scores = {packing: rm(collate_pairs([pair], packing, tok.pad_token_id).batch).tolist()
                     for packing in (True, False)}

    # what the engines return: the stop token kept; a cut response is max_new_tokens content tokens
    max_new = max_len - len(prompt) - 1
    ended = Rollout(prompt, tok(ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], None, "stop")
    cut = Rollout(prompt, tok(LONG_ANSWER, add_special_tokens=False)["input_ids"][:max_new], None, "length")
    assert tok.eos_token_id not in cut.response_ids
    batch, ended_flags = reward_inputs([ended, cut], prompts.end_token_id)
    assert batch.sequences == [pair.chosen, pair.rejected]  # the very ids the RM was trained on
    assert batch.sequences[1] == cut.prompt_ids + cut.response_ids + [tok.eos_token_id]
    scores = score_sequences(rm, batch, [[0, 1]], "cpu")
    # the old reading: prompt + sampled ids as they are (no end-of-turn token on the cut one)
    raw = score_sequences(rm, type(batch)([r.prompt_ids + r.response_ids for r in (ended, cut)], batch.prompt_lens),
                          [[0, 1]], "cpu")
    return torch.tensor([scores[0], scores[1]]), ended_flags, rm_scores, [raw[0], raw[1]]


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_rl_reward_equals_the_rm_score_of_the_trained_conversation(model, request):
    model_dir = request.getfixturevalue("tiny_model_dir" if model == "tiny" else "smollm2_dir")
    scores, ended, rm_scores, raw = rl_and_rm_scores(model_dir)
    assert ended.tolist() == [True, False]
    rl = total_reward([scores], [1.0], ended, None).tolist()  # the trainer's reward, no penalty
    for packing, rm in rm_scores.items():  # (chosen, rejected) = (ended, cut)
        assert abs(rl[0] - rm[0]) <= 1e-5 and abs(rl[1] - rm[1]) <= 1e-5, (packing, rl, rm)
    rm = rm_scores[False]
    assert abs(rm[0] - rm[1]) > 1e-3  # a random head that tells the two apart, so equality means something
    assert abs(raw[0] - rl[0]) <= 1e-5  # an ended response was already read where the RM was trained
    assert abs(raw[1] - rl[1]) > 1e-3, (raw, rl)  # the cut one was not: read mid-text

    penalty = 0.75
    penalised = total_reward([scores], [1.0], ended, penalty).tolist()
    assert abs(penalised[0] - rm[0]) <= 1e-5  # (a) ended with the stop token: no penalty
    assert abs(penalised[1] - (rm[1] - penalty)) <= 1e-5  # (b) cut: the RM's score minus the penalty


def test_total_reward_weights_the_models_and_penalises_once():
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])]
    ended = torch.tensor([True, False, False])
    r = total_reward(scores, [0.5, 0.1], ended, 2.0)
    assert torch.allclose(r, torch.tensor([0.5 + 1.0, 1.0 + 2.0 - 2.0, 1.5 + 3.0 - 2.0]))
    assert torch.equal(total_reward(scores, [0.5, 0.1], ended, None), total_reward(scores, [0.5, 0.1], ended, 0.0))


def test_trainer_scores_through_a_ray_reward_worker_equal_rm_training(tiny_model_dir, tmp_path):
    """The driver's real ``RLTrainer._scores`` with a real ``RewardWorker`` on a private local Ray:
    the reward of (a) an ended and (b) a cut response is the RM's score of the conversation as
    train_rm_llama2.py tokenizes it, minus ``--missing_eos_penalty`` for (b) only."""
    ray = pytest.importorskip("ray")
    from rl.config import RLConfig
    from rl.trainer import RLTrainer
    from rl.worker_group import DevicePool, WorkerGroup
    from rl.workers import ModelSpec, RewardWorker, worker_env_vars
    from training.config import parse_config

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(str(tiny_model_dir)).eval()
    rm.model.save_pretrained(tmp_path / "rm")  # a reward-model folder with a random head
    prompts = tokenize_prompts([{"message": QUESTION}], tok, 10_000, "truncate")
    prompt = prompts.prompts[0]
    max_len = 2 * len(prompt) + 8
    pair = tokenize_preference(tok, {"message": QUESTION, "chosen": ANSWER, "rejected": LONG_ANSWER}, max_len)
    with torch.no_grad():
        expected = rm(collate_pairs([pair], True, tok.pad_token_id).batch)
    ended = Rollout(prompt, tok(ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], None, "stop")
    cut = Rollout(prompt, tok(LONG_ANSWER, add_special_tokens=False)["input_ids"][: max_len - len(prompt) - 1],
                  None, "length")

    cfg = parse_config(RLConfig, ["--pretrain", str(tiny_model_dir), "--reward_pretrain", str(tmp_path / "rm"),
                                  "--prompt_data", "unused", "--missing_eos_penalty", "0.75",
                                  "--rollout_batch_size", "1", "--train_batch_size", "1", "--packing_samples"], paths=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": worker_env_vars()})
    try:
        pool = DevicePool.create("chat_rm", 1, 1, use_gpu=False)
        group = WorkerGroup(RewardWorker, pool, name="chat_rm", env_vars=worker_env_vars(),
                            init_kwargs={"spec": ModelSpec(path=str(tmp_path / "rm"), torch_threads=1)})
        group.call(RewardWorker.setup)
        trainer = RLTrainer(cfg, SimpleNamespace(rewards=[group]), prompts, prompts)
        total, flags, _ = trainer._scores([ended, cut])
    finally:
        ray.shutdown()
    assert flags.tolist() == [True, False]
    assert abs(total[0].item() - expected[0].item()) <= 1e-5
    assert abs(total[1].item() - (expected[1].item() - 0.75)) <= 1e-5
