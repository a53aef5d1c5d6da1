import pytest
from transformers import AutoTokenizer

from rlhf_data.tokenize import render_chat, tokenize_prompt_response


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


MESSAGE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
RESPONSE = "Sunlight scatters off air molecules, and blue light scatters most."


def test_untruncated_sample_is_prompt_then_response(tok):
    s = tokenize_prompt_response(tok, MESSAGE, RESPONSE, max_len=512)
    prompt, response = render_chat(tok, MESSAGE, RESPONSE)
    assert not s.truncated
    assert tok.decode(s.input_ids[: s.prompt_len]) == prompt
    assert tok.decode(s.input_ids[s.prompt_len:]) == response
    assert s.input_ids[0] == tok.bos_token_id and s.input_ids[-1] == tok.eos_token_id


def test_long_prompt_is_cut_from_the_left_keeping_bos(tok):
    long_message = [{"role": "user", "content": "tell me about the weather " * 60}]
    full = tokenize_prompt_response(tok, long_message, RESPONSE, max_len=4096)
    s = tokenize_prompt_response(tok, long_message, RESPONSE, max_len=64)
    assert s.truncated and len(s.input_ids) == 64
    assert s.input_ids[0] == tok.bos_token_id
    # the response is intact, the prompt's tail (generation prompt) is intact
    assert s.input_ids[s.prompt_len:] == full.input_ids[full.prompt_len:]
    assert s.input_ids[1: s.prompt_len] == full.input_ids[full.prompt_len - (s.prompt_len - 1): full.prompt_len]


def test_long_response_is_cut_but_keeps_final_eos(tok):
    s = tokenize_prompt_response(tok, MESSAGE, "words and more words " * 100, max_len=48)
    full = tokenize_prompt_response(tok, MESSAGE, "words and more words " * 100, max_len=4096)
    assert s.truncated and len(s.input_ids) == 48
    assert s.prompt_len == full.prompt_len  # a short prompt is kept whole
    assert s.input_ids[-1] == tok.eos_token_id
    assert s.input_ids[:-1] == full.input_ids[:47]


def test_conversation_mask_covers_exactly_the_assistant_turns(tok):
    from rlhf_data.tokenize import tokenize_conversation

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    conv = tokenize_conversation(tok, messages, max_len=512)
    assert tok.decode(conv.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    trained = [t for t, m in zip(conv.input_ids, conv.loss_mask) if m]
    assert tok.decode(trained) == "Hello!" + tok.eos_token + "Blue." + tok.eos_token
    cut = tokenize_conversation(tok, messages, max_len=10)
    assert cut.truncated and len(cut.input_ids) == 10 and cut.input_ids == conv.input_ids[:10]
