"""Which stages are done: ``OUT/stages/NAME.json`` marks a stage done with a fingerprint of what
made it (the command, its server's command, the content of the config and data files it names,
the run ids of the stages before it). A stage runs again when its fingerprint changed, an output
is missing, or it is forced; an interrupted resumable stage resumes with its partial outputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pipeline.stage import Stage

DATA_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl")


def marker_path(out: Path, name: str) -> Path:
    return out / "stages" / f"{name}.json"


def read_marker(out: Path, name: str) -> dict | None:
    path = marker_path(out, name)
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text())
    except ValueError:
        return None  # a marker cut short by a crash proves nothing: the stage runs again
    return marker if isinstance(marker, dict) else None


def write_marker(out: Path, name: str, marker: dict) -> None:
    path = marker_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    tmp.replace(path)  # atomic: a reader sees the old marker or the new one, never half of one


def fingerprint(stage: Stage, upstream_run_ids: dict[str, str]) -> dict:
    """What a stage's outputs depend on: its command (and its server's), the content of the config
    and data files it names (an edited YAML makes it stale), and which runs of the earlier stages
    it read. Its own outputs are not inputs."""
    files = {arg: hashlib.sha1(Path(arg).read_bytes()).hexdigest() for arg in stage.command
             if arg.endswith(DATA_SUFFIXES) and Path(arg).is_file() and Path(arg) not in stage.outputs}
    return {"command": stage.command, "env": stage.env, "server": stage.server.command() if stage.server else None,
            "files": files, "after": upstream_run_ids}


def stage_state(stage: Stage, marker: dict | None, fp: dict, forced: bool) -> str:
    """'done' (skip it), 'resume' (rerun, keeping partial outputs) or 'fresh' (delete outputs, rerun)."""
    same = marker is not None and marker.get("fingerprint") == fp
    if same and not forced and marker.get("status") == "done" and all(p.exists() for p in stage.outputs):
        return "done"
    if same and not forced and marker.get("status") == "running" and stage.resumable:
        return "resume"
    return "fresh"


def remove_outputs(stage: Stage) -> None:
    if stage.keep_outputs:
        return
    for path in stage.outputs:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
