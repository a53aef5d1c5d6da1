import json
from dataclasses import asdict, dataclass, field

import pytest

from training.config import ConfigError, DistributedArgs, LoggingArgs, build_parser, check_fields, parse_config
from training.metrics_logger import MetricsLogger, read_metrics


@dataclass
class DemoConfig(DistributedArgs, LoggingArgs):
    pretrain: str = field(default="base", metadata={"help": "model folder"})
    learning_rate: float = 1e-5
    packing_samples: bool = False
    max_len: int | None = None


def test_defaults_yaml_then_flags(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("pretrain: from_yaml\nlearning_rate: 3.0e-4\nzero_stage: 2\npacking_samples: true\n")
    cfg = parse_config(DemoConfig, ["--config", str(yml), "--zero_stage", "3", "--max_len", "128"])
    assert cfg.pretrain == "from_yaml"
    assert cfg.learning_rate == pytest.approx(3e-4)
    assert cfg.zero_stage == 3  # flag beats YAML
    assert cfg.packing_samples is True and cfg.max_len == 128
    assert parse_config(DemoConfig, ["--no-packing_samples", "--config", str(yml)]).packing_samples is False
    assert parse_config(DemoConfig, []).pretrain == "base"
    assert parse_config(DemoConfig, ["--packing_samples"]).packing_samples is True


@dataclass
class EvalChoiceConfig:
    """Two ways to name the evaluation data (a ``one_of`` group), as the trainers and RL have."""

    eval_files: list[str] = field(default_factory=list, metadata={"one_of": "eval data"})
    eval_split: float = field(default=0.0, metadata={"one_of": "eval data"})
    seed: int = 1

    def __post_init__(self):
        check_fields(self)
        if self.eval_files and self.eval_split:
            raise ConfigError("--eval_files and --eval_split both name the evaluation data: give one")


def test_a_flag_replaces_its_alternatives_from_yaml_not_from_the_command_line(tmp_path, capsys):
    """The demo's RL stage: the YAML holds ``eval_split: 0.1`` (the standalone default), the
    command line names held-out files. The user's flag wins, with one line saying so; both on the
    command line, or both in the YAML, is still the user's conflict."""
    yml = tmp_path / "rl.yaml"
    yml.write_text("eval_split: 0.1\nseed: 7\n")
    cfg = parse_config(EvalChoiceConfig, ["--config", str(yml), "--eval_files", "held.jsonl"], paths=False)
    assert cfg.eval_files == ["held.jsonl"] and cfg.eval_split == 0.0 and cfg.seed == 7
    assert f"[config] --eval_files from the command line replaces eval_split: 0.1 from {yml}" in capsys.readouterr().out
    # the other way round: a flag split replaces YAML files
    yml.write_text("eval_files: [a.jsonl]\n")
    cfg = parse_config(EvalChoiceConfig, ["--config", str(yml), "--eval_split", "0.2"], paths=False)
    assert cfg.eval_files == [] and cfg.eval_split == 0.2
    # a flag at its default value (0: no split) asks for nothing, so the YAML's files stay
    assert parse_config(EvalChoiceConfig, ["--config", str(yml), "--eval_split", "0"], paths=False).eval_files == ["a.jsonl"]
    with pytest.raises(ConfigError, match="both name the evaluation data"):
        parse_config(EvalChoiceConfig, ["--eval_files", "a.jsonl", "--eval_split", "0.1"], paths=False)
    yml.write_text("eval_files: [a.jsonl]\neval_split: 0.1\n")
    with pytest.raises(ConfigError, match="both name the evaluation data"):
        parse_config(EvalChoiceConfig, ["--config", str(yml)], paths=False)


def test_every_entry_point_config_declares_its_eval_alternatives():
    """The groups the shipped configs rely on: a trainer's eval files or split, RL's eval prompts or split."""
    import dataclasses

    from rl.config import RLConfig
    from train_dpo import DPOConfig
    from train_rm_llama2 import RMConfig
    from train_sft import SFTConfig

    groups = lambda cls: {f.name: f.metadata.get("one_of") for f in dataclasses.fields(cls) if f.metadata.get("one_of")}  # noqa: E731
    assert groups(RLConfig) == {"eval_prompt_data": "eval data", "eval_split": "eval data"}
    for cls in (SFTConfig, RMConfig, DPOConfig):
        assert groups(cls) == {"eval_dataset": "eval data", "eval_split": "eval data"}


def test_dry_run_checks_then_exits_without_running(tmp_path, capsys, monkeypatch):
    """``--dry_run``: every check (values, paths, the entry point's own), one line, exit 0; a missing
    input passes only when it lies under RLHF_PENDING_PATHS, and only in a dry run."""
    from training.config import PENDING_PATHS_ENV, is_pending

    seen = []
    argv = ["--pretrain", str(tmp_path / "later" / "sft"), "--dry_run"]
    with pytest.raises(ConfigError, match="no such folder"):
        parse_config(PathConfig, argv, checks=[seen.append])
    monkeypatch.setenv(PENDING_PATHS_ENV, str(tmp_path / "later"))
    with pytest.raises(SystemExit) as e:
        parse_config(PathConfig, argv, checks=[seen.append])
    assert e.value.code == 0 and len(seen) == 1 and seen[0].pretrain.endswith("sft")
    out = capsys.readouterr().out
    assert out.startswith("[dry_run] ") and "every option checked; nothing was run" in out
    with pytest.raises(ConfigError, match="no such folder"):  # not a dry run: the pending list means nothing
        parse_config(PathConfig, argv[:-1])
    assert not is_pending(tmp_path / "later" / "sft")

    def too_big_for_this_machine(cfg):
        raise ConfigError("the placement asks for 9 GPUs")

    with pytest.raises(ConfigError, match="9 GPUs"):  # an entry point's own checks run in a dry run too
        parse_config(PathConfig, argv, checks=[too_big_for_this_machine])


@dataclass
class PathConfig:
    pretrain: str = field(default="", metadata={"path": "model"})


def test_yaml_errors_name_file_and_key(tmp_path):
    yml = tmp_path / "bad.yaml"
    yml.write_text("pretrain: x\nlearnin_rate: 1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown option\(s\) learnin_rate"):
        parse_config(DemoConfig, ["--config", str(yml)])
    yml.write_text("zero_stage: three\n")
    with pytest.raises(ValueError, match=r"bad.yaml: option 'zero_stage': expected int"):
        parse_config(DemoConfig, ["--config", str(yml)])


@dataclass
class ListConfig:
    files: list[str] = field(default_factory=list, metadata={"help": "data files", "path": "data"})
    weights: list[float] = field(default_factory=list, metadata={"help": "one per file", "check": "> 0"})
    sizes: list[int] = field(default_factory=lambda: [1, 4])

    def __post_init__(self):
        check_fields(self)


def test_list_fields_from_flags_yaml_lists_and_yaml_comma_strings(tmp_path):
    cfg = parse_config(ListConfig, ["--files", "a.jsonl, b.jsonl,", "--weights", "1,0.5", "--sizes", "2,8"], paths=False)
    assert (cfg.files, cfg.weights, cfg.sizes) == (["a.jsonl", "b.jsonl"], [1.0, 0.5], [2, 8])
    assert parse_config(ListConfig, [], paths=False).sizes == [1, 4]
    yml = tmp_path / "c.yaml"
    yml.write_text("files: [a.jsonl, b.jsonl]\nweights: [1, 0.5]\nsizes: 3\n")  # a YAML list; one value
    cfg = parse_config(ListConfig, ["--config", str(yml)], paths=False)
    assert (cfg.files, cfg.weights, cfg.sizes) == (["a.jsonl", "b.jsonl"], [1.0, 0.5], [3])
    yml.write_text("files: a.jsonl,b.jsonl\nweights: 1,0.5\n")  # the flag's comma string
    cfg = parse_config(ListConfig, ["--config", str(yml)], paths=False)
    assert (cfg.files, cfg.weights) == (["a.jsonl", "b.jsonl"], [1.0, 0.5])
    cfg = parse_config(ListConfig, ["--config", str(yml), "--weights", "2,3"], paths=False)  # flag beats YAML
    assert (cfg.files, cfg.weights) == (["a.jsonl", "b.jsonl"], [2.0, 3.0])
    assert json.loads(json.dumps(asdict(cfg)))["weights"] == [2.0, 3.0]  # serialises as a list


def test_list_field_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"^--weights: 'x' is not a number$"):
        parse_config(ListConfig, ["--weights", "1,x"], paths=False)
    with pytest.raises(ConfigError, match=r"^--sizes: '2.5' is not a whole number$"):
        parse_config(ListConfig, ["--sizes", "2.5"], paths=False)
    with pytest.raises(ConfigError, match=r"^--weights: every value must be > 0, got -1.0$"):
        parse_config(ListConfig, ["--weights", "1,-1"], paths=False)
    with pytest.raises(ConfigError, match=r"^--weights: every value must be a finite number, got nan$"):
        parse_config(ListConfig, ["--weights", "nan"], paths=False)
    yml = tmp_path / "c.yaml"
    yml.write_text("weights: [1, half]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: option 'weights': 'half' is not a number"):
        parse_config(ListConfig, ["--config", str(yml)], paths=False)
    yml.write_text("files: [a.jsonl, 3]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: option 'files': 3 is not a string"):
        parse_config(ListConfig, ["--config", str(yml)], paths=False)
    yml.write_text("weights: [true]\n")
    with pytest.raises(ConfigError, match=r"option 'weights': True is not a number"):
        parse_config(ListConfig, ["--config", str(yml)], paths=False)


