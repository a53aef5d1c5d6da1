"""bf16 on CPU (tiny model): the FSDP2 mixed-precision policy really computes in bf16, keeps fp32
master weights, gradients and optimizer states, stays within bf16 tolerance of fp32, equals the
frozen-worker path (weights loaded in bf16), and trains the same on 2 gloo processes as on 1."""

import json

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from models.actor import Actor
from models.distributed import init_distributed
from models.fsdp import full_state_dict, shard_model
from models.packing import PackedBatch
from models.value_model import RewardModel
from tests.fsdp_reference import actor_step, global_batch, make_optimizer, reward_step
from tests.test_fsdp import run_torchrun

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%); on the 2-layer tiny model the
# log-probs move by ~1e-3 nats. fp32 FSDP vs plain fp32 is ~1e-7, so these bounds separate the two.
LOGPROB_TOL = 0.02
SCORE_TOL = 0.02
pytestmark = pytest.mark.filterwarnings("ignore:--bf16 on a CPU without")  # the slow-CPU notice


@pytest.fixture(scope="module")
def world():
    """FSDP2 needs a process group: a private world of one in this process, removed afterwards
    (trainers called in-process by later tests make their own)."""
    created = not dist.is_initialized()
    env = init_distributed()
    yield env
    if created:
        dist.destroy_process_group()


