import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.tiny import main as tiny_main


def test_cli_writes_a_loadable_folder(tmp_path):
    tiny_main([str(tmp_path / "m"), "--hidden_size", "64", "--num_hidden_layers", "1", "--vocab_size", "1500"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.num_hidden_layers == 1
    assert model.config.vocab_size == len(tok) <= 1500


def test_tokenizer_special_tokens_and_chat_template(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) > 1000  # trained on the shipped corpus, a few thousand tokens
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": "Blue."}], tokenize=False)
    assert full.startswith(prompt) and full.endswith("Blue." + tok.eos_token)
    assert prompt.startswith(tok.bos_token)
    ids = tok(full, add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).count("Name a colour.") == 1
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "bot", "content": "x"}], tokenize=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.num_attention_heads * 32 <= model.config.hidden_size  # vLLM CPU: head_dim >= 32
