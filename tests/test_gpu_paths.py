"""The GPU code paths, run on CPU wherever their mechanism is the same (docs/gpu.md lists each
CUDA-only branch and the test that covers it). A fake stands in only for what cannot run here:

* NCCL's lack of a CPU path: ``tests/fake_accelerator.py``, a process group for the ``lazy``
  device only (a real second device type of CPU torch);
* GPUs for Ray's placement: a local Ray told it has 4 GPUs (logical resources);
* flash-attn's half-precision-only kernels: a stand-in attention that refuses fp32 like them and
  computes the exact varlen SDPA otherwise.

The vLLM engine core in its own process (as on every GPU run) is ``tests/test_rollout.py``'s
engine, with the broadcast weight sync through it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# --- every collective on the process group's device --------------------------------------------


def test_collectives_take_their_tensors_on_the_groups_device():
    """The trainers' reductions (tokens processed, global means of step statistics, SFT's and
    DPO's evaluation sums) start from CPU tensors. Under a group with no CPU path, as NCCL's on
    2+ GPUs, each must still reach the collective on the group's device: the old
    ``all_reduce_mean`` handed them over as they were ("No backend type associated with device
    type cpu", the NCCL error, at the first logging step of every run on 2+ GPUs)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_accelerator.py")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["collective_device"] == "lazy"
    assert got["devices"] == ["lazy:0"]  # nothing else ever reached the group
    # and the values are right: identical ranks, so the mean is the value and the sum twice it
    assert got["mean_of_cpu_scalar"] == 3.0 and got["sum_of_cpu_float64"] == [2.0] * 4
    assert got["global_means"] == {"loss": 3.0}  # 6 summed over 2 ranks, over 4 samples


def test_only_the_device_aware_helpers_call_collectives():
    """Every tensor collective of the trainers goes through ``models.distributed`` (which moves it
    to ``collective_device``); the weight broadcast allocates on its group's device itself. A new
    ``dist.all_reduce(cpu_tensor)`` elsewhere would pass every gloo test and fail on NCCL."""
    allowed = {ROOT / "models" / "distributed.py", ROOT / "rl" / "weight_broadcast.py"}
    pattern = re.compile(r"\bdist\.(all_reduce|reduce|all_gather|all_gather_into_tensor|reduce_scatter|"
                         r"reduce_scatter_tensor|broadcast|gather|scatter|all_to_all)\(")
    offenders = []
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("[!.]*/**/*.py")):
        if path in allowed or path.parts[len(ROOT.parts)] in ("tests", "benchmarks", ".venv", "out"):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "collectives outside the device-aware helpers:\n" + "\n".join(offenders)


# --- one dtype policy: fp32 master weights, bf16 compute, also when flash-attn is selected ------