def _batch(model_dir):
    seqs = global_batch("actor", model_dir)
    batch = PackedBatch.from_sequences(seqs)
    mask = torch.cat([torch.arange(len(s)) >= len(s) // 2 for s in seqs])[None]
    return batch, mask


def _sharded(module, bf16):
    module.model.config.use_cache = False
    return shard_model(module, zero_stage=3, device=torch.device("cpu"), bf16=bf16, hf_model=module.model)


def test_bf16_forward_within_tolerance_of_fp32(world, tiny_model_dir):
    batch, mask = _batch(tiny_model_dir)
    with torch.no_grad():
        fp32 = _sharded(Actor.from_pretrained(tiny_model_dir), False).eval()
        mixed = _sharded(Actor.from_pretrained(tiny_model_dir), True).eval()  # fp32 weights, bf16 compute
        frozen = _sharded(Actor.from_pretrained(tiny_model_dir, dtype=torch.bfloat16), True).eval()  # RL ref worker
        ref = fp32(batch, token_mask=mask).log_probs[mask]
        lp_mixed = mixed(batch, token_mask=mask).log_probs[mask]
        lp_frozen = frozen(batch, token_mask=mask).log_probs[mask]
    diff = (lp_mixed - ref).abs()
    assert diff.max() <= LOGPROB_TOL, f"bf16 log-probs off by {diff.max():.4f}"
    assert diff.max() > 1e-5  # bf16 really ran (fp32 would agree to ~1e-7)
    # the policy rounds fp32 weights to the same bf16 values that loading in bf16 gives
    assert torch.equal(lp_frozen, lp_mixed)

    with torch.no_grad():
        torch.manual_seed(0)
        rm32 = RewardModel.from_pretrained(tiny_model_dir)
        torch.manual_seed(0)
        rm16 = RewardModel.from_pretrained(tiny_model_dir)
        s32 = _sharded(rm32, False).eval()(batch)
        s16 = _sharded(rm16, True).eval()(batch)
    assert s16.dtype == torch.float32  # the head casts for the losses
    assert (s16 - s32).abs().max() <= SCORE_TOL * s32.std()
    assert (s16 - s32).abs().max() > 1e-6


def test_mixed_precision_keeps_fp32_master_weights_and_states(world, tiny_model_dir):
    torch.manual_seed(0)
    actor = _sharded(Actor.from_pretrained(tiny_model_dir), True).train()
    w0 = actor.model.model.layers[0].mlp.up_proj.weight.to_local().detach().clone()
    opt = torch.optim.AdamW(actor.parameters(), lr=1e-5)
    seen = []
    probe = actor.model.model.layers[0].self_attn.q_proj
    hook = probe.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    batch, mask = _batch(tiny_model_dir)
    loss = -(actor(batch, token_mask=mask).log_probs * mask).sum() / mask.sum()
    loss.backward()
    hook.remove()
    assert seen == [torch.bfloat16]  # the layer computed with bf16 weights
    assert {p.grad.to_local().dtype for p in actor.parameters()} == {torch.float32}  # fp32 reduction and grads
    opt.step()
    assert {p.to_local().dtype for p in actor.parameters()} == {torch.float32}
    states = {v.dtype for s in opt.state.values() for v in s.values() if torch.is_tensor(v)}
    assert states == {torch.float32}
    # why fp32 masters: Adam's first step moves each weight by ~lr = 1e-5, below half a bf16 unit
    # of most weights here (|w| 2^-9), so bf16 masters would round most updates away; fp32 keep all
    w1 = actor.model.model.layers[0].mlp.up_proj.weight.to_local().detach()
    step = (w1 - w0).abs()
    assert (step > 0).float().mean() > 0.99
    assert (step < w0.abs() * 2.0**-9).float().mean() > 0.5
    assert ((w1.bfloat16() == w0.bfloat16()) & (step > 0)).float().mean() > 0.5  # what bf16 would have lost


def test_cpu_defaults_are_fp32_and_bf16_is_available(tiny_model_dir, tmp_path, monkeypatch):
    """The defaults follow benchmarks/results/bf16_cpu.json (bf16 slower at every batched stage on
    this AVX2 CPU); asking for bf16 gets it, everywhere."""
    import models.fsdp
    from serving.vllm_settings import engine_dtype
    from rl.config import RLConfig
    from serving.openai_server import VLLMServer
    from training.config import DistributedArgs

    assert DistributedArgs().bf16 is False and RLConfig.__dataclass_fields__["bf16"].default is False
    assert engine_dtype() == "float32" and engine_dtype("bfloat16") == "bfloat16"

    def dtype_arg(server):
        cmd = server.command()
        return cmd[cmd.index("--dtype") + 1]

    assert dtype_arg(VLLMServer(tiny_model_dir, port=24390, log_path=tmp_path / "a.log")) == "float32"
    assert dtype_arg(VLLMServer(tiny_model_dir, port=24390, log_path=tmp_path / "b.log", dtype="bfloat16")) == "bfloat16"

    assert models.fsdp.mixed_precision_policy(False, torch.device("cpu")) is None
    monkeypatch.setattr(models.fsdp, "_warned_slow_bf16", False)  # the notice is given once per process
    if models.fsdp.cpu_has_native_bf16():
        mp = models.fsdp.mixed_precision_policy(True, torch.device("cpu"))
    else:
        with pytest.warns(UserWarning, match="slower than fp32"):
            mp = models.fsdp.mixed_precision_policy(True, torch.device("cpu"))
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)


@pytest.fixture(scope="module")
def two_process_bf16_run(tiny_model_dir, tmp_path_factory):
    """One SGD step of the actor and the reward model on 2 gloo ranks under the bf16 policy
    (tests/fsdp_worker.py), then its sharded save / reload / continue checks."""
    out = tmp_path_factory.mktemp("bf16_two_process")
    run_torchrun(2, "--model_dir", str(tiny_model_dir), "--out", str(out), "--zero_stage", "3", "--steps", "1", "--bf16")
    return out


@pytest.mark.parametrize("kind", ["actor", "reward"])
def test_two_process_mixed_precision_matches_single_process(world, tiny_model_dir, two_process_bf16_run, kind):
    run_dir = two_process_bf16_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["world_size"] == 2
    assert report[f"{kind}_reload_max_diff"] == 0.0  # bf16 runs resume exactly too
    assert report[f"{kind}_continue_max_diff"] == 0.0

    def one_process(bf16: bool) -> dict:
        torch.manual_seed(0)
        ref = Actor.from_pretrained(tiny_model_dir) if kind == "actor" else RewardModel.from_pretrained(tiny_model_dir)
        _sharded(ref, bf16).train()
        opt = make_optimizer(ref, "sgd")
        (actor_step if kind == "actor" else reward_step)(ref, opt, global_batch(kind, tiny_model_dir))
        return full_state_dict(ref.model)

    torch.manual_seed(0)
    untouched = (Actor.from_pretrained(tiny_model_dir) if kind == "actor"
                 else RewardModel.from_pretrained(tiny_model_dir)).model.state_dict()
    cls = AutoModelForCausalLM if kind == "actor" else AutoModelForSequenceClassification
    saved = cls.from_pretrained(run_dir / f"{kind}_hf").state_dict()
    ref_bf16, ref_fp32 = one_process(True), one_process(False)

    def update_gap(a, b) -> float:
        """|| (a - w0) - (b - w0) || / || b - w0 ||: how far apart two updates of the weights are."""
        keys = [k for k in b if k in saved]
        num = sum(float((a[k] - b[k]).double().square().sum()) for k in keys)
        den = sum(float((b[k] - untouched[k]).double().square().sum()) for k in keys)
        return (num / den) ** 0.5

    gap = update_gap(saved, ref_bf16)
    gap_fp32 = update_gap(ref_fp32, ref_bf16)
    # 2 ranks each run half the samples through bf16 matmuls and reduce in fp32, 1 rank sums all
    # of them inside bf16 matmuls: the updates differ by bf16 rounding of the gradients
    assert gap <= 0.02
    # and the 2 ranks did compute in bf16: closer to bf16 on one rank than fp32 on one rank is
    # (measured: 1.8e-3 vs 5.8e-3 for the actor, 1.6e-3 vs 6.2e-3 for the reward model)
    assert gap < gap_fp32 / 2
