"""The README's cluster route end to end: ``ray start --head``, then ``ray job submit`` of
fsdp_ppo_ray.py (ReMax, HF engine, tiny models), then the head is stopped.

Ray 2.60 turns token authentication on for a head started with ``ray start`` whenever a token
exists (``~/.ray/auth_token``, written by any earlier local ``ray.init()``), and the job client
only sends a token when ``RAY_AUTH_MODE=token`` is in its environment. This test does not touch
``~/.ray``: the head and the clients share a token file of their own (``RAY_AUTH_TOKEN_PATH``).

Only the head started here is stopped: ``ray start`` runs in a new session, so every process of
that head shares its process group; those, their descendants (workers, the job's driver, which
Ray starts in a session of its own) and anything naming the head's temp dir are killed. A
machine-wide ``ray stop`` would also kill other tests' clusters and is never used.
"""

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.value_model import load_value_model
from serving.ports import free_ports
from training.metrics_logger import read_metrics

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
ITERATIONS = 2

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not RAY.exists() or importlib.util.find_spec("aiohttp") is None,
                       reason="needs the ray CLI with ray[default] (the dashboard serves the job API)"),
]


def cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def head_processes(pgid: int, temp_dir: str) -> list:
    """Live processes of the head started here: its process group, anything whose command line
    names its temp dir, and every descendant of those."""
    found = {}
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(p.pid) == pgid or temp_dir in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
        except (psutil.Error, ProcessLookupError):
            continue
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                if c.status() != psutil.STATUS_ZOMBIE:
                    found[c.pid] = c
        except psutil.Error:
            continue
    return [p for p in found.values() if p.pid != os.getpid()]


def stop_head(pgid: int, temp_dir: str, grace: float = 3.0) -> list[str]:
    """SIGTERM, then SIGKILL what is left (some Ray processes ignore SIGTERM). Returns the
    processes still alive afterwards (should be none)."""
    procs = head_processes(pgid, temp_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive + head_processes(pgid, temp_dir):
        try:
            p.kill()
        except psutil.Error:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and head_processes(pgid, temp_dir):
        time.sleep(0.2)
    return [f"{p.pid} {cmdline(p)[:120]}" for p in head_processes(pgid, temp_dir)]


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict:
    """The tiny policy (random weights) and a reward model on the same backbone with a fresh,
    seeded score head: the job only has to run, not to learn."""
    root = tmp_path_factory.mktemp("job_models")
    torch.manual_seed(0)
    rm = load_value_model(str(tiny_model_dir), init_head_std=0.5)
    rm.save_pretrained(root / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "rm")
    return {"sft": tiny_model_dir, "rm": root / "rm"}


def run(cmd: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    t0 = time.time()
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    print(f"[{time.time() - t0:5.1f} s] rc={proc.returncode}: {' '.join(str(c) for c in cmd[:4])} ...")
    return proc


def test_ray_start_head_then_job_submit_runs_remax(models, tmp_path):
    # A short temp dir: Ray's unix sockets live under it (paths over ~107 characters fail).
    temp_dir = tempfile.mkdtemp(prefix="rjs_", dir="/tmp")
    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    port, dash, agent_http, agent_grpc, env_agent, metrics, client, node_mgr, obj_mgr = free_ports(9)
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    base |= {"RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_USAGE_STATS_ENABLED": "0"}
    # the head's environment is the job's (driver and workers): one thread each on 2 cores
    head_env = base | {"RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                       "WANDB_MODE": "offline"}
    client_env = base | {"RAY_AUTH_MODE": "token"}
    address = f"http://127.0.0.1:{dash}"
    # every port explicit: other Ray clusters may run on this machine (defaults would collide)
    start = [RAY, "start", "--head", "--port", port, "--dashboard-host", "127.0.0.1", "--dashboard-port", dash,
             "--dashboard-agent-listen-port", agent_http, "--dashboard-agent-grpc-port", agent_grpc,
             "--runtime-env-agent-port", env_agent, "--metrics-export-port", metrics,
             "--ray-client-server-port", client, "--node-manager-port", node_mgr, "--object-manager-port", obj_mgr,
             "--num-cpus", 5, "--temp-dir", temp_dir, "--disable-usage-stats"]  # 5 = actor, ref, reward, engine, driver
    head = subprocess.Popen([str(c) for c in start], env=head_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    pgid = head.pid  # a new session: every process the head spawns stays in this process group
    try:
        out, _ = head.communicate(timeout=120)
        assert head.returncode == 0, out[-3000:]
        assert "Ray runtime started" in out, out[-3000:]
        names = " ".join(cmdline(p) for p in head_processes(pgid, temp_dir))
        assert "gcs_server" in names and "raylet" in names, names  # the clean-up check below can see them

        # the README's bug: a client without RAY_AUTH_MODE=token sends no token and is refused
        no_token = run([RAY, "job", "submit", "--address", address, "--no-wait", "--", "true"],
                       {k: v for k, v in client_env.items() if k != "RAY_AUTH_MODE"}, timeout=120)
        assert no_token.returncode != 0
        assert "Missing authentication token" in no_token.stdout + no_token.stderr, no_token.stderr[-3000:]

        # the documented command: outputs at absolute paths; inputs may be relative to the uploaded
        # working dir; the job calls the venv's python by its full path
        submission_id = f"rjs_{secrets.token_hex(4)}"
        job = [RAY, "job", "submit", "--address", address, "--submission-id", submission_id,
               "--working-dir", ROOT, "--", sys.executable, "fsdp_ppo_ray.py",
               "--config", "configs/remax_tiny.yaml", "--rollout_backend", "hf",
               "--pretrain", models["sft"], "--reward_pretrain", models["rm"],
               "--prompt_data", "models/assets/tiny_prompts.jsonl", "--max_iterations", ITERATIONS,
               "--save_path", tmp_path / "policy", "--logging_path", tmp_path / "log"]
        submitted = run(job, client_env, timeout=420)
        log = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, log[-5000:]
        assert f"Job '{submission_id}' succeeded" in log, log[-5000:]
        assert "[ray] joined the cluster at" in log, log[-5000:]  # not a private local Ray
        assert f'[done] {{"iterations": {ITERATIONS}' in log, log[-5000:]

        # the job's record from the job API (what `ray job status` reads), with the token as a
        # bearer header; a second CLI call would cost seconds of Ray's import
        request = urllib.request.Request(f"{address}/api/jobs/{submission_id}",
                                         headers={"Authorization": f"Bearer {token_file.read_text()}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            info = json.load(r)
        assert info["status"] == "SUCCEEDED" and info["driver_exit_code"] == 0, info

        policy = tmp_path / "policy"
        assert (policy / "config.json").is_file() and list(policy.glob("*.safetensors")), sorted(policy.iterdir())
        AutoModelForCausalLM.from_pretrained(policy)  # a plain HF folder that loads
        assert [r["step"] for r in read_metrics(tmp_path / "log")] == list(range(ITERATIONS + 1))
    finally:
        if head.poll() is None:
            head.kill()
        left = stop_head(pgid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the head started here survived: {left}"
    assert not head_processes(pgid, temp_dir)
