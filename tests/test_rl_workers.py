"""The RL workers on real Ray with real gloo process groups, against plain transformers:
log-probs, values and rewards equal a plain model's on each unpadded sequence; one policy / critic
update on 2 FSDP ranks equals the same update on 1 rank."""

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from models.value_model import load_value_model
from rl.experience import Experience, SequenceBatch
from rl.worker_group import DevicePool, WorkerGroup, merge_rank_results
from rl.workers import CriticWorker, ModelSpec, OptimSpec, PolicyWorker, RewardWorker, worker_env_vars

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": worker_env_vars()})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def critic_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A sequence-classification folder (fresh score head, seeded) for the critic and RM workers."""
    torch.manual_seed(0)
    model = load_value_model(str(tiny_model_dir), init_head_std=0.5)
    out = tmp_path_factory.mktemp("critic")
    model.save_pretrained(out)
    return out


def sequences(vocab: int, n: int = 6, seed: int = 0) -> SequenceBatch:
    rng = random.Random(seed)
    seqs, plens = [], []
    for i in range(n):
        p, r = rng.randint(3, 12), (1 if i == 0 else rng.randint(2, 10))  # one single-token response
        seqs.append([rng.randrange(3, vocab) for _ in range(p + r)])
        plens.append(p)
    return SequenceBatch(seqs, plens)


def group(cls, n: int, name: str, **init) -> WorkerGroup:
    pool = DevicePool.create(name, 1, n, use_gpu=False)
    g = WorkerGroup(cls, pool, name=name, init_kwargs=init, env_vars=worker_env_vars())
    g.call(cls.setup)
    return g


def release(*groups: WorkerGroup) -> None:
    for g in groups:
        g.kill()
        g.pool.remove()  # frees the CPU slots for the next groups


def spec(path, budget=64) -> ModelSpec:
    return ModelSpec(path=str(path), torch_threads=1, forward_token_budget=budget)


def optim(steps=2, micro=2, packing=False) -> OptimSpec:
    return OptimSpec(learning_rate=1e-2, total_steps=steps, lr_warmup_ratio=0.0, micro_batch_size=micro,
                     packing_samples=packing, token_budget=40)


@torch.no_grad()
def test_forward_workers_match_plain_transformers(local_ray, tiny_model_dir, critic_dir):
    batch = sequences(4096)
    n = len(batch)
    policy = group(PolicyWorker, 2, "fwd_policy", spec=spec(tiny_model_dir), optim=None)
    critic = group(CriticWorker, 2, "fwd_critic", spec=spec(critic_dir), optim=None)
    reward = group(RewardWorker, 1, "fwd_reward", spec=spec(critic_dir))
    lp = merge_rank_results(policy.call(PolicyWorker.logprobs, batch, 0.7), n, "policy")
    values = merge_rank_results(critic.call(CriticWorker.values, batch), n, "critic")
    scores = merge_rank_results(reward.call(RewardWorker.scores, batch), n, "reward")

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    seq_cls = AutoModelForSequenceClassification.from_pretrained(critic_dir).eval()
    for i, (seq, p) in enumerate(zip(batch.sequences, batch.prompt_lens)):
        ids = torch.tensor([seq])
        ref_lp = torch.log_softmax(lm(ids).logits[0].float() / 0.7, -1)[p - 1:-1].gather(-1, ids[0, p:, None])[:, 0]
        assert lp[i].shape == (len(seq) - p,) and torch.allclose(lp[i], ref_lp, atol=1e-5)
        hidden = seq_cls.model(ids).last_hidden_state
        per_token = seq_cls.score(hidden)[0, :, 0]
        assert torch.allclose(values[i], per_token[p - 1:-1], atol=1e-5)  # V of the state before each token
        assert abs(scores[i] - seq_cls(ids).logits[0, 0].item()) < 1e-5
    release(policy, critic, reward)


def experience(batch: SequenceBatch, seed: int = 1) -> Experience:
    g = torch.Generator().manual_seed(seed)
    lens = batch.response_lens
    return Experience(
        batch.sequences, batch.prompt_lens,
        old_logprobs=[-torch.rand(n, generator=g) * 3 for n in lens],
        advantages=[torch.randn(n, generator=g) for n in lens],
        returns=[torch.randn(n, generator=g) for n in lens],
        old_values=[torch.randn(n, generator=g) * 0.1 for n in lens],
    )


def full_weights(g: WorkerGroup) -> dict:
    """The group's full state dict (collective: every rank is called; rank 0 returns it)."""
    return ray.get([w.full_state_dict.remote() for w in g.workers])[0]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))  # fp32 sums in another order


def test_two_rank_updates_equal_one_rank(local_ray, tiny_model_dir, critic_dir):
    batch = sequences(4096, n=8, seed=3)
    exp = experience(batch)
    kw = dict(mini_batch_size=4, epochs=1, seed=0)
    results = {}
    for world, packing in ((1, False), (2, True)):  # other rank count AND other micro-batching
        actor = group(PolicyWorker, world, f"actor{world}{packing}", spec=spec(tiny_model_dir), optim=optim(packing=packing))
        critic = group(CriticWorker, world, f"critic{world}{packing}", spec=spec(critic_dir), optim=optim(packing=packing))
        a_stats = actor.call(PolicyWorker.train, exp, loss="ppo", temperature=1.0, **kw)[0]
        c_stats = critic.call(CriticWorker.train, exp, value_clip=0.2, **kw)[0]
        a_sd, c_sd = full_weights(actor), full_weights(critic)
        results[(world, packing)] = (a_stats, c_stats, a_sd, c_sd)
        release(actor, critic)
    base = results[(1, False)]
    assert base[0]["optimizer_steps"] == 2 and base[0]["clip_fraction"] >= 0
    for key, other in results.items():
        for k in ("policy_loss", "entropy", "approx_kl"):
            assert close(other[0][k], base[0][k]), (key, k)
        assert close(other[1]["value_loss"], base[1]["value_loss"]), key
        for name, t in base[2].items():
            assert torch.allclose(other[2][name], t, atol=2e-5), (key, name)
        for name, t in base[3].items():
            assert torch.allclose(other[3][name], t, atol=2e-5), (key, name)
    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert max((base[2][k] - init[k]).abs().max().item() for k in init) > 1e-3  # the update did something

