"""One stage of a pipeline: a plain command that a user can copy and run alone."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from serving.openai_server import VLLMServer


@dataclass
class Stage:
    name: str
    title: str
    command: list[str]
    outputs: list[Path]  # deleted before a fresh run; all must exist for the stage to count as done
    resumable: bool = False  # an interrupted attempt of the same command keeps its partial outputs
    requires: list[Path] = field(default_factory=list)  # files the command needs that a checkout may lack
    server: VLLMServer | None = None  # running while the command runs (kept up for the next stage that needs it too)
    env: dict[str, str] = field(default_factory=dict)  # set for the command (and shown before it)
    keep_outputs: bool = False  # the command itself skips finished work (a shared model cache): never delete
    marker: str = ""  # its marker and log file name (default: name), for two pipelines sharing one folder

    @property
    def key(self) -> str:
        return self.marker or self.name

    def shell_command(self) -> str:
        return shell_line(self.command, self.env)


@dataclass
class StageResult:
    name: str
    status: str  # ran | resumed | skipped | not run
    seconds: float | None  # of the run that made the outputs (also for skipped stages)
    log: Path | None


class StageFailed(Exception):
    def __init__(self, stage: Stage, reason: str, log: Path | None):
        super().__init__(reason)
        self.stage, self.reason, self.log = stage, reason, log


def shell_line(command: list[str], env: dict[str, str] | None = None) -> str:
    """A command as a shell line to copy: environment settings first."""
    return shlex.join([f"{k}={v}" for k, v in (env or {}).items()] + command)