def test_flash_attention_keeps_fp32_master_weights_and_computes_in_bf16(tiny_model_dir):
    """flash-attn is selected automatically on CUDA when installed (the 7B configs also ask for
    it). Its kernels take bf16 only, which the old loader met by loading every model in bf16:
    trainable weights and Adam's state in bf16, so at lr 1e-6 most updates round to nothing, with
    no error. Now the weights stay fp32 (Adam's state with them) and FSDP2's mixed precision
    computes in bf16: the stand-in kernel, which refuses fp32 as flash-attn does, sees bf16 only.
    The reward model's LM head (``--loss logexpwithlm``) computes in bf16 with the rest."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_flash_attention.py"), str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("actor", "reward_model_with_lm_head"):
        model = seen[name]
        assert model["attention"] == "flash_attention_2" and model["compute_bf16"] is True, name
        assert model["parameters"] == ["float32"], name  # fp32 master weights
        assert model["optimizer_state"] == ["float32"], name  # Adam's moments with them
        assert model["grad_norm"] > 0 and model["loss"] == model["loss"], name  # a real, finite step
    assert seen["attention_input_dtypes"] == ["bfloat16"]


# --- tensor-parallel vLLM engines get their GPUs ---------------------------------------------------


class EngineProbe:
    """Stands in for ``rl.workers.RolloutWorker`` (same constructor): reports where Ray put it and
    what the engine would be told, without starting vLLM."""

    def __init__(self, backend: str, model_dir: str, **kwargs):
        import os

        import ray

        pg = ray.util.get_current_placement_group()
        self.seen = {"kwargs": kwargs, "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                     "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                     "bundle_indices": os.environ.get("VLLM_RAY_BUNDLE_INDICES"),
                     "per_worker_gpus": os.environ.get("VLLM_RAY_PER_WORKER_GPUS"),
                     "placement_group": pg.id.hex() if pg is not None else None,
                     "bundles": pg.bundle_specs if pg is not None else None}

    def report(self) -> dict:
        return self.seen


@pytest.fixture(scope="module")
def ray_with_4_gpus():
    ray = pytest.importorskip("ray")
    # RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1: Ray's behaviour before ray-project/ray#54868 (and an
    # option of Ray 2.60): an actor that asked for no GPU gets CUDA_VISIBLE_DEVICES="". Ray 2.60's
    # default leaves it as the raylet had it: every GPU of the node visible to that actor.
    ray.init(address="local", num_cpus=8, num_gpus=4, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}})
    yield ray
    ray.shutdown()


def _rl_config(tmp_path, tiny_model_dir, **flags):
    from rl.config import RLConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"message": "hi"}\n')
    return RLConfig(pretrain=str(tiny_model_dir), reward_pretrain=[str(tiny_model_dir)], prompt_data=[str(prompts)],
                    rollout_batch_size=2, train_batch_size=2, micro_rollout_batch_size=2, actor_train_batch_size=2,
                    critic_train_batch_size=2,
                    **flags)


def test_tensor_parallel_engines_get_their_gpus(ray_with_4_gpus, tmp_path, tiny_model_dir):
    """Two engines of tensor parallelism 2 on a (logical) 4-GPU Ray: each gets a placement group
    of 2 GPU bundles that its actor sits in (and vLLM's Ray executor places its 2 workers on:
    VLLM_RAY_BUNDLE_INDICES), its CUDA_VISIBLE_DEVICES is left alone even where Ray blanks it for
    actors without GPUs, and the engine is told it runs on CUDA. Before, the actor asked for
    num_gpus=0 and nothing else: where Ray blanks CUDA_VISIBLE_DEVICES (shown here on 8b0945c's
    options: ''), the engine took the CPU settings and dropped tensor parallelism, and the weight
    group waited for members that never came (30 minutes); under Ray 2.60's default it saw every
    GPU of its node and vLLM had to find GPUs for its workers on its own."""
    from rl.cluster import start_engines, local_cpu_slots

    ray = ray_with_4_gpus
    cfg = _rl_config(tmp_path, tiny_model_dir, vllm_num_engines=2, vllm_tensor_parallel_size=2, colocate_actor_ref=True)
    engines, pools = start_engines(cfg, use_gpu=True, env={"PYTHONPATH": str(ROOT)}, worker_cls=EngineProbe)
    try:
        seen = ray.get([e.report.remote() for e in engines], timeout=120)
        assert len(pools) == 2 and len({s["placement_group"] for s in seen}) == 2
        for s, pool in zip(seen, pools):
            assert s["placement_group"] == pool.placement_group.id.hex()
            assert s["bundles"] == [{"CPU": 1.0, "GPU": 1.0}] * 2
            assert s["bundle_indices"] == "0,1" and s["per_worker_gpus"] == "1"
            assert s["cuda_visible_devices"] != ""  # not blanked by Ray
            assert s["kwargs"]["cuda"] is True and s["kwargs"]["tensor_parallel_size"] == 2
            assert s["kwargs"]["distributed_executor_backend"] == "ray"
        assert ray.available_resources().get("GPU", 0) == 0  # the 4 GPUs are the engines'
        # a local Ray is sized with a CPU slot per engine bundle
        assert local_cpu_slots(cfg) == 1 + 1 + 1 + 4 + 1  # actor (ref colocated), critic, reward, 2 x 2 engine bundles, driver
    finally:
        for e in engines:
            ray.kill(e)
        for p in pools:
            p.remove()

    # one GPU per engine: the actor asks Ray for it; Ray sets its CUDA_VISIBLE_DEVICES
    cfg = _rl_config(tmp_path, tiny_model_dir, vllm_num_engines=2)
    engines, pools = start_engines(cfg, use_gpu=True, env={"PYTHONPATH": str(ROOT)}, worker_cls=EngineProbe)
    try:
        seen = ray.get([e.report.remote() for e in engines], timeout=120)
        assert pools == [] and sorted(g for s in seen for g in s["gpu_ids"]) == ["0", "1"]
        assert all(s["cuda_visible_devices"] in ("0", "1") and "cuda" not in s["kwargs"] for s in seen)
    finally:
        for e in engines:
            ray.kill(e)


def test_tensor_parallelism_on_a_cpu_machine_is_refused_before_ray(tmp_path, tiny_model_dir):
    from rl.config import check_resources
    from training.config import ConfigError

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: tensor parallelism is allowed")
    cfg = _rl_config(tmp_path, tiny_model_dir, vllm_tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="--vllm_tensor_parallel_size 2 needs GPUs"):
        check_resources(cfg)


# --- the weight broadcast's receiver holds one tensor at a time -----------------------------------


def test_the_broadcast_receiver_holds_one_tensor_at_a_time_and_drains_what_it_refuses():
    """The receiving vLLM worker used to take the whole state dict onto its GPU before loading (a
    second copy of the model); ``TensorStream`` hands vLLM's ``load_weights`` one tensor per
    broadcast, and what a refused (or failed) load leaves is taken off the wire and dropped, so
    the sender's broadcasts complete and the next sync works. Two members over gloo on loopback."""
    import threading
    import weakref

    from rl.weight_broadcast import BroadcastGroup

    sender, receiver = BroadcastGroup(), BroadcastGroup()
    host, port, token = sender.open(world_size=2)
    joining = threading.Thread(target=receiver.join, args=(host, port, token, 1, 2, "gloo"))
    joining.start()
    sender.join(host, port, token, 0, 2, "gloo")
    joining.join(timeout=60)
    state = {f"layer{i}.weight": torch.full((64, 64), float(i)) for i in range(8)}

    def send():
        thread = threading.Thread(target=sender.send, args=(state,))
        thread.start()
        return thread

    try:
        sending = send()
        stream = receiver.receive_tensors(receiver.receive_specs())
        alive, values, most_alive = [], {}, 0
        for name, tensor in stream:  # as vLLM's load_weights consumes it: copy, let go
            values[name] = tensor.clone()
            alive.append(weakref.ref(tensor))
            del tensor
            # the stream keeps none; gloo's worker thread may still hold the last broadcast's tensor
            most_alive = max(most_alive, sum(r() is not None for r in alive))
        sending.join(timeout=60)
        assert most_alive <= 2, f"{most_alive} of {len(state)} received tensors alive at once"
        assert values.keys() == state.keys() and all(torch.equal(values[k], state[k]) for k in state)

        sending = send()  # refused after two tensors: the rest is drained, the sender finishes
        stream = receiver.receive_tensors(receiver.receive_specs())
        next(stream), next(stream)
        assert stream.drain() == 6
        sending.join(timeout=60)
        assert not sending.is_alive()

        sending = send()  # and the group is in step for the next sync
        assert dict(receiver.receive()).keys() == state.keys()
        sending.join(timeout=60)
    finally:
        receiver.close()
        sender.close()


