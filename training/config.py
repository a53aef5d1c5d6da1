"""Typed configs: a dataclass per entry script, defaults <- YAML file (``--config``) <- flags.

The one rule of precedence (docs/configs.md), for every entry point: a flag given on the command
line overrides the same option from the ``--config`` YAML, which overrides the dataclass default.
Some options are alternatives for one thing (``--eval_dataset`` or ``--eval_split``: where the
evaluation data comes from); a field's ``one_of`` metadata names its group. Setting one member on
the command line drops the others' YAML values (back to their defaults, said in one ``[config]``
line): a YAML default must not collide with what the user asked for. Two members set in the same
place (both flags, or both in the YAML) are a conflict, which the config's checks report.

``--dry_run`` (every entry point) runs the checks below, those the entry point passes as
``checks`` (the machine's resources, required libraries) and exits 0 without running anything.
A pipeline's dry run (``demo.py --dry_run``) names in ``RLHF_PENDING_PATHS`` the files an earlier
stage will write: there, and only in a dry run, a missing path under one of them passes.

Flags keep the seed system's names (``--pretrain``, ``--zero_stage``, ``--packing_samples`` ...);
booleans accept ``--flag`` / ``--no-flag``. A YAML key that is not a field, or a value of the wrong
type, stops with an error naming the file and the key.

A field typed ``list[str]``, ``list[float]`` or ``list[int]`` takes a flag value ``a,b,c`` and, in
YAML, a list or the same comma string; an element of the wrong type is one error naming the flag
(``--reward_weights: 'x' is not a number``). A dataclass built in code may also pass a comma string
or a single path: ``check_fields`` turns it into the list.

Everything is checked before any heavy work (process group, Ray, model load, server):

* values, by the ``check`` rule in a field's metadata (``check_fields``, from each config's
  ``__post_init__``): ``"> 0"``, ``">= 1"``, ``"[0, 1)"``, ``"-1 or >= 1"``, or a tuple of choices;
  every float must be finite; a list field's rule holds for each of its values;
* paths, by the ``path`` kind in a field's metadata (``check_paths``, from ``parse_config``; each
  value of a list field):
  ``model`` (an existing model folder, or a Hub id that resolves), ``data`` (existing files),
  ``output`` (creatable and writable, never one of the inputs).
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import functools
import math
import os
import re
import sys
import time
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad option: unknown key, wrong type, or a value the script cannot use."""


# torchrun SIGTERMs every rank when the first one exits, so a rank other than 0 that finds the
# mistake first would silence rank 0's line; it waits this long for rank 0 to say it and exit.
_OTHER_RANKS_WAIT_S = 20.0


def exit_with_error(message: str) -> None:
    """Print one ``error:`` line and exit with status 2; under torchrun only rank 0 prints."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    else:
        time.sleep(_OTHER_RANKS_WAIT_S)
    sys.exit(2)


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``Optional[str]`` -> str."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _list_element(tp: Any) -> Any:
    """``list[float]`` (or ``list[float] | None``) -> float; None for a field that is not a list."""
    base = _base_type(tp)
    if base is list or typing.get_origin(base) is list:
        return (typing.get_args(base) or (str,))[0]
    return None


_ELEMENT_NAME = {float: "a number", int: "a whole number", str: "a string"}


def _list_value(value: Any, elem: Any, where: str) -> list:
    """A list field's value: ``"a, b"`` (comma-separated, blanks dropped), a list, or one value;
    each element converted to ``elem``. One ``ConfigError`` starting with ``where`` for a bad one."""
    if isinstance(value, str):
        items: list = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    out = []
    for item in items:
        if isinstance(item, os.PathLike):
            item = os.fspath(item)
        if isinstance(item, str):
            item = item.strip()
            if not item:
                continue
        try:
            if isinstance(item, bool):
                raise ValueError
            if elem is str:
                if not isinstance(item, str):
                    raise ValueError
                converted = item
            elif elem in (int, float):
                if not isinstance(item, (str, int, float)) or (
                        elem is int and isinstance(item, float) and not item.is_integer()):
                    raise ValueError
                converted = elem(item)
            else:
                converted = item
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {item!r} is not {_ELEMENT_NAME.get(elem, getattr(elem, '__name__', elem))}") from None
        out.append(converted)
    return out


def _show(value: Any) -> str:
    """A value as a flag spells it (lists comma-separated)."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    base = _base_type(tp)
    if value is None or base is Any:
        return value
    if (elem := _list_element(tp)) is not None:
        return _list_value(value, elem, where)
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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    return {k: _coerce(v, hints[k], f"{path}: option {k!r}") for k, v in data.items()}


