#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what a GPU round carries to the device machine. All of it is
# git-ignored and travels only when a device call names it in `carry`:
#
#   .whl/       wheels the device image lacks, for its Python 3.12 (nvidia-cutlass headers,
#               geoopt, gguf) and, with --fht-git, the fast-hadamard-transform source tarball
#               (the Hadamard benchmark's baseline; bench/build_fht.py builds it there)
#   .prebuilt/  ostquant._C compiled here against the device's torch (bench/prebuilt.py), so
#               the round compiles nothing there (saves minutes of a 15-minute device budget)
#
#   bash bench/prepare_device.sh [--fht-git DIR] [--no-prebuilt] [--device-torch 2.11.0]
#
# The device image (KINDS.md): Python 3.12, torch 2.11.0+cu130. The extension uses the stable
# Python C API only, so a build made here with Python 3.11 loads there; what must match is
# torch (libtorch's C++ ABI). Building uses a venv (.venv-device, git-ignored) holding that
# torch and a copy of the tree in /tmp (the checkout's own ostquant/_C*.so, built for .venv's
# torch, is left alone). ~2.5 min of compiling on 2 cores after a ~2 min venv.
# Then, in a device call: carry [".whl", ".prebuilt"], command `bash bench/gpu_round.sh
# --budget 540 --quick` with timeout_s 600.
set -euo pipefail
cd "$(dirname "$0")/.."

FHT_GIT=""; PREBUILT=1; DEVICE_TORCH="2.11.0"
while [ $# -gt 0 ]; do
  case "$1" in
    --fht-git) FHT_GIT="$2"; shift ;;
    --no-prebuilt) PREBUILT=0 ;;
    --device-torch) DEVICE_TORCH="$2"; shift ;;
    -h|--help) sed -n 2,21p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

HOST_PY=.venv/bin/python
[ -x "$HOST_PY" ] || HOST_PY=python3
mkdir -p .whl
echo "[prepare] wheels for the device's Python 3.12 -> .whl/"
"$HOST_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl nvidia-cutlass==4.2.0.0 geoopt==0.5.1 gguf==0.19.0

if [ -n "$FHT_GIT" ]; then
  echo "[prepare] fast-hadamard-transform source from $FHT_GIT"
  git -C "$FHT_GIT" archive --format=tar.gz --prefix=fast-hadamard-transform/ \
      -o "$PWD/.whl/fast-hadamard-transform-src.tar.gz" HEAD
fi

if [ "$PREBUILT" = 1 ]; then
  VENV=.venv-device
  if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$DEVICE_TORCH')" 2>/dev/null; then
    echo "[prepare] $VENV with torch==$DEVICE_TORCH"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==$DEVICE_TORCH" numpy ninja "setuptools>=64" wheel \
        nvidia-cutlass==4.2.0.0
  fi
  if TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" "$VENV/bin/python" -c "
import sys; sys.path.insert(0, 'bench'); import prebuilt
ok, why = prebuilt.check('.prebuilt'); print('[prepare] .prebuilt:', 'up to date' if ok else why)
sys.exit(0 if ok else 1)"; then
    du -sh .whl .prebuilt 2>/dev/null || true
    echo "[prepare] done: carry [\".whl\", \".prebuilt\"] and run: bash bench/gpu_round.sh --budget 540 --quick"
    exit 0
  fi
  SRC=$(mktemp -d /tmp/ostquant-prebuild.XXXXXX)
  tar --exclude=./.venv --exclude=./.venv-device --exclude=./.git --exclude=./build \
      --exclude='*.so' --exclude=./.whl --exclude=./.prebuilt -cf - . | tar -xf - -C "$SRC"
  echo "[prepare] building ostquant._C for torch $DEVICE_TORCH (archs ${TORCH_CUDA_ARCH_LIST:-9.0a}) in $SRC"
  (cd "$SRC" && CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" \
      TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-2}" \
      "$OLDPWD/$VENV/bin/pip" install -q --no-build-isolation --no-deps -e .) \
      > /tmp/ostquant-prebuild.log 2>&1 || { tail -30 /tmp/ostquant-prebuild.log; exit 1; }
  SO=$(ls "$SRC"/ostquant/_C*.so)
  # keyed on the copy's sources (what was compiled), not on the tree, which may have changed
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" "$VENV/bin/python" "$SRC/bench/prebuilt.py" \
      save "$PWD/.prebuilt" "$SO"
  if [ "$("$VENV/bin/python" bench/prebuilt.py hash)" != "$("$VENV/bin/python" "$SRC/bench/prebuilt.py" hash)" ]; then
    echo "[prepare] WARNING: the sources changed during the build; .prebuilt will not be used for them"
  fi
  rm -rf "$SRC"
fi
du -sh .whl .prebuilt 2>/dev/null || true
echo "[prepare] done: carry [\".whl\", \".prebuilt\"] and run: bash bench/gpu_round.sh --budget 540 --quick"
