"""Resumable training state: sharded model + optimizer (``models.fsdp``), scheduler, RNG of every
rank, and the trainer's position (step, epoch, batches consumed), under ``--ckpt_path``.

Layout: ``ckpt_path/step_000120/{model+optim shards, trainer_state.json, scheduler.pt,
rng_rank{r}.pt}`` and ``ckpt_path/latest`` naming the newest complete one. ``latest`` is written
last and atomically, so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.distributed import barrier, is_main_process
from models.fsdp import load_sharded, save_sharded


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict[str, Any]:
    """Every RNG's state in plain types (ints, lists, tuples, ByteTensors), so that it loads with
    ``torch.load(..., weights_only=True)``: numpy's key array becomes a list of ints."""
    algorithm, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"algorithm": str(algorithm), "key": [int(k) for k in key], "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["algorithm"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_state(folder, model, optimizer, scheduler) -> None:
    """One model's resumable state into ``folder``: sharded model + optimizer, the scheduler and
    this rank's RNG. Collective over the model's ranks."""
    folder = Path(folder)
    save_sharded(folder, model, [optimizer] if optimizer is not None else [])
    torch.save(rng_state(), folder / f"rng_rank{_rank()}.pt")
    if is_main_process() and scheduler is not None:
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    barrier()


def load_model_state(folder, model, optimizer, scheduler) -> None:
    """Restore what ``save_model_state`` wrote (RNG only when this rank's file exists: it does
    not when resuming at another world size, and the RNG then restarts). Every file loads with
    ``weights_only=True``: a checkpoint cannot run code (one written before RNG states were
    stored in plain types, with a numpy array, is refused)."""
    folder = Path(folder)
    load_sharded(folder, model, [optimizer] if optimizer is not None else [])
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng_file = folder / f"rng_rank{_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))


def mark_latest(root, folder: Path, keep: int) -> None:
    """Name ``folder`` the newest complete checkpoint (atomically), then drop all but the
    ``keep`` newest. Called by one process once everything in ``folder`` is written."""
    root = Path(root)
    tmp = root / "latest.tmp"
    tmp.write_text(folder.name)
    os.replace(tmp, root / "latest")
    prefix = folder.name.rsplit("_", 1)[0]
    old = sorted(p for p in root.glob(f"{prefix}_*") if p.is_dir() and p != folder and not p.name.endswith(".tmp"))
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(ckpt_path, step: int, model, optimizer, scheduler, trainer_state: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    root = Path(ckpt_path)
    folder = root / f"step_{step:06d}"
    save_model_state(folder, model, optimizer, scheduler)
    if is_main_process():
        (folder / "trainer_state.json").write_text(json.dumps(trainer_state | {"step": step}, indent=2))
    barrier()
    if is_main_process():
        mark_latest(root, folder, keep)
    barrier()
    return folder


def latest_checkpoint(ckpt_path, state_file: str = "trainer_state.json") -> Path | None:
    """The newest complete checkpoint folder (the one ``latest`` names, if its ``state_file``,
    written last, exists), or None."""
    marker = Path(ckpt_path or "", "latest")
    if not ckpt_path or not marker.exists():
        return None
    folder = marker.parent / marker.read_text().strip()
    return folder if (folder / state_file).exists() else None


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state (with ``step``)."""
    load_model_state(folder, model, optimizer, scheduler)
    return json.loads((folder / "trainer_state.json").read_text())


def resume_position(ckpt_path, model, optimizer, scheduler, log=print) -> tuple[int, int, int] | None:
    """Load the newest checkpoint under ``ckpt_path`` if there is one; returns
    ``(step, epoch, batch index within the epoch)`` to continue from, or None for a fresh start."""
    folder = latest_checkpoint(ckpt_path)
    if folder is None:
        return None
    state = load_checkpoint(folder, model, optimizer, scheduler)
    log(f"[resume] from {folder} at step {state['step']} (epoch {state['epoch']}, batch {state['step_in_epoch']})")
    return state["step"], state["epoch"], state["step_in_epoch"]
