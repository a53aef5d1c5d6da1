"""The Ray workers of PPO / ReMax. Each rank of a ``rl.worker_group.WorkerGroup`` is one of these
objects; the group's ranks together hold one FSDP-sharded model (``models/``).

PolicyWorker    the actor (trains) or, with ``trainable=False``, the frozen reference policy:
                log-probs of response tokens; a policy-gradient update; the full state dict for
                the rollout engines
CriticWorker    per-token values; the clipped value-loss update (PPO only)
RewardWorker    one scalar per sequence from a reward model
RolloutWorker   a vLLM (or HF) engine: sampling, and taking the actor's new weights

Every data-carrying call receives the *whole* batch (one Ray object shared by all ranks) and
takes its share: all ranks compute the same balanced plan (``training.batches.split_global_batch``)
and each runs its own micro-batches, the same number on every rank as FSDP requires. Results come
back as ``{sample index: value}`` for the driver to merge (``rl.worker_group.merge_rank_results``).
Micro-batches are always packed rows (no padding computed); ``--packing_samples`` chooses token-
budget micro-batches over fixed sample counts.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from models.lora import LoraSpec
from rl.worker_group import DistributedWorker
from training.sharded_model import OptimSpec, ShardedModel, load_dtype


@dataclass
class ModelSpec:
    """How a worker loads and shards its model (the same for every rank of a group)."""

    path: str
    zero_stage: int = 3
    bf16: bool = False
    flash_attn: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    torch_threads: int = 0  # 0: leave torch's default (CPU workers)
    forward_token_budget: int = 8192  # tokens of a packed micro-batch in no-grad passes
    lora: LoraSpec | None = None  # adapters on a trainable model (the actor with --lora_rank)


class ModelWorker(DistributedWorker):
    """A ``training.sharded_model.ShardedModel`` (the scaffold the SFT and RM recipes use too) on
    each rank of a group, plus the RL side: no-grad passes over a batch, and updates over the
    mini-batches of an ``rl.experience.Experience``."""

    def __init__(self, spec: ModelSpec, optim: OptimSpec | None = None):
        super().__init__()
        self.spec, self.optim_spec = spec, optim
        if spec.torch_threads > 0:
            torch.set_num_threads(spec.torch_threads)
        self.model: ShardedModel | None = None

    # subclasses build their module here: (wrapper module, the HF model inside it), loaded in ``dtype``
    def build(self, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
        raise NotImplementedError

    def setup(self) -> dict:
        """Load and shard (FSDP2 over the group); if trainable, optimizer + schedule."""
        spec = self.spec
        dtype = load_dtype(spec.bf16, trainable=self.optim_spec is not None)
        self.model = ShardedModel(lambda: self.build(dtype), self.env, zero_stage=spec.zero_stage, bf16=spec.bf16,
                                  gradient_checkpointing=spec.gradient_checkpointing, seed=spec.seed,
                                  optim=self.optim_spec, lora=spec.lora)
        return {"parameters": self.model.num_parameters, "trainable_parameters": self.model.num_trainable_parameters}

    # -- plans -------------------------------------------------------------------------------------
    def forward_plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """This rank's packed micro-batches for a no-grad pass over all samples."""
        from models.packing import balanced_micro_batches

        n, world = len(lengths), self.env.world_size
        budget = max(self.spec.forward_token_budget, max(lengths))
        if n < world:  # too few samples for one each: every rank runs all (FSDP needs equal
            return [list(range(n))]  # forwards on all ranks); only rank 0 reports them (``_mine``)
        return balanced_micro_batches(lengths, budget, world)[self.env.rank]

    def _mine(self, results: dict, n: int) -> dict:
        return {} if n < self.env.world_size and self.env.rank != 0 else results

    def _no_grad_pass(self, batch, per_sample) -> dict[int, Any]:
        """``map_micro_batches`` over this rank's ``forward_plan``, as its share of the results."""
        return self._mine(map_micro_batches(batch, self.forward_plan(batch.lengths), self.env.device, per_sample),
                          len(batch))

    def mini_batches(self, n: int, mini_batch_size: int, epochs: int, seed: int) -> list[list[int]]:
        """``epochs`` shuffled passes over ``n`` samples cut into mini-batches of
        ``mini_batch_size`` (one optimizer step each; the config checks that it divides ``n``),
        the same on every rank (seeded)."""
        out = []
        for epoch in range(epochs):
            order = list(range(n))
            random.Random(seed * 1000 + epoch).shuffle(order)
            out.extend(order[i:i + mini_batch_size] for i in range(0, n, mini_batch_size))
        return out

    def _run_train(self, exp, mini_batch_size: int, epochs: int, seed: int, micro_loss_fn) -> dict[str, float]:
        """Optimizer steps over ``epochs`` passes of ``exp`` (``training.step.train_step`` each);
        returns token-weighted means of the loss statistics over all steps."""
        from training.step import global_means

        lengths = exp.lengths
        sums: dict[str, float] = {}
        first: dict[str, float] = {}
        steps = 0
        for mb in self.mini_batches(len(exp), mini_batch_size, epochs, seed):
            n_tokens = sum(exp.response_lens[i] for i in mb)
            plan = self.model.plan(mb, lengths)
            totals, grad_norm, _ = self.model.step(plan, lambda micro: micro_loss_fn(exp, micro, n_tokens, steps))
            means = global_means(totals, n_tokens, self.env.world_size)
            means["grad_norm"] = grad_norm
            for k, v in means.items():
                if k in FIRST_STEP_STATS:
                    first[k] = v
                else:
                    sums[k] = sums.get(k, 0.0) + v
            steps += 1
        out = {k: v / max(steps, 1) for k, v in sums.items()} | first
        out["optimizer_steps"] = steps
        out["lr"] = self.model.lr
        return out

    # -- saving ------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full HF-format state dict on rank 0 (None elsewhere), e.g. for the rollout
        engines. Collective: every rank must be called."""
        return self.model.full_state_dict()

    # --weight_sync broadcast (rl.weight_broadcast): rank 0 is rank 0 of the engines' group
    def open_weight_group(self, world_size: int, member_ips: list[str] | None = None) -> tuple[str, int, str]:
        """``(host, port, token)`` of the group's store (``BroadcastGroup.open``; ``member_ips``:
        the members' node IPs, which decide where it binds)."""
        from rl.weight_broadcast import BroadcastGroup

        self.weight_group = BroadcastGroup()
        return self.weight_group.open(world_size, member_ips or ())

    def join_weight_group(self, host: str, port: int, token: str, world_size: int, backend: str) -> None:
        self.weight_group.join(host, port, token, 0, world_size, backend)

    def broadcast_weights(self) -> None:
        """Gather the full state dict (collective: every rank is called) and broadcast it from
        rank 0 to the engines."""
        sd = self.full_state_dict()
        if sd is not None:
            self.weight_group.send(sd)

    def save_pretrained(self, path: str, tokenizer_path: str | None = None, adapter: bool = False) -> None:
        """A plain HF folder (collective; rank 0 writes); LoRA merged, and its adapter in
        ``path/adapter`` with ``adapter``."""
        from transformers import AutoTokenizer

        self.model.save_pretrained(path, AutoTokenizer.from_pretrained(tokenizer_path or self.spec.path), adapter)

    def save_state(self, folder: str) -> None:
        self.model.save_state(folder)

    def load_state(self, folder: str) -> None:
        self.model.load_state(folder)