class OneLineParser(argparse.ArgumentParser):
    """A bad flag ends with one ``error:`` line and exit 2 (argparse's own code), not the usage."""

    def error(self, message: str):
        exit_with_error(f"{message} (see --help)")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(description=description or (cls.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML file of option: value (flags override it)")
    if "dry_run" not in {f.name for f in dataclasses.fields(cls)}:
        parser.add_argument("--dry_run", action="store_true",
                            help="check every option (values, files, this machine's resources) and exit without running")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        default = _default(f)
        help_text = f.metadata.get("help", "")
        if _list_element(tp) is not None:
            help_text = f"{help_text}; comma-separated" if help_text else "comma-separated"
        help_text = f"{help_text} (default: {_show(default)})" if help_text else f"default: {_show(default)}"
        if "check" in f.metadata:
            help_text += f"; {_rule_text(f.metadata['check'])}"
        if _list_element(tp) is not None:
            parser.add_argument(f"--{f.name}", type=str, default=None, metavar=f"{f.name.upper()}[,...]",
                                help=help_text.replace("%", "%%"))
        elif tp is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=tp if tp in (int, float, str) else str,
                                default=None, help=help_text, metavar=f.name.upper())
    return parser


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None,
                 paths: bool = True, checks: typing.Sequence[typing.Callable[[T], None]] = ()) -> T:
    """Dataclass defaults, then the ``--config`` YAML, then explicit command-line flags (``merge_layers``:
    one source per ``one_of`` group); checked: values always, paths unless ``paths=False`` (tests of
    the value rules on made-up paths), then ``checks`` (what else an entry point verifies before
    any heavy work). ``--dry_run`` stops here, with one line, exit status 0."""
    parser = build_parser(cls, description)
    args = parser.parse_args(argv)
    hints = typing.get_type_hints(cls)
    flags: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        flag = getattr(args, f.name)
        if flag is not None:
            elem = _list_element(hints[f.name])
            flags[f.name] = flag if elem is None else _list_value(flag, elem, f"--{f.name}")
    layers = [(str(args.config), load_yaml(cls, args.config) if args.config else {}), ("the command line", flags)]
    values = merge_layers(cls, layers)
    own_flag = "dry_run" in {f.name for f in dataclasses.fields(cls)}  # demo.py: its own dry run of every stage
    dry_run = bool(getattr(args, "dry_run", False)) and not own_flag
    token = _DRY_RUN.set(dry_run)
    try:
        cfg = cls(**values)
        if paths:
            check_paths(cfg)
        for check in checks:
            check(cfg)
    finally:
        _DRY_RUN.reset(token)
    if dry_run:
        world = f" for {world_size()} ranks" if world_size() > 1 else ""
        if os.environ.get("RANK", "0") == "0":
            print(f"[dry_run] {_program()}: every option checked{world}; nothing was run", flush=True)
        raise SystemExit(0)
    return cfg


def _program() -> str:
    """This process's entry point as its user typed it: ``train_sft.py`` or ``self_ref.generate``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name != "__main__" else Path(sys.argv[0]).name


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def merge_layers(cls: type, layers: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Field values from ``layers`` (``(where, values)``, lowest first: the YAML file, then the
    command line), a later layer's value replacing an earlier one's. Fields whose metadata share
    a ``one_of`` group are alternatives for one thing: a member set to something other than its
    default replaces the other members' values from earlier layers (one ``[config]`` line says
    so). Members set in the same layer stay, for the config's checks to report."""
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    groups = {name: f.metadata["one_of"] for name, f in fields_by_name.items() if "one_of" in f.metadata}
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    replaced: dict[str, str] = {}  # field -> the line saying which flag replaced its value
    for where, layer in layers:
        for name, value in layer.items():
            group = groups.get(name)
            if group is not None and value != _default(fields_by_name[name]):
                for other in [o for o, g in groups.items() if g == group and o != name and o in values]:
                    if source[other] == where:
                        continue
                    dropped, dropped_from = values.pop(other), source.pop(other)
                    if dropped != _default(fields_by_name[other]):
                        replaced[other] = (f"[config] --{name} from {where} replaces {other}: {_show(dropped)} "
                                           f"from {dropped_from} (alternatives: give one)")
            values[name], source[name] = value, where
    if os.environ.get("RANK", "0") == "0":
        for other, line in replaced.items():
            if other not in values:  # not set again later (then the checks report the conflict)
                print(line, flush=True)
    return values


