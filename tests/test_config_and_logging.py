import json
from dataclasses import dataclass, field

import pytest

from training.config import DistributedArgs, LoggingArgs, parse_config
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


def test_yaml_errors_name_file_and_key(tmp_path):
    yml = tmp_path / "bad.yaml"
    yml.write_text("pretrain: x\nlearnin_rate: 1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown option\(s\) learnin_rate"):
        parse_config(DemoConfig, ["--config", str(yml)])
    yml.write_text("zero_stage: three\n")
    with pytest.raises(ValueError, match=r"bad.yaml: option 'zero_stage': expected int"):
        parse_config(DemoConfig, ["--config", str(yml)])


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
