"""``make gpu-check``: each GPU path once, one PASS / FAIL / SKIP line each, in about 10 minutes on
one GPU (two ranks where two or more GPUs are visible). Without a GPU it says so and exits 0,
having checked nothing. What each line proves, and which CPU test covers the same mechanism:
docs/gpu.md (The CUDA-only branches).

    python tests/gpu_check.py [--out out/gpu_check] [--only flash_varlen,sft]

Checks (in order; each a fresh process, so one failure does not hide the next):

  flash_varlen     flash-attn's varlen kernel on a packed bf16 batch gives the log-probs of the
                   exact SDPA varlen path (max |diff| <= 0.05 nats in bf16), and the packed row
                   equals the samples run one by one
  sft_nccl         train_sft.py on NCCL (FSDP2, bf16 mixed precision, flash-attn if installed):
                   3 steps, finite loss, the tokens/s metric reduced across ranks (the CPU scalar
                   that used to hit NCCL), a saved HF folder
  rm_nccl          train_rm_llama2.py, the log-exp loss with the LM term: 3 steps
  dpo_nccl         train_dpo.py: 3 steps and its evaluation's all-reduce
  rl_broadcast     fsdp_ppo_ray.py, tiny ReMax, CUDA vLLM engine, --weight_sync broadcast (NCCL,
                   the engine core in its own process): 2 iterations, sync log-prob gap <= 0.05
  remax_smollm2    fsdp_ppo_ray.py --config configs/remax_smollm2.yaml on SmolLM2 (policy and a
                   fresh reward head on the same model): 2 iterations
  lmdeploy_judge   an lmdeploy server (started as configs/judge_lmdeploy.md says, with
                   --logprobs-mode raw_logprobs) labels 4 pairs with log-prob strengths; SKIP when
                   lmdeploy is not installed (in .venv or .venv-judge)

Results also go to OUT/results.json (the lines docs/gpu.md records).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
GAP_BF16 = 0.05  # sampler vs trainer log-probs in bf16 (fp32 CPU runs see ~1e-6)


class CheckFailed(Exception):
    pass


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> None:
    """``cmd`` from the repository root, its output in ``log``; CheckFailed with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"timed out after {timeout:.0f} s (log {log})") from None
    if proc.returncode != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        raise CheckFailed(f"exit status {proc.returncode} (log {log}): " + " | ".join(tail)[-400:])


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *args]


def metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        raise CheckFailed(f"{path} was not written")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Checks:
    def __init__(self, out: Path, gpus: int):
        self.out, self.gpus = out, gpus
        self.ranks = min(2, gpus)
        self.tiny = out / "tiny"
        self.pairs = out / "pairs.jsonl"

    def prepare(self) -> None:
        from tests.synthetic_data import preference_rows, write_jsonl

        if not (self.tiny / "config.json").exists():
            run([PY, "-m", "models.tiny", str(self.tiny)], self.out / "logs" / "tiny.log", 300)
        rows = preference_rows(64, seed=0)
        write_jsonl(self.pairs, [r | {"strength": 0.9} for r in rows])

    # -- the checks: each returns a short line of what it measured --------------------------------
    def flash_varlen(self) -> str:
        import torch
        from transformers import AutoModelForCausalLM

        from models.actor import Actor
        from models.packing import PackedBatch
        from models.varlen_attention import flash_attn_available

        if not flash_attn_available():
            raise CheckFailed("flash-attn is not installed (install.sh builds it; see its log in .venv)")
        rows = [[1] + list(range(5, 5 + n)) for n in (40, 7, 63, 1, 25)]
        batch = PackedBatch.from_sequences(rows).to("cuda")
        mask = batch.flat_token_mask().reshape(batch.input_ids.shape)
        out = {}
        for attn in ("flash_attention_2", "varlen_sdpa"):
            model = AutoModelForCausalLM.from_pretrained(self.tiny, attn_implementation=attn, dtype=torch.bfloat16).cuda()
            with torch.no_grad():
                out[attn] = Actor(model).eval()(batch, token_mask=mask).log_probs.float()
            single = []
            with torch.no_grad():
                for r in rows:
                    b = PackedBatch.from_sequences([r]).to("cuda")
                    m = b.flat_token_mask().reshape(b.input_ids.shape)
                    single.append(Actor(model).eval()(b, token_mask=m).log_probs.float().reshape(-1))
            packed_vs_single = (out[attn].reshape(-1) - torch.cat(single)).abs().max().item()
            if packed_vs_single > 0.05:
                raise CheckFailed(f"{attn}: packed row vs samples one by one differ by {packed_vs_single:.3g}")
        diff = (out["flash_attention_2"] - out["varlen_sdpa"]).abs().max().item()
        if diff > 0.05:
            raise CheckFailed(f"flash-attn vs SDPA varlen log-probs differ by {diff:.3g} (bf16; limit 0.05)")
        return f"max |log-prob diff| flash vs SDPA {diff:.2e} on {len(rows)} packed samples (bf16)"

    def _train(self, name: str, script: str, dataset: str) -> list[dict]:
        """``script`` on NCCL for 3 steps (bf16 mixed precision), config ``configs/{name}_tiny.yaml``;
        returns its metrics rows."""
        run(torchrun(self.ranks, script, "--config", f"configs/{name}_tiny.yaml", "--pretrain", str(self.tiny),
                     "--dataset", dataset, "--max_steps", "3", "--logging_steps", "1", "--bf16",
                     "--save_path", str(self.out / name), "--logging_path", str(self.out / "logs" / name)),
            self.out / "logs" / f"{name}.log", 300)
        if not (self.out / name / "config.json").exists():
            raise CheckFailed(f"no HF folder at {self.out / name}")
        return metrics(self.out / "logs" / name)

    def sft_nccl(self) -> str:
        rows = [r for r in self._train("sft", "train_sft.py", "models/assets/tiny_chat_corpus.jsonl") if "loss" in r]
        if len(rows) < 3 or not all(r["loss"] == r["loss"] and r["processed_tokens_per_s"] > 0 for r in rows):
            raise CheckFailed(f"expected 3 logged steps with finite loss, got {rows}")
        losses = ", ".join(f"{r['loss']:.3f}" for r in rows)
        return f"{self.ranks} rank(s), losses {losses}"

    def rm_nccl(self) -> str:
        rows = self._train("rm", "train_rm_llama2.py", str(self.pairs))
        steps, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval_acc" in r]
        if len(steps) < 3 or not evals:
            raise CheckFailed(f"expected 3 steps and an evaluation, got {len(steps)} steps, {len(evals)} evaluations")
        return f"log-exp + LM loss, {len(steps)} steps, eval accuracy {evals[-1]['eval_acc']:.2f}"

    def dpo_nccl(self) -> str:
        evals = [r for r in self._train("dpo", "train_dpo.py", str(self.pairs)) if "eval_acc" in r]
        if not evals:
            raise CheckFailed("no evaluation row (its all-reduce)")
        return f"eval accuracy {evals[-1]['eval_acc']:.2f}, margin {evals[-1]['eval_reward_margin']:.4f}"

    def _rl(self, name: str, args: list[str], timeout: float) -> list[dict]:
        logs = self.out / "logs" / name
        shutil.rmtree(logs, ignore_errors=True)
        run([PY, "fsdp_ppo_ray.py", *args, "--max_iterations", "2", "--eval_steps", "2", "--bf16",
             "--weight_sync", "broadcast", "--old_logprobs", "sampler", "--logging_path", str(logs),
             "--save_path", str(self.out / name / "policy")], self.out / "logs" / f"{name}.log", timeout)
        rows = metrics(logs)
        gaps = [r["sync_logprob_gap"] for r in rows if "sync_logprob_gap" in r]
        if not gaps:
            raise CheckFailed("no sync_logprob_gap in the metrics")
        if max(gaps) > GAP_BF16:
            raise CheckFailed(f"sync log-prob gap {max(gaps):.3g} > {GAP_BF16} (stale or wrong weights in vLLM)")
        return rows

    def rl_broadcast(self) -> str:
        rows = self._rl("rl", ["--config", "configs/remax_tiny.yaml", "--pretrain", str(self.tiny),
                               "--reward_pretrain", str(self.tiny), "--prompt_data", "models/assets/tiny_prompts.jsonl"], 400)
        gaps = ", ".join(f"{r['sync_logprob_gap']:.1e}" for r in rows if "sync_logprob_gap" in r)
        return f"2 iterations, sync gaps {gaps}"

    @staticmethod
    def smollm2() -> Path:
        from models.packaged import convert_gguf, packaged_gguf

        return convert_gguf(packaged_gguf("smollm2"), ROOT / "out" / "models" / "smollm2")

    def remax_smollm2(self) -> str:
        smollm2 = self.smollm2()
        rows = self._rl("remax_smollm2", ["--config", "configs/remax_smollm2.yaml", "--pretrain", str(smollm2),
                                          "--reward_pretrain", str(smollm2), "--prompt_data", "data/prompts_train.jsonl",
                                          "--eval_prompt_data", "data/prompts_heldout.jsonl"], 500)
        last = rows[-1]
        return f"2 iterations, reward {last.get('eval_reward_mean', float('nan')):.3f}, KL {last.get('kl', float('nan')):.4f}"

    def lmdeploy_judge(self) -> str:
        lmdeploy = next((p for p in (ROOT / ".venv" / "bin" / "lmdeploy", ROOT / ".venv-judge" / "bin" / "lmdeploy",
                                     shutil.which("lmdeploy")) if p and Path(p).exists()), None)
        if lmdeploy is None:
            raise SkipCheck("lmdeploy is not installed (docs/gpu.md: its own .venv-judge)")
        from serving.ports import free_port

        port = free_port()
        key = os.urandom(16).hex()
        log = self.out / "logs" / "lmdeploy_server.log"
        with open(log, "w") as f:
            server = subprocess.Popen([str(lmdeploy), "serve", "api_server", str(self.smollm2()),
                                       "--backend", "pytorch", "--server-name", "127.0.0.1", "--server-port", str(port),
                                       "--api-keys", key, "--model-name", "judge", "--logprobs-mode", "raw_logprobs"],
                                      stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            from tests.test_self_ref_label import write_pairs

            pairs = write_pairs(self.out / "judge_pairs.jsonl", 4)
            deadline = time.monotonic() + 240
            import httpx

            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise CheckFailed(f"lmdeploy exited with {server.returncode} (log {log})")
                time.sleep(2)
            out = self.out / "judge_prefs.jsonl"
            run([PY, "-m", "self_ref.label", "--config", "configs/judge_small.yaml", "--input", str(pairs),
                 "--output", str(out), "--base_url", f"http://127.0.0.1:{port}/v1", "--model", "judge",
                 "--min_agreement", "0.5"], self.out / "logs" / "lmdeploy_label.log", 300, env={"OPENAI_API_KEY": key})
            rows = [json.loads(line) for p in (out, out.with_suffix(".rejects.jsonl")) if p.exists()
                    for line in p.read_text().splitlines()]
            sources = sorted({v.get("source") for r in rows for v in r.get("votes", [])})
            if len(rows) != 4 or "top_logprobs" not in sources:
                raise CheckFailed(f"{len(rows)} of 4 pairs judged, strength sources {sources}")
            return f"4 pairs labelled, strength sources {sources}"
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


class SkipCheck(Exception):
    pass


ORDER = ("flash_varlen", "sft_nccl", "rm_nccl", "dpo_nccl", "rl_broadcast", "remax_smollm2", "lmdeploy_judge")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/gpu_check")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(ORDER)}")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("[gpu-check] no GPU here (torch.cuda.is_available() is False): nothing was checked. "
              "The CPU tests cover what runs without one (docs/gpu.md).")
        return 0
    names = [n for n in args.only.split(",") if n] or list(ORDER)
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    gpus = torch.cuda.device_count()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    checks = Checks(out, gpus)
    print(f"[gpu-check] {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}; "
          f"{checks.ranks} rank(s) for the trainers; logs in {out / 'logs'}", flush=True)
    t0 = time.monotonic()
    checks.prepare()
    results = []
    for name in names:
        t = time.monotonic()
        try:
            status, detail = "PASS", getattr(checks, name)()
        except SkipCheck as e:
            status, detail = "SKIP", str(e)
        except CheckFailed as e:
            status, detail = "FAIL", str(e)
        except Exception as e:  # noqa: BLE001 -- one broken check must not hide the others
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
        results.append({"check": name, "status": status, "seconds": round(time.monotonic() - t, 1), "detail": detail})
        print(f"[gpu-check] {status:<4} {name:<15} {results[-1]['seconds']:>6.1f} s  {detail}", flush=True)
    failed = [r["check"] for r in results if r["status"] == "FAIL"]
    (out / "results.json").write_text(json.dumps({"gpus": gpus, "device": torch.cuda.get_device_name(0),
                                                  "torch": torch.__version__, "results": results}, indent=1) + "\n")
    print(f"[gpu-check] {len(results) - len(failed)} of {len(results)} passed or skipped in "
          f"{time.monotonic() - t0:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