def test_gpu_check_says_plainly_that_there_is_no_gpu():
    """`make gpu-check` on a machine without a GPU checks nothing, says so, and exits 0."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: make gpu-check runs the checks")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("[gpu-check] no GPU here (torch.cuda.is_available() is False): nothing was "
                                   "checked. The CPU tests cover what runs without one (docs/gpu.md).")


def test_vllm_engine_settings_per_device():
    """The CUDA engine: bf16, CUDA graphs, tensor parallelism and the memory share; the CPU one:
    fp32, eager, whole-prompt prefills (``serving.vllm_settings``)."""
    from serving.vllm_settings import offline_engine_kwargs

    gpu = offline_engine_kwargs("m", max_model_len=2048, cuda=True, tensor_parallel_size=2, gpu_memory_utilization=0.4)
    assert gpu == {"model": "m", "dtype": "bfloat16", "seed": 0, "max_model_len": 2048, "enforce_eager": False,
                   "tensor_parallel_size": 2, "gpu_memory_utilization": 0.4}
    cpu = offline_engine_kwargs("m", max_model_len=2048, cuda=False, tensor_parallel_size=2)
    assert cpu["dtype"] == "float32" and cpu["enforce_eager"] is True and "tensor_parallel_size" not in cpu
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] >= 2048


def test_every_documented_lmdeploy_server_asks_for_logprobs():
    """lmdeploy's PyTorch backend answers every request for log-probs with HTTP 400 unless started
    with --logprobs-mode (lmdeploy 0.16, serve/openai/chat_completions/validation.py); every
    lmdeploy server command the docs give passes it."""
    commands = []
    for path in [ROOT / "README.md", ROOT / "configs" / "judge_lmdeploy.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ").replace("\n", " ")  # a command ends at ` & or >
        commands += [(path.name, m.group(0)) for m in re.finditer(r"lmdeploy serve api_server[^`&>]*", text)]
    assert len(commands) >= 5
    missing = [f"{name}: {cmd[:80]}" for name, cmd in commands if "--logprobs-mode raw_logprobs" not in cmd]
    assert not missing, missing


def test_the_cuda_install_pins_the_tested_set_and_no_gpu_config_requires_flash_attn():
    """install.sh on CUDA: torch 2.13.0 and the gpu extra (vllm 0.32.0, which pins that torch), then
    flash-attn built without isolation (PyPI has its source only, and the build imports torch, so
    an extra could never install it). A failed build is one line, and no shipped config insists on
    flash-attn (it is picked when installed), so the documented GPU commands still run."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"vllm==0.32.0", "torch==2.13.0"} <= set(extras["gpu"]) and not any("flash" in d for d in extras["gpu"])
    script = (ROOT / "install.sh").read_text()
    cuda = script.split("nvidia-smi -L")[1].split("\nelse")[0]
    assert '"torch==2.13.0"' in cuda and '".[gpu,dev]"' in cuda
    assert 'FLASH_ATTN=flash-attn==2.8.3.post2' in script and '--no-build-isolation "$FLASH_ATTN"' in cuda
    assert "did not build (log:" in cuda
    insisting = [p.name for p in (ROOT / "configs").glob("*.yaml") if re.search(r"^flash_attn:\s*true", p.read_text(), re.M)]
    assert insisting == []