# --- Dry runs ------------------------------------------------------------------------------------

PENDING_PATHS_ENV = "RLHF_PENDING_PATHS"
_DRY_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("dry_run", default=False)


def is_pending(path: str | Path) -> bool:
    """In a ``--dry_run`` only: ``path`` lies at or under one of ``RLHF_PENDING_PATHS``
    (``os.pathsep``-separated), the outputs an earlier stage of a pipeline will write."""
    if not _DRY_RUN.get():
        return False
    p = Path(path).expanduser().resolve()
    for item in os.environ.get(PENDING_PATHS_ENV, "").split(os.pathsep):
        if item and p.is_relative_to(Path(item).expanduser().resolve()):
            return True
    return False


# --- Value rules (metadata "check") ------------------------------------------------------------

_CMP = re.compile(r"^(>=|<=|>|<)\s*(-?[\d.e+-]+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])$")


def _rule_text(rule) -> str:
    if isinstance(rule, (tuple, list)):
        return "must be one of " + ", ".join(map(str, rule))
    return f"must be in {rule}" if rule[0] in "[(" else f"must be {rule}"


def satisfies(value, rule) -> bool:
    """``value`` against one rule: choices (tuple), ``"> 0"``, ``"[0, 1)"``, ``"-1 or >= 1"``."""
    if isinstance(rule, (tuple, list)):
        return value in rule
    for alt in (a.strip() for a in rule.split(" or ")):
        if m := _CMP.match(alt):
            op, x = m.group(1), float(m.group(2))
            if {">": value > x, ">=": value >= x, "<": value < x, "<=": value <= x}[op]:
                return True
        elif m := _INTERVAL.match(alt):
            lo, hi = float(m.group(2)), float(m.group(3))
            if (lo < value if m.group(1) == "(" else lo <= value) and (value < hi if m.group(4) == ")" else value <= hi):
                return True
        elif value == type(value)(alt):
            return True
    return False


@functools.lru_cache(maxsize=None)
def _list_fields(cls: type) -> dict[str, Any]:
    """The list fields of a config class: name -> element type."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 -- an annotation that does not resolve: no list fields known
        return {}
    return {n: e for n, tp in hints.items() if (e := _list_element(tp)) is not None}


def check_fields(cfg) -> None:
    """Every field of ``cfg`` against its ``check`` rule; every float finite; a list field's rule
    and finiteness for each of its values (a comma string or single value given in code becomes
    the list first). One ``ConfigError`` naming the flag for the first that fails."""
    lists = _list_fields(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in lists and value is not None:
            value = _list_value(value, lists[f.name], f"--{f.name}")
            setattr(cfg, f.name, value)
        for item in value if isinstance(value, list) else [value]:
            _check_value(f, item, each=isinstance(value, list))


def _check_value(f: dataclasses.Field, value: Any, each: bool) -> None:
    if value is None or isinstance(value, bool):
        return
    name = f"--{f.name}: every value" if each else f"--{f.name}"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    rule = f.metadata.get("check")
    if rule is not None and not satisfies(value, rule):
        raise ConfigError(f"{name} {_rule_text(rule)}, got {value!r}")


def check_count(flag: str, values: list, count: int, what: str) -> None:
    """``values`` (a list flag) has one value per ``what`` (``count`` of them)."""
    if len(values) != count:
        raise ConfigError(f"{flag} has {len(values)} value(s) for {count} {what}: give exactly {count}")


def world_size() -> int:
    """Ranks of this job as torchrun announces them (1 for a plain ``python`` run)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


