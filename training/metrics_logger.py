"""Metrics to ``metrics.jsonl`` (one JSON object per logged step, always with ``step``), and
optionally to wandb and tensorboard. Only the main process writes; others hold a no-op logger."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers; NaN/inf -> None (JSON has no NaN)."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(
        self,
        logging_path: str | os.PathLike | None,
        *,
        enabled: bool = True,
        use_wandb: bool = False,
        use_tensorboard: bool = False,
        wandb_project: str = "self-ref-rlhf",
        wandb_run_name: str | None = None,
        config: dict | None = None,
        resume_step: int | None = None,
    ):
        self.enabled = enabled and logging_path is not None
        self._file = self._wandb = self._tb = None
        if not self.enabled:
            return
        self.path = Path(logging_path)
        self.path.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file = open(self.path / "metrics.jsonl", "a", buffering=1)  # line-buffered: survives kills
        if config is not None:
            (self.path / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if use_wandb:
            import wandb

            self._wandb = wandb.init(
                project=wandb_project, name=wandb_run_name, config=config, dir=str(self.path),
                resume="allow",
            )
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """A resumed run re-logs the steps after its checkpoint: drop the killed run's rows for
        them so metrics.jsonl reads like one uninterrupted run."""
        path = self.path / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(logging_path: str | os.PathLike) -> list[dict]:
    with open(Path(logging_path) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