FIRST_STEP_STATS = {"sync_logprob_gap"}  # read off the first optimizer step only, not averaged over steps


def _response_micro_batch(batch, indices: Sequence[int], device):
    packed, mask = batch.packed(indices)
    return packed.to(device), mask.to(device)


class PolicyWorker(ModelWorker):
    """The actor (``OptimSpec`` given) or the reference policy (``optim=None``)."""

    def build(self, dtype):
        from models.actor import Actor

        actor = Actor.from_pretrained(self.spec.path, flash_attn=self.spec.flash_attn or None, dtype=dtype)
        return actor, actor.model

    def logprobs(self, batch, temperature: float = 1.0) -> dict[int, torch.Tensor]:
        """``{i: log pi(response token t | ...) / T-scaled}`` for this rank's share of ``batch``
        (a ``rl.experience.SequenceBatch``), float32 on the CPU."""
        def per_sample(micro, packed, mask):
            lp = self.model(packed, token_mask=mask, temperature=temperature).log_probs[mask]
            return batch.split_responses(micro, lp.float().cpu())

        return self._no_grad_pass(batch, per_sample)

    def train(self, exp, *, mini_batch_size: int, epochs: int, seed: int, loss: str, temperature: float,
              clip_eps: float = 0.2, clip_eps_high: float | None = None, entropy_coef: float = 0.0,
              measure_sync_gap: bool = False) -> dict[str, float]:
        """Policy-gradient update on an ``rl.experience.Experience``: ``loss`` "ppo" (clipped
        surrogate, ``rl.policy_losses.ppo_policy_loss``) or "reinforce" (ReMax's,
        ``reinforce_policy_loss``); minus ``entropy_coef`` x entropy. Token-level mean over each
        mini-batch, exact under any micro-batch split. ``measure_sync_gap``: ``old_logprobs`` are
        the engine's for these weights; report mean |trainer - engine| log-prob over the first
        mini-batch (its forward runs before any update) as ``sync_logprob_gap``."""
        from rl.policy_losses import ppo_policy_loss, reinforce_policy_loss

        world = self.env.world_size

        def micro_loss(exp, micro, n_tokens, step):
            packed, mask = _response_micro_batch(exp, micro, self.env.device)
            out = self.model(packed, token_mask=mask, temperature=temperature, return_entropy=True)
            lp = out.log_probs[mask][None]
            ones = torch.ones_like(lp, dtype=torch.bool)
            adv = exp.gather("advantages", micro).to(lp.device)[None]
            share = n_tokens / world  # FSDP averages gradients over ranks: see rl.policy_losses
            gap_step = measure_sync_gap and step == 0
            old = exp.gather("old_logprobs", micro).to(lp.device)[None] if loss == "ppo" or gap_step else None
            if loss == "ppo":
                pg, st = ppo_policy_loss(lp, old, adv, ones, clip_eps, clip_eps_high, num_tokens=share)
            else:
                pg, st = reinforce_policy_loss(lp, adv, ones, num_tokens=share)
            entropy = out.entropy[mask]
            total = pg - entropy_coef * entropy.sum() / share if entropy_coef else pg
            k = float(lp.numel())
            # sums over this micro-batch's tokens; global_means divides by the mini-batch's tokens
            stats = {"policy_loss": pg.detach() * share, "entropy": entropy.detach().sum()}
            stats |= {k_: v * k for k_, v in st.items() if k_ != "ratio_max"}  # token-weighted sums
            if gap_step:
                stats["sync_logprob_gap"] = (lp.detach() - old).abs().sum()
            return total, stats, packed.num_tokens

        return self._run_train(exp, mini_batch_size, epochs, seed, micro_loss)


