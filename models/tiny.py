"""Build a tiny Llama (random weights) and a locally trained tokenizer: ``python -m models.tiny OUT_DIR``.

Nothing is downloaded: the byte-level BPE tokenizer is trained with ``tokenizers`` on the chat
corpus shipped in ``models/assets``; the model is a small ``LlamaConfig`` with random weights. The
folder is an ordinary HF checkpoint (``AutoTokenizer``, ``AutoModelForCausalLM`` and vLLM load it
unchanged), so every code path that serves a real checkpoint serves this one.

Defaults fit vLLM's CPU backend (attention head size >= 32) and run a forward in milliseconds.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = Path(__file__).parent / "assets" / "tiny_chat_corpus.jsonl"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Turns: "<|role|>\n" + content, closed by "<|end|>\n" (system/user) or by EOS (assistant), so a
# policy stops at EOS and an RM sees EOS as a response's last token. The prompt rendered with
# add_generation_prompt=True is a prefix of the full conversation's rendering.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- if loop.first %}{{ bos_token }}{% endif -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|end|>\\n' }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif -%}"
)


@dataclass
class TinyModelConfig:
    vocab_size: int = 4096  # BPE target; the corpus may support fewer merges
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    seed: int = 0


def corpus_texts(path: Path | None = None) -> list[str]:
    texts = []
    with open(path or CORPUS, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.extend(m["content"] for m in json.loads(line)["messages"])
    return texts


def build_tokenizer(vocab_size: int = 4096, corpus: Path | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any UTF-8 text encodes, no unknown token) with bos/eos/pad and chat roles."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        padding_side="right",
        model_max_length=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(out_dir: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Write tokenizer + random-weight Llama to ``out_dir``; returns the path."""
    cfg = cfg or TinyModelConfig()
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "tiny_model_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    for f in fields(TinyModelConfig):
        parser.add_argument(f"--{f.name}", type=int, default=f.default)
    parser.add_argument("--dry_run", action="store_true", help="check the options, build nothing")
    args = parser.parse_args(argv)
    cfg = TinyModelConfig(**{f.name: getattr(args, f.name) for f in fields(TinyModelConfig)})
    if args.dry_run:
        print(f"[dry_run] models.tiny: would write a tiny Llama to {args.out_dir}; nothing was built")
        return
    path = build_tiny_model(args.out_dir, cfg)
    n = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(path).parameters())
    print(f"wrote tiny Llama ({n / 1e6:.2f}M parameters, vocab {json.load(open(path / 'config.json'))['vocab_size']}) to {path}")


if __name__ == "__main__":
    main()
