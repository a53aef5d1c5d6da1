"""Running the trainer scripts from tests: flags, subprocesses (single or torchrun), a real kill."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from serving.ports import free_port
from training.metrics_logger import read_metrics


def base_args(model_dir, data, out: Path, **overrides) -> list[str]:
    args = {
        "pretrain": model_dir, "dataset": data, "train_batch_size": 8, "micro_train_batch_size": 4,
        "max_len": 96, "learning_rate": 1e-3, "max_epochs": 1, "logging_path": out / "log", "seed": 3,
    } | overrides
    return flags(args)


def flags(args: dict) -> list[str]:
    """``{"name": value}`` as command-line flags: ``True`` is a bare flag, ``False`` / ``None`` none."""
    flat = []
    for k, v in args.items():
        if v is True:
            flat.append(f"--{k}")
        elif v is not False and v is not None:
            flat += [f"--{k}", str(v)]
    return flat


def losses(out: Path, key="loss") -> list[float]:
    return [r[key] for r in read_metrics(out / "log") if key in r]


def run_script(script, args, nproc=1, timeout=600, check=True):
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stderr[-5000:]
    return proc




def kill_after_checkpoint(script, args, ckpt_path: Path, step: int, timeout: float = 300) -> None:
    """Start the script and SIGKILL it as soon as its checkpoint for ``step`` (or later) is complete."""
    proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    latest = Path(ckpt_path) / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= f"step_{step:06d}":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