# --- Path rules (metadata "path") --------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _looks_local(value: str) -> bool:
    """A path, not a Hub id: absolute, ``./``, ``~``, more than one ``/``, or under a folder that exists."""
    if value.startswith(("/", ".", "~")) or value.count("/") > 1 or not _HUB_ID.match(value):
        return True
    return "/" in value and Path(value.split("/")[0]).is_dir()


def check_model_path(flag: str, value: str) -> None:
    """A local model folder (config.json and tokenizer files), or a Hub id that is cached or that
    the Hub knows. Nothing is downloaded here."""
    p = Path(value).expanduser()
    if not p.exists() and is_pending(p):
        return  # a dry run: an earlier stage writes it
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{flag} {value}: a file, not a model folder")
        if not (p / "config.json").is_file():
            raise ConfigError(f"{flag} {value}: not a model folder (no config.json)")
        if not any((p / n).is_file() for n in TOKENIZER_FILES):
            raise ConfigError(f"{flag} {value}: no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)})")
        return
    if _looks_local(value):
        raise ConfigError(f"{flag} {value}: no such folder")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(value, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("0", "", "false"):
        raise ConfigError(f"{flag} {value}: no such folder, and not in the Hub cache (offline mode)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(value, timeout=10)
    except GatedRepoError:
        return  # exists; loading will need a token
    except RepositoryNotFoundError:
        raise ConfigError(f"{flag} {value}: no such folder, and no such model on the Hub") from None
    except Exception as e:  # noqa: BLE001 -- no network: say so now, not after a minute of retries
        raise ConfigError(f"{flag} {value}: no such folder, and the Hub cannot be reached to look it up "
                          f"({type(e).__name__})") from None


def check_data_path(flag: str, value: str | list[str]) -> None:
    """Every data file or ``save_to_disk`` folder (one, or a list) exists (contents are checked
    row by row when read)."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(items):
        raise ConfigError(f"{flag} is empty")
    for item in items:
        if not Path(item).expanduser().exists() and not is_pending(item):
            raise ConfigError(f"{flag} {item}: no such file or folder")


def check_output_path(flag: str, value: str, kind: str = "dir") -> None:
    """``value`` can be created (or is already a ``kind``) and written."""
    p = Path(value).expanduser()
    if p.exists():
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"{flag} {value}: a file is there, expected a folder")
        if kind == "file" and p.is_dir():
            raise ConfigError(f"{flag} {value}: a folder is there, expected a file")
    if p.is_file() and not os.access(p, os.W_OK):
        raise ConfigError(f"{flag} {value}: the file is not writable")
    parent = p if p.is_dir() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {value}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {value}: {parent} is not writable")


def same_path(a: str | Path, b: str | Path) -> bool:
    """The same file or folder (links and relative spellings resolved)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_paths(cfg) -> None:
    """The ``path`` fields of ``cfg``: inputs exist, outputs are writable and none is an input."""
    inputs: list[tuple[str, str]] = []
    outputs: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cfg):
        kind, value = f.metadata.get("path"), getattr(cfg, f.name)
        if not kind or value in (None, "") or value == []:
            continue
        flag = f"--{f.name}"
        items = value if isinstance(value, list) else [value]
        if kind == "model":
            for item in items:
                check_model_path(flag, item)
                inputs.append((flag, item))
        elif kind == "data":
            check_data_path(flag, value)
            inputs += [(flag, item) for item in items]
        elif kind in ("output", "output_file"):
            check_output_path(flag, value, "file" if kind == "output_file" else "dir")
            outputs.append((flag, value))
    for out_flag, out in outputs:
        for in_flag, item in inputs:
            if Path(item).expanduser().exists() and same_path(out, item):
                raise ConfigError(f"{out_flag} {out} is also {in_flag}: an output must not overwrite an input")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --- Flag groups shared by the trainers (compose them by inheritance) -------------------------


@dataclass
class DistributedArgs:
    zero_stage: int = field(default=3, metadata={"help": "3: reshard params after forward (ZeRO-3); 2: keep them for backward (ZeRO-2). FSDP2 always shards parameters, gradients and optimizer states, so there is no ZeRO-1", "check": (2, 3)})
    bf16: bool = field(default=False, metadata={"help": "bf16 compute with fp32 master weights, optimizer states and gradient reduction (FSDP2 mixed precision; frozen RL models load bf16 weights). Off by default: on a CPU without AVX512-BF16/AMX (AVX2 only, like our 2-core machines) every bf16 stage measured slower than fp32 (benchmarks/bf16_cpu.py)"})
    flash_attn: bool = field(default=False, metadata={"help": "require flash-attn varlen kernels (auto-selected on CUDA when installed)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder-layer activations in backward"})
    seed: int = field(default=42, metadata={"help": "random seed", "check": ">= 0"})


@dataclass
class LoggingArgs:
    logging_path: str | None = field(default=None, metadata={"help": "folder for metrics.jsonl (and tensorboard/wandb files)", "path": "output"})
    logging_steps: int = field(default=1, metadata={"help": "write metrics every N steps (optimizer steps; RL: iterations) and at the last", "check": ">= 1"})
    use_wandb: bool = field(default=False, metadata={"help": "log to Weights & Biases (WANDB_MODE=offline works without network)"})
    wandb_project: str = field(default="self-ref-rlhf", metadata={"help": "wandb project"})
    wandb_run_name: str | None = field(default=None, metadata={"help": "wandb run name"})
    use_tensorboard: bool = field(default=False, metadata={"help": "write tensorboard events under logging_path/tensorboard"})


@dataclass
class TrainDataArgs:
    dataset: list[str] = field(default_factory=list, metadata={"help": "jsonl/json/parquet files or save_to_disk folders", "path": "data"})
    dataset_probs: list[float] = field(default_factory=list, metadata={"help": "mixing weights, one per dataset (default: each row once)", "check": "> 0"})
    eval_dataset: list[str] = field(default_factory=list, metadata={"help": "evaluation files (else --eval_split of each dataset)", "path": "data", "one_of": "eval data"})
    eval_split: float = field(default=0.0, metadata={"help": "fraction of each dataset held out for evaluation", "check": "[0, 1)", "one_of": "eval data"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "skip (and report) malformed rows instead of stopping"})
    max_len: int = field(default=2048, metadata={"help": "max tokens per sample", "check": ">= 2"})


@dataclass
class TrainLoopArgs:
    train_batch_size: int = field(default=256, metadata={"help": "samples (pairs for RMs) per optimizer step, all ranks together", "check": ">= 1"})
    micro_train_batch_size: int = field(default=4, metadata={"help": "samples per micro-batch per rank (without packing)", "check": ">= 1"})
    packing_samples: bool = field(default=False, metadata={"help": "pack samples into rows (no padding), varlen attention"})
    packing_max_tokens: int | None = field(default=None, metadata={"help": "token budget of a packed micro-batch (default: micro_train_batch_size x max_len, x2 for pairs)", "check": ">= 1"})
    max_epochs: int = field(default=1, metadata={"check": ">= 1"})
    max_steps: int = field(default=-1, metadata={"help": "stop after N optimizer steps (-1: all epochs)", "check": "-1 or >= 1"})
    learning_rate: float = field(default=1e-5, metadata={"check": "> 0"})
    l2: float = field(default=0.0, metadata={"help": "weight decay", "check": ">= 0"})
    lr_warmup_ratio: float = field(default=0.03, metadata={"help": "share of the steps with a linear warm-up", "check": "[0, 1]"})
    max_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm", "check": "> 0"})
    eval_steps: int = field(default=-1, metadata={"help": "evaluate every N steps (-1: at the end only)", "check": "-1 or >= 1"})


@dataclass
class CheckpointArgs:
    save_path: str | None = field(default=None, metadata={"help": "HF folder written at the end and every --save_steps", "path": "output"})
    save_steps: int = field(default=-1, metadata={"help": "save (and checkpoint) every N steps; -1: at the end only", "check": "-1 or >= 1"})
    ckpt_path: str | None = field(default=None, metadata={"help": "resumable state; a rerun with the same command resumes", "path": "output"})
    max_ckpt_num: int = field(default=2, metadata={"help": "checkpoints kept in --ckpt_path", "check": ">= 1"})


@dataclass
class LoraArgs:
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank r (peft): train rank-r adapters on --target_modules and freeze the rest (a value model's score head still trains); 0: full fine-tuning", "check": ">= 0"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator: the update is (lora_alpha / lora_rank) * B A", "check": "> 0"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input", "check": "[0, 1)"})
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "module names that get adapters (e.g. q_proj,v_proj), or all-linear: every linear layer of the decoder"})
    save_adapter: bool = field(default=False, metadata={"help": "with --lora_rank: also write the adapter alone (peft format) to <save_path>/adapter; the folder itself always holds merged plain weights"})


