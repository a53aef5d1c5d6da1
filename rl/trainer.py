"""The PPO / ReMax driver: one controller that drives the Ray worker groups (verl's single-controller
design). ``fit`` reads like the algorithm:

    for each rollout batch:
        generate    vLLM engines sample n responses per prompt (+ the greedy one for ReMax)
        score       reference log-probs, reward-model scores, critic values, the actor's log-probs
                    (the RMs read each response ended as in their training: ``reward_inputs``;
                    ``--missing_eos_penalty`` for responses cut at the length limit)
        advantages  KL-penalised rewards -> GAE (PPO) or reward - baseline (ReMax / RLOO / ...)
        update      the actor (PPO-clip or REINFORCE), the critic (clipped value loss)
        sync        the actor's new weights into the engines; log the sampler/trainer log-prob gap

With ``--async_train`` the engines generate batch k+1 (with the weights of before update k) while
batch k trains, and the critic trains beside the actor. The importance ratio then uses the
*behaviour* policy's log-probs (the engine's), so the one-step-off-policy update stays correct;
the sync gap is then measured on a small probe generated right after each sync.

All data flows through the driver as ``rl.experience`` objects placed once in the Ray object store;
the algorithms are the pure functions of ``rl.advantages`` / ``rl.kl`` / ``rl.policy_losses``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from rl.advantages import (
    compute_gae, group_mean_advantages, remax_advantages, rloo_advantages, token_level_rewards,
)
from rl.cluster import RLWorkers
from rl.config import RLConfig
from rl.experience import Experience, SequenceBatch, pad_responses, unpad_responses
from rl.kl import kl_penalty
from rl.kl_controller import AdaptiveKLController, FixedKLController
from rl.masked import masked_mean, masked_whiten
from rl.prompt_data import PromptSchedule, PromptSet
from rl.rollout import Rollout, SamplingConfig, flatten, logprob_gap
from rl.running_moments import RunningMoments
from rl.worker_group import WorkerGroup, merge_rank_results, submit_timed
from rl.workers import CriticWorker, ModelWorker, PolicyWorker, RewardWorker, RolloutWorker
from rlhf_data.tokenize import end_response
from training.checkpoint import latest_checkpoint, mark_latest
from training.metrics_logger import MetricsLogger
from training.progress import progress_bar

DRIVER_STATE = "driver_state.pt"
PROBE_PROMPTS, PROBE_TOKENS = 4, 16


def optimizer_steps_per_iteration(cfg: RLConfig) -> int:
    return cfg.max_epochs * cfg.samples_per_rollout // cfg.train_batch_size


def total_iterations(cfg: RLConfig, num_prompts: int) -> int:
    total = PromptSchedule(num_prompts, cfg.rollout_batch_size, cfg.num_episodes, cfg.seed).total
    return total if cfg.max_iterations < 0 else min(total, cfg.max_iterations)


def reward_inputs(rollouts: Sequence[Rollout], end_token_id: int) -> tuple[SequenceBatch, torch.Tensor]:
    """What the reward models read: each rollout's prompt ids + its response ended as
    ``rlhf_data.tokenize.end_response`` ends the responses an RM is trained on (up to the first
    end-of-turn token; the token appended to a response cut at the length limit), and a bool
    tensor ``ended``: whether the response had the token itself. Only the reward models see the
    appended token: the policy's log-probs, the KL and the critic's values stay over the sampled
    tokens (``SequenceBatch.from_rollouts``)."""
    sequences, prompt_lens, ended = [], [], []
    for r in rollouts:
        response, e = end_response(r.response_ids, end_token_id)
        sequences.append(list(r.prompt_ids) + response)
        prompt_lens.append(len(r.prompt_ids))
        ended.append(e)
    return SequenceBatch(sequences, prompt_lens), torch.tensor(ended, dtype=torch.bool)


def total_reward(scores: Sequence[torch.Tensor], weights: Sequence[float], ended: torch.Tensor,
                 missing_eos_penalty: float | None = None) -> torch.Tensor:
    """The reward of each response from its reward models' scores ``s_k`` (``(n,)`` each):

        r_i = sum_k w_k * s_k,i - p * [response i has no end-of-turn token of its own]

    with ``p`` = ``--missing_eos_penalty`` (TRL's; 0 when None), subtracted once however many
    reward models there are. Everything downstream (normalisation, clipping, baselines) sees r."""
    total = torch.zeros(len(ended))
    for w, s in zip(weights, scores, strict=True):
        total += w * torch.as_tensor(s, dtype=torch.float32)
    if missing_eos_penalty:
        total -= missing_eos_penalty * (~ended).float()
    return total


@dataclass
class Generation:
    """Rollouts being generated: ObjectRefs of the engines' ``(per-request groups, seconds)``; the
    requests are the sampled responses and, for ReMax, the greedy ones (in the same engine call)."""

    refs: list

    def resolve(self) -> tuple[list[list[Rollout]], list[Rollout], float]:
        import ray

        parts = ray.get(self.refs)
        groups = [g for requests, _ in parts for g in requests[0]]
        greedy = [g[0] for requests, _ in parts if len(requests) > 1 for g in requests[1]]
        return groups, greedy, max([s for _, s in parts] + [0.0])


class RLTrainer:
    def __init__(self, cfg: RLConfig, workers: RLWorkers, train: PromptSet, evals: PromptSet, log=print):
        self.cfg, self.workers, self.train_prompts, self.eval_prompts, self.log = cfg, workers, train, evals, log
        self.schedule = PromptSchedule(len(train), cfg.rollout_batch_size, cfg.num_episodes, cfg.seed)
        self.total = total_iterations(cfg, len(train))
        self.kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else FixedKLController(cfg.init_kl_coef))
        self.reward_moments = RunningMoments()
        self.sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                       max_new_tokens=cfg.generate_max_len, n=cfg.n_samples_per_prompt)
        if train.end_token_id is None:
            raise ValueError("the prompts' tokenizer has no EOS token: responses cannot be ended for the reward "
                             "models as they were trained (rlhf_data.tokenize.end_response)")
        self.end_token_id = train.end_token_id
        self.iteration = 0
        self.pending: tuple | None = None  # async: the next batch's rollouts, generated before a checkpoint
        self.weight_sync = "object_store"  # resolved in open_weight_group (it needs the cluster)

    # -- generation ------------------------------------------------------------------------------
    def _submit(self, prompts: list[list[int]], samplings: list[SamplingConfig]) -> list:
        """Split ``prompts`` over the engines (contiguous chunks); each engine runs every sampling
        on its chunk in one call. Seeds continue the batch's numbering across chunks, so samples do
        not depend on the number of engines."""
        engines = self.workers.engines
        size = math.ceil(len(prompts) / len(engines))
        refs = []
        for e, start in zip(engines, range(0, len(prompts), size)):
            requests = [(prompts[start:start + size],
                         replace(s, seed=None if s.seed is None else s.seed + start * s.n)) for s in samplings]
            refs.append(submit_timed(e, RolloutWorker.generate_batches, requests))
        return refs

    def generate(self, iteration: int) -> Generation:
        prompts = [self.train_prompts.prompts[i] for i in self.schedule.batch(iteration)]
        seed = self.cfg.seed * 1_000_003 + iteration * self.cfg.samples_per_rollout  # resumable sampling
        samplings = [replace(self.sampling, seed=seed)]
        if self.cfg.advantage_estimator == "remax":
            samplings.append(self.sampling.greedy())
        return Generation(self._submit(prompts, samplings))

    # -- scoring ---------------------------------------------------------------------------------
    def _scores(self, rollouts: Sequence[Rollout]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``total_reward`` of each rollout from the reward models (they run concurrently) over
        ``reward_inputs`` (responses ended as in RM training); the ``ended`` flags; the seconds taken."""
        import ray

        batch, ended = reward_inputs(rollouts, self.end_token_id)
        ref = ray.put(batch)
        subs = [g.submit(RewardWorker.scores, ref) for g in self.workers.rewards]
        scores, seconds = [], 0.0
        for g, refs in zip(self.workers.rewards, subs):
            parts, s = WorkerGroup.collect(refs)
            scores.append(torch.tensor(merge_rank_results(parts, len(batch), g.name)))
            seconds = max(seconds, s)
        total = total_reward(scores, self.cfg.reward_weight_list(), ended, self.cfg.missing_eos_penalty)
        return total, ended, seconds

    def make_experience(self, groups: list[list[Rollout]], greedy: list[Rollout]) -> tuple[Experience, dict]:
        import ray

        cfg, w = self.cfg, self.workers
        samples = flatten(groups)
        batch = SequenceBatch.from_rollouts(samples)
        n = len(batch)
        batch_ref = ray.put(batch)
        T = self.sampling.logprob_temperature
        # everything below runs concurrently on separate workers
        ref_sub = w.ref.submit(PolicyWorker.logprobs, batch_ref, T)
        critic_sub = w.critic.submit(CriticWorker.values, batch_ref) if w.critic is not None else None
        actor_sub = w.actor.submit(PolicyWorker.logprobs, batch_ref, T) if cfg.effective_old_logprobs == "trainer" else None
        scores, ended, t_reward = self._scores(samples + greedy)
        ref_parts, t_ref = WorkerGroup.collect(ref_sub)
        ref_lp = merge_rank_results(ref_parts, n, "ref")
        metrics: dict[str, float] = {"time_reference": t_ref, "time_reward": t_reward}
        if actor_sub is not None:
            parts, metrics["time_actor_forward"] = WorkerGroup.collect(actor_sub)
            old_lp = merge_rank_results(parts, n, "actor")
            metrics["sync_logprob_gap"] = logprob_gap(samples, old_lp)
        else:  # the behaviour policy's, from the engine (async: one step off-policy; see effective_old_logprobs)
            old_lp = [torch.tensor(r.response_logprobs, dtype=torch.float32) for r in samples]
        values = None
        if critic_sub is not None:
            parts, metrics["time_critic_forward"] = WorkerGroup.collect(critic_sub)
            values = merge_rank_results(parts, n, "critic")

        sample_scores, greedy_scores = scores[:n], scores[n:]
        missing_eos = (~ended[:n]).float().mean().item()
        metrics |= {"reward_mean": sample_scores.mean().item(), "reward_std": sample_scores.std(unbiased=False).item(),
                    # responses the RMs read with an appended end-of-turn token, and what the penalty took
                    "missing_eos_fraction": missing_eos,
                    "missing_eos_penalty_mean": (self.cfg.missing_eos_penalty or 0.0) * missing_eos}
        if greedy:
            metrics["baseline_reward_mean"] = greedy_scores.mean().item()
        if cfg.normalize_reward:
            self.reward_moments.update(sample_scores)
            sample_scores = self.reward_moments.normalize(sample_scores)
            greedy_scores = self.reward_moments.normalize(greedy_scores)

        lens = batch.response_lens
        old_pad, mask = pad_responses(old_lp)
        ref_pad, _ = pad_responses(ref_lp)
        kl = kl_penalty(old_pad, ref_pad, cfg.kl_estimator, mask)
        kl_coef, clip = self.kl_ctl.value, cfg.effective_reward_clip
        returns = None
        if cfg.advantage_estimator == "gae":
            values_pad, _ = pad_responses(values)
            rewards = token_level_rewards(sample_scores, kl, mask, kl_coef, clip)
            advantages, returns = compute_gae(rewards, values_pad, mask, cfg.gamma, cfg.lambd)
            metrics["value_mean"] = masked_mean(values_pad, mask).item()
        elif cfg.advantage_estimator == "remax":  # every sample of a prompt shares its greedy reward
            greedy_baseline = greedy_scores.repeat_interleave(cfg.n_samples_per_prompt)
            advantages = remax_advantages(sample_scores, greedy_baseline, kl, mask, kl_coef, clip)
        elif cfg.advantage_estimator == "rloo":
            advantages = rloo_advantages(sample_scores, cfg.n_samples_per_prompt, kl, mask, kl_coef, clip)
        else:  # reinforce_baseline
            advantages = group_mean_advantages(sample_scores, cfg.n_samples_per_prompt, kl, mask, kl_coef, clip)
        metrics["advantage_mean"] = masked_mean(advantages, mask).item()
        metrics["advantage_std"] = masked_mean((advantages - metrics["advantage_mean"]) ** 2, mask).sqrt().item()
        if cfg.effective_whiten:
            advantages = masked_whiten(advantages, mask)

        kl_per_token = masked_mean(kl, mask, dim=-1)  # each response's mean per-token KL
        metrics |= {
            "kl": kl_per_token.mean().item(),
            "kl_sequence": (kl * mask).sum(-1).mean().item(),
            "kl_coef": kl_coef,
            "response_length": float(sum(lens)) / n,
            "truncated_fraction": sum(r.finish_reason == "length" for r in samples) / n,
        }
        self.kl_ctl.update(metrics["kl"], n)
        exp = Experience(
            batch.sequences, batch.prompt_lens, old_logprobs=old_lp, advantages=unpad_responses(advantages, lens),
            returns=unpad_responses(returns, lens) if returns is not None else None, old_values=values,
        )
        return exp, metrics

    # -- updates ---------------------------------------------------------------------------------
    def train(self, exp: Experience, iteration: int) -> dict:
        import ray

        cfg, w = self.cfg, self.workers
        exp_ref = ray.put(exp)
        seed = cfg.seed + iteration
        actor_sub = w.actor.submit(
            PolicyWorker.train, exp_ref, mini_batch_size=cfg.train_batch_size, epochs=cfg.max_epochs, seed=seed,
            loss=cfg.effective_policy_loss, temperature=self.sampling.logprob_temperature, clip_eps=cfg.eps_clip,
            entropy_coef=cfg.entropy_coef,
            # sampler log-probs in sync mode: the first training forward runs the weights the
            # engine sampled with, so it measures the sync gap (async: probe_gap after the sync)
            measure_sync_gap=not cfg.async_train and cfg.effective_old_logprobs == "sampler")
        critic_kwargs = dict(mini_batch_size=cfg.train_batch_size, epochs=cfg.max_epochs, seed=seed,
                             value_clip=cfg.value_clip if cfg.value_clip > 0 else None)
        critic_sub = w.critic.submit(CriticWorker.train, exp_ref, **critic_kwargs) if w.critic is not None and cfg.async_train else None
        parts, t_actor = WorkerGroup.collect(actor_sub)
        metrics = dict(parts[0]) | {"time_actor_train": t_actor}
        if w.critic is not None:
            if critic_sub is None:  # sequential unless --async_train
                critic_sub = w.critic.submit(CriticWorker.train, exp_ref, **critic_kwargs)
            parts, metrics["time_critic_train"] = WorkerGroup.collect(critic_sub)
            metrics |= parts[0]
        return metrics

    def open_weight_group(self) -> None:
        """For ``--weight_sync broadcast``: the actor's rank 0 and every engine worker form one
        process group (``rl.weight_broadcast``; NCCL with GPUs, gloo without)."""
        import ray

        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        self.weight_sync = resolve_weight_sync(self.cfg, use_gpu)
        if self.weight_sync != "broadcast":
            return
        engines, tp = self.workers.engines, self.cfg.vllm_tensor_parallel_size
        world, backend = 1 + len(engines) * tp, "nccl" if use_gpu else "gloo"
        rank0 = self.workers.actor.workers[0]
        # the store binds 127.0.0.1 when every Ray node is this one (node IPs), else the node's IP
        node_ips = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
        host, port, token = ray.get(rank0.open_weight_group.remote(world, node_ips))
        ray.get([rank0.join_weight_group.remote(host, port, token, world, backend)]
                + [submit_timed(e, RolloutWorker.join_weight_group, host, port, token, 1 + i * tp, world, backend)
                   for i, e in enumerate(engines)])
        self.log(f"[sync] weights by {backend} broadcast from the actor's rank 0 to {world - 1} engine worker(s)")

    def sync_weights(self) -> float:
        """The actor's full state dict (gathered on its rank 0) into every engine: passed by
        reference through the object store, or broadcast (``--weight_sync``). Returns seconds."""
        import ray

        t0 = time.perf_counter()
        actor, engines = self.workers.actor.workers, self.workers.engines
        if self.weight_sync == "object_store":
            refs = [wk.full_state_dict.remote() for wk in actor]
            ray.get([submit_timed(e, RolloutWorker.update_weights, refs[0]) for e in engines])
            ray.get(refs[1:])  # not refs[0]: the driver needs no copy of the weights
        else:
            ray.get([wk.broadcast_weights.remote() for wk in actor] + [submit_timed(e, RolloutWorker.receive_weights) for e in engines])
        return time.perf_counter() - t0

    def probe_gap(self, iteration: int) -> float:
        """Mean |engine log-prob - trainer log-prob| on a few fresh samples (async mode, where the
        training batch was generated before the last sync)."""
        import ray

        prompts = [self.train_prompts.prompts[i] for i in self.schedule.batch(iteration % self.schedule.total)]
        probe = replace(self.sampling, n=1, max_new_tokens=min(PROBE_TOKENS, self.cfg.generate_max_len),
                        seed=self.cfg.seed + iteration)
        groups, _ = ray.get(submit_timed(self.workers.engines[0], RolloutWorker.generate, prompts[:PROBE_PROMPTS], probe))
        samples = flatten(groups)
        batch = SequenceBatch.from_rollouts(samples)
        lp = merge_rank_results(self.workers.actor.call(PolicyWorker.logprobs, batch, probe.logprob_temperature), len(batch), "actor")
        return logprob_gap(samples, lp)

    # -- evaluation, memory --------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Mean reward of the greedy responses to the evaluation prompts."""
        if not len(self.eval_prompts):
            return {}
        samples, _, _ = Generation(self._submit(self.eval_prompts.prompts, [self.sampling.greedy()])).resolve()
        samples = [g[0] for g in samples]
        scores, ended, _ = self._scores(samples)
        return {"eval_reward_mean": scores.mean().item(),
                "eval_response_length": sum(len(r.response_ids) for r in samples) / len(samples),
                "eval_missing_eos_fraction": (~ended).float().mean().item()}

    def memory(self) -> dict:
        """Per group: model-attributable resident memory summed over ranks (peak RSS minus the
        RSS before any model was loaded), and the peak GPU memory of its busiest rank."""
        import ray

        out = {}
        groups = self.workers.model_groups()
        for name, g in groups.items():
            stats = g.call(ModelWorker.memory_stats)
            out[f"mem_{name}_mb"] = sum(s["rss_model_mb"] for s in stats)
            if "gpu_peak_mb" in stats[0]:
                out[f"gpu_mem_{name}_mb"] = max(s["gpu_peak_mb"] for s in stats)
        engine_stats = ray.get([e.memory_stats.remote() for e in self.workers.engines])
        out["mem_rollout_mb"] = sum(s["rss_model_mb"] for s in engine_stats)
        return out

    # -- checkpoints -------------------------------------------------------------------------------
    def save_models(self) -> None:
        cfg = self.cfg
        if not cfg.save_path:
            return
        self.workers.actor.call(PolicyWorker.save_pretrained, cfg.save_path, cfg.pretrain, cfg.save_adapter)
        if self.workers.critic is not None:
            self.workers.critic.call(CriticWorker.save_pretrained, critic_save_path(cfg.save_path), None)

    def save_checkpoint(self) -> None:
        cfg = self.cfg
        if not cfg.ckpt_path:
            return
        folder = Path(cfg.ckpt_path) / f"iter_{self.iteration:06d}"
        self.workers.actor.call(PolicyWorker.save_state, str(folder / "actor"))
        if self.workers.critic is not None:
            self.workers.critic.call(CriticWorker.save_state, str(folder / "critic"))
        pending = None  # plain dicts, lists and numbers only: the file loads with weights_only=True
        if self.pending is not None:
            groups, greedy, seconds = self.pending
            pending = {"groups": [[asdict(r) for r in g] for g in groups], "greedy": [asdict(r) for r in greedy],
                       "seconds": float(seconds)}

        def plain(d: dict) -> dict:  # numbers as Python ints / floats (a numpy or tensor scalar would not load)
            return {k: v if isinstance(v, (int, float)) else float(v) for k, v in d.items()}

        state = {"iteration": int(self.iteration), "kl_ctl": plain(self.kl_ctl.state_dict()),
                 "reward_moments": plain(self.reward_moments.state_dict()), "pending": pending}
        tmp = folder / (DRIVER_STATE + ".tmp")
        torch.save(state, tmp)
        tmp.rename(folder / DRIVER_STATE)  # written last: the folder is complete
        mark_latest(cfg.ckpt_path, folder, cfg.max_ckpt_num)

    def resume(self) -> bool:
        folder = latest_checkpoint(self.cfg.ckpt_path, DRIVER_STATE)
        if folder is None:
            return False
        self.workers.actor.call(PolicyWorker.load_state, str(folder / "actor"))
        if self.workers.critic is not None:
            self.workers.critic.call(CriticWorker.load_state, str(folder / "critic"))
        state = torch.load(folder / DRIVER_STATE, weights_only=True)  # no code runs from a checkpoint
        self.iteration = int(state["iteration"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.reward_moments.load_state_dict(state["reward_moments"])
        pending = state["pending"]
        self.pending = None if pending is None else (
            [[Rollout(**r) for r in g] for g in pending["groups"]], [Rollout(**r) for r in pending["greedy"]],
            float(pending["seconds"]))
        self.sync_weights()  # the engines start from --pretrain: give them the resumed weights
        self.log(f"[resume] from {folder} at iteration {self.iteration}")
        return True

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        self.open_weight_group()
        resumed = self.resume()
        logger = MetricsLogger(cfg.logging_path, use_wandb=cfg.use_wandb, use_tensorboard=cfg.use_tensorboard,
                               wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name,
                               config=asdict(cfg), resume_step=self.iteration if resumed else None)
        first_eval = {}
        if not resumed:
            first_eval = self.evaluate()
            logger.log(0, first_eval | self.memory())
        bar = progress_bar(self.total, cfg.advantage_estimator, initial=self.iteration, unit="iter")
        ready = self.pending
        if ready is None and self.iteration < self.total:
            ready = self.generate(self.iteration)
        metrics: dict = {}
        while self.iteration < self.total:
            t_iter = time.perf_counter()
            it = self.iteration
            groups, greedy, t_gen = ready.resolve() if isinstance(ready, Generation) else ready
            nxt = self.generate(it + 1) if cfg.async_train and it + 1 < self.total else None
            exp, metrics = self.make_experience(groups, greedy)
            metrics |= self.train(exp, it)
            metrics["time_generate"] = t_gen
            self.iteration = it + 1
            if nxt is not None:
                ready = nxt.resolve()  # batch it+1 was generated with the weights of before this update
                self.pending = ready
            metrics["time_sync"] = self.sync_weights()
            if cfg.async_train:
                metrics["sync_logprob_gap"] = self.probe_gap(self.iteration)
            if (cfg.eval_steps > 0 and self.iteration % cfg.eval_steps == 0) or self.iteration == self.total:
                metrics |= self.evaluate()
            metrics |= self.memory()
            metrics["time_iteration"] = time.perf_counter() - t_iter
            # Submitted only now: evaluation and the memory poll would queue behind it on the
            # engines, and this iteration's time would hold the next one's generation.
            if not cfg.async_train and self.iteration < self.total:
                ready = self.generate(self.iteration)
            if self.iteration % cfg.logging_steps == 0 or self.iteration == self.total or "eval_reward_mean" in metrics:
                logger.log(self.iteration, metrics)
            bar.update(1)
            bar.set_postfix({"reward": f"{metrics['reward_mean']:.3f}", "kl": f"{metrics['kl']:.4f}"})
            if cfg.save_steps > 0 and self.iteration % cfg.save_steps == 0 and self.iteration < self.total:
                self.save_models()
                self.save_checkpoint()
        bar.close()
        self.save_models()
        self.pending = None
        self.save_checkpoint()
        logger.close()
        return {"iterations": self.iteration, **{f"first_{k}": v for k, v in first_eval.items()},
                **{f"last_{k}": v for k, v in metrics.items() if k.startswith(("eval_", "reward_mean", "kl"))}}


def resolve_weight_sync(cfg: RLConfig, use_gpu: bool) -> str:
    """``--weight_sync auto``: broadcast where it avoids host copies (GPUs, vLLM engines), else the
    object store (on CPUs the in-process engine takes the tensors without a copy)."""
    if cfg.weight_sync != "auto":
        return cfg.weight_sync
    return "broadcast" if use_gpu and cfg.rollout_backend == "vllm" else "object_store"


def critic_save_path(save_path: str) -> str:
    """Where the critic's HF folder goes: beside the actor's, ``<save_path>_critic``."""
    return save_path.rstrip("/") + "_critic"