class CriticWorker(ModelWorker):
    """V(prefix) at every response token: the value of the state *before* the token is emitted,
    read from the hidden state of the previous position (as the log-probs are)."""

    def build(self, dtype):
        from models.value_model import Critic

        critic = Critic.from_pretrained(self.spec.path, flash_attn=self.spec.flash_attn or None, dtype=dtype)
        return critic, critic.model

    @staticmethod
    def _response_values(batch, micro, values: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        # the value for the token at position p comes from position p - 1: shift the mask left
        prev = torch.zeros_like(mask)
        prev[:, :-1] = mask[:, 1:]
        return batch.split_responses(micro, values[prev])

    def values(self, batch) -> dict[int, torch.Tensor]:
        """``{i: V at each response token}`` for this rank's share of ``batch``, float32 on the CPU."""
        def per_sample(micro, packed, mask):
            return [t.cpu() for t in self._response_values(batch, micro, self.model(packed).float(), mask)]

        return self._no_grad_pass(batch, per_sample)

    def train(self, exp, *, mini_batch_size: int, epochs: int, seed: int, value_clip: float | None) -> dict[str, float]:
        from rl.policy_losses import clipped_value_loss

        world = self.env.world_size

        def micro_loss(exp, micro, n_tokens, step):
            packed, mask = _response_micro_batch(exp, micro, self.env.device)
            v = torch.cat(self._response_values(exp, micro, self.model(packed), mask))[None]
            ones = torch.ones_like(v, dtype=torch.bool)
            old = exp.gather("old_values", micro).to(v.device)[None]
            ret = exp.gather("returns", micro).to(v.device)[None]
            share = n_tokens / world
            vl, st = clipped_value_loss(v, old, ret, ones, value_clip, num_tokens=share)
            k = float(v.numel())
            stats = {"value_loss": vl.detach() * share} | {k_: x * k for k_, x in st.items()}
            return vl, stats, packed.num_tokens

        stats = self._run_train(exp, mini_batch_size, epochs, seed, micro_loss)
        return {("critic_" + k if not k.startswith("value") else k): v for k, v in stats.items()}


class RewardWorker(ModelWorker):
    """A sequence-classification reward model: the score at each sequence's last token."""

    def build(self, dtype):
        from models.value_model import RewardModel

        rm = RewardModel.from_pretrained(self.spec.path, flash_attn=self.spec.flash_attn or None, dtype=dtype)
        return rm, rm.model

    def scores(self, batch) -> dict[int, float]:
        """``{i: score}`` for this rank's share of ``batch``: what ``score_sequences`` gives. The
        driver sends sequences already ended as RM training ends them (``rl.trainer.reward_inputs``)."""
        plan = self.forward_plan(batch.lengths)
        return self._mine(score_sequences(self.model, batch, plan, self.env.device), len(batch))


@torch.no_grad()
def score_sequences(model, batch, micro_batches: Sequence[Sequence[int]], device) -> dict[int, float]:
    """A ``models.value_model.RewardModel``'s score of each sequence of ``batch`` (a
    ``rl.experience.SequenceBatch``) named in ``micro_batches`` (one packed row each): the score
    head at the sequence's last token, located by length (never by ``!= pad_token_id``, which
    would skip an end-of-turn token where pad == eos). Pure: the reward worker's computation,
    callable without Ray."""
    return map_micro_batches(batch, micro_batches, device, lambda micro, packed, _: model(packed).float().cpu().tolist())


@torch.no_grad()
def map_micro_batches(batch, micro_batches: Sequence[Sequence[int]], device, per_sample) -> dict[int, Any]:
    """``{sample index: value}`` from a no-grad pass over ``batch`` (a ``rl.experience.SequenceBatch``)
    in packed ``micro_batches``: ``per_sample(micro, packed, response_mask)`` returns one value per
    sample of ``micro``. Empty micro-batches (a rank with no share) are skipped."""
    out: dict[int, Any] = {}
    for micro in micro_batches:
        if micro:
            packed, mask = _response_micro_batch(batch, micro, device)
            out.update(zip(micro, per_sample(micro, packed, mask)))
    return out


class RolloutWorker(DistributedWorker):
    """One rollout engine (``rl.rollout.VLLMEngine`` or ``HFEngine``) in its own Ray actor. Not a
    member of a torch.distributed world (vLLM runs its own tensor-parallel group)."""

    def __init__(self, backend: str, model_dir: str, torch_threads: int = 0, **engine_kwargs: Any):
        super().__init__()
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        from rl.rollout import make_engine

        self.engine = make_engine(backend, model_dir, **engine_kwargs)

    def generate(self, prompt_token_ids, sampling):
        return self.engine.generate(prompt_token_ids, sampling)

    def generate_batches(self, requests):
        return self.engine.generate_batches(requests)

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> float:
        return self.engine.update_weights(state_dict)

    def join_weight_group(self, host: str, port: int, token: str, rank_offset: int, world_size: int,
                          backend: str) -> None:
        self.engine.join_weight_group(host, port, token, rank_offset, world_size, backend)

    def receive_weights(self) -> float:
        return self.engine.receive_weights()

    def get_stats(self) -> dict[str, Any]:
        return self.engine.get_stats()

    def shutdown(self) -> None:
        self.engine.shutdown()


def worker_env_vars() -> dict[str, str]:
    """Environment every worker process needs: the repo on ``PYTHONPATH`` (workers import
    ``models``/``rl``/``training``), no tokenizer thread pools fighting torch's."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": root + (os.pathsep + path if path else ""), "TOKENIZERS_PARALLELISM": "false",
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}  # one line per sync is noise