def check_lora(cfg, model_flag: str = "--pretrain") -> None:
    """The LoRA flags make sense together, and every ``--target_modules`` name is a linear layer of
    the model (read from its config on the meta device: no weights load)."""
    if cfg.save_adapter and not cfg.lora_rank:
        raise ConfigError("--save_adapter needs --lora_rank > 0 (there is no adapter in full fine-tuning)")
    if not cfg.lora_rank:
        return
    if not cfg.target_modules:
        raise ConfigError("--target_modules is empty: name the modules that get adapters, or all-linear")
    from models.lora import unknown_target_modules

    path = getattr(cfg, model_flag.removeprefix("--"))
    if not Path(path).exists() and is_pending(path):
        return  # a dry run: the model is not written yet, its layers are checked when it runs
    unknown, known = unknown_target_modules(path, cfg.target_modules)
    if unknown:
        raise ConfigError(f"--target_modules {','.join(unknown)}: no such linear layer in {path} "
                          f"(it has {','.join(known)}, or use all-linear)")


def check_libraries(cfg) -> None:
    """Flags that need an optional library: say so now, not after the model loaded."""
    import importlib.util

    for flag, module, hint in (("use_wandb", "wandb", "pip install wandb"),
                               ("use_tensorboard", "tensorboard", "pip install tensorboard")):
        if getattr(cfg, flag, False) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--{flag} needs the {module} package, which is not installed ({hint})")
    if getattr(cfg, "flash_attn", False):
        import torch

        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("--flash_attn needs the flash-attn package, which is not installed "
                              "(pip install flash-attn --no-build-isolation), or drop the flag for the SDPA fallback")