def test_list_fields_in_code_paths_and_help(tmp_path):
    cfg = ListConfig(files="a.jsonl,b.jsonl", weights=(1, 2))  # built in code: the same rules
    assert (cfg.files, cfg.weights) == (["a.jsonl", "b.jsonl"], [1.0, 2.0])
    with pytest.raises(ConfigError, match="--weights: 'x' is not a number"):
        ListConfig(weights="x")
    (tmp_path / "a.jsonl").write_text("{}\n")
    parse_config(ListConfig, ["--files", str(tmp_path / "a.jsonl")])  # each element's path is checked
    with pytest.raises(ConfigError, match=r"--files .*nope.jsonl: no such file or folder"):
        parse_config(ListConfig, ["--files", f"{tmp_path / 'a.jsonl'},{tmp_path / 'nope.jsonl'}"])
    text = " ".join(build_parser(ListConfig).format_help().split())
    assert "--sizes SIZES[,...] comma-separated (default: 1,4)" in text
    assert "data files; comma-separated (default: none)" in text


def test_every_yaml_in_configs_parses():
    """The shipped YAML files stay in step with their dataclasses."""
    from benchmarks.packing import PackingBenchmarkConfig
    from training.config import load_yaml
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    load_yaml(PackingBenchmarkConfig, root / "benchmark_packing.yaml")


def test_metrics_logger_jsonl_tensorboard_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    import torch

    with MetricsLogger(tmp_path, use_tensorboard=True, use_wandb=True, config={"lr": 1.0}) as log:
        log.log(1, {"loss": torch.tensor(0.5), "acc": 0.25})
        log.log(2, {"loss": float("nan")})
    rows = read_metrics(tmp_path)
    assert rows[0]["step"] == 1 and rows[0]["loss"] == 0.5 and rows[0]["acc"] == 0.25
    assert rows[1] == {"step": 2, "time": rows[1]["time"], "loss": None}
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1.0}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list(tmp_path.glob("wandb/offline-run-*"))
    # a second logger on the same folder appends (resumed runs keep their history)
    with MetricsLogger(tmp_path) as log:
        log.log(3, {"loss": 0.1})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_disabled_logger_on_other_ranks_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "x", enabled=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "x").exists()
