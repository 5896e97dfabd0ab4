#!/usr/bin/env bash
# Set up ostquant in ./.venv: dependencies, then the package with its CUDA extension.
# Idempotent: a second run only rebuilds what changed. Works with no GPU; without nvcc
# (or with OSTQUANT_BUILD_CUDA=0) it installs the pure-Python package (reference kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
. .venv/bin/activate
echo "[setup] installing dependencies (requirements.txt)"
python -m pip install -q --disable-pip-version-check -r requirements.txt
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "[setup] building ostquant (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
echo "[setup] build took $(( $(date +%s) - start )) s"
python -c "import ostquant.ops as o; print('[setup] CUDA extension loaded:', o.extension_loaded(), '| CUDA ops:', ', '.join(o.cuda_ops()) or '-')"