def check_data_mix(files: list[str], probs: list[float], eval_files: list[str], eval_split: float,
                   names: tuple[str, str, str]) -> None:
    """One mixing weight per file (when weights are given; each > 0 by the field's rule), and one
    source of evaluation data. ``names``: (the weights' flag, what the files are, the eval files' flag)."""
    probs_flag, what, eval_flag = names
    if probs:
        check_count(probs_flag, probs, len(files), what)
    if eval_files and eval_split:
        raise ConfigError(f"{eval_flag} and --eval_split both name the evaluation data: give one")


def check_trainer_config(cfg) -> None:
    """The checks SFT, RM and DPO training share (from their ``__post_init__``): field rules, one
    positive mixing weight per dataset, one source of eval data, a global batch that splits
    over the ranks (``WORLD_SIZE``, set by torchrun) into whole micro-batches, and the LoRA flags."""
    check_fields(cfg)
    check_libraries(cfg)
    if not cfg.pretrain or not cfg.dataset:
        raise ConfigError("--pretrain and --dataset are required")
    check_data_mix(cfg.dataset, cfg.dataset_probs, cfg.eval_dataset, cfg.eval_split,
                   ("--dataset_probs", "datasets", "--eval_dataset"))
    world = world_size()
    if cfg.train_batch_size % world:
        raise ConfigError(f"--train_batch_size {cfg.train_batch_size} must divide by the {world} ranks")
    per_rank = cfg.train_batch_size // world
    if not cfg.packing_samples and per_rank % cfg.micro_train_batch_size:
        raise ConfigError(f"--micro_train_batch_size {cfg.micro_train_batch_size} must divide the "
                          f"{per_rank} samples per rank (--train_batch_size {cfg.train_batch_size} over {world} ranks)")
    if isinstance(cfg, LoraArgs):
        check_lora(cfg)
