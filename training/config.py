"""Typed configs: a dataclass per entry script, defaults <- YAML file (``--config``) <- flags.

Flags keep the seed system's names (``--pretrain``, ``--zero_stage``, ``--packing_samples`` ...);
booleans accept ``--flag`` / ``--no-flag``. A YAML key that is not a field, or a value of the wrong
type, stops with an error naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad option: unknown key, wrong type, or a value the script cannot use."""


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``Optional[str]`` -> str."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    base = _base_type(tp)
    if value is None or base is Any:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if base in (int, float, str):
        if isinstance(value, bool) or (base is not str and isinstance(value, str)):
            raise ConfigError(f"{where}: expected {base.__name__}, got {value!r}")
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected int, got {value!r}")
        return base(value)
    return value


def load_yaml(cls: type[T], path: str | Path) -> dict[str, Any]:
    """Field values from a YAML mapping, checked against the dataclass ``cls``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    return {k: _coerce(v, hints[k], f"{path}: option {k!r}") for k, v in data.items()}


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML file of option: value (flags override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        if tp is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=tp if tp in (int, float, str) else str,
                                default=None, help=help_text, metavar=f.name.upper())
    return parser


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Dataclass defaults, then the ``--config`` YAML, then explicit command-line flags."""
    args = build_parser(cls, description).parse_args(argv)
    values: dict[str, Any] = load_yaml(cls, args.config) if args.config else {}
    for f in dataclasses.fields(cls):
        flag = getattr(args, f.name)
        if flag is not None:
            values[f.name] = flag
    return cls(**values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --- Flag groups shared by the trainers (compose them by inheritance) -------------------------


@dataclass
class DistributedArgs:
    zero_stage: int = field(default=3, metadata={"help": "3: reshard params after forward (ZeRO-3); 2: keep them for backward (ZeRO-2)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 compute with fp32 master weights, optimizer states and gradient reduction (FSDP2 mixed precision; frozen RL models load bf16 weights). Off by default: on a CPU without AVX512-BF16/AMX (AVX2 only, like our 2-core machines) every bf16 stage measured slower than fp32 (benchmarks/bf16_cpu.py)"})
    flash_attn: bool = field(default=False, metadata={"help": "require flash-attn varlen kernels (auto-selected on CUDA when installed)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder-layer activations in backward"})
    seed: int = field(default=42, metadata={"help": "random seed"})


@dataclass
class LoggingArgs:
    logging_path: str | None = field(default=None, metadata={"help": "folder for metrics.jsonl (and tensorboard/wandb files)"})
    logging_steps: int = field(default=1, metadata={"help": "log every N optimizer steps"})
    use_wandb: bool = field(default=False, metadata={"help": "log to Weights & Biases (WANDB_MODE=offline works without network)"})
    wandb_project: str = field(default="self-ref-rlhf", metadata={"help": "wandb project"})
    wandb_run_name: str | None = field(default=None, metadata={"help": "wandb run name"})
    use_tensorboard: bool = field(default=False, metadata={"help": "write tensorboard events under logging_path/tensorboard"})


@dataclass
class TrainDataArgs:
    dataset: str = field(default="", metadata={"help": "comma-separated jsonl/json/parquet files or save_to_disk folders"})
    dataset_probs: str | None = field(default=None, metadata={"help": "comma-separated mixing weights, one per dataset"})
    eval_dataset: str | None = field(default=None, metadata={"help": "evaluation files (else --eval_split of each dataset)"})
    eval_split: float = field(default=0.0, metadata={"help": "fraction of each dataset held out for evaluation"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "skip (and report) malformed rows instead of stopping"})
    max_len: int = field(default=2048, metadata={"help": "max tokens per sample"})


@dataclass
class TrainLoopArgs:
    train_batch_size: int = field(default=256, metadata={"help": "samples (pairs for RMs) per optimizer step, all ranks together"})
    micro_train_batch_size: int = field(default=4, metadata={"help": "samples per micro-batch per rank (without packing)"})
    packing_samples: bool = field(default=False, metadata={"help": "pack samples into rows (no padding), varlen attention"})
    packing_max_tokens: int | None = field(default=None, metadata={"help": "token budget of a packed micro-batch (default: micro_train_batch_size x max_len, x2 for pairs)"})
    max_epochs: int = 1
    max_steps: int = field(default=-1, metadata={"help": "stop after N optimizer steps (-1: all epochs)"})
    learning_rate: float = 1e-5
    l2: float = field(default=0.0, metadata={"help": "weight decay"})
    lr_warmup_ratio: float = 0.03
    max_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    eval_steps: int = field(default=-1, metadata={"help": "evaluate every N steps (-1: at the end only)"})


@dataclass
class CheckpointArgs:
    save_path: str | None = field(default=None, metadata={"help": "HF folder written at the end and every --save_steps"})
    save_steps: int = field(default=-1, metadata={"help": "save (and checkpoint) every N steps; -1: at the end only"})
    ckpt_path: str | None = field(default=None, metadata={"help": "resumable state; a rerun with the same command resumes"})
    max_ckpt_num: int = field(default=2, metadata={"help": "checkpoints kept in --ckpt_path"})
