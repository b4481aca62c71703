#!/usr/bin/env bash
# Installs sra-fast into the active Python environment.
# - A torch that is already installed (e.g. your CUDA build) is kept: nothing is reinstalled.
# - With no torch: a machine with an NVIDIA GPU gets the default torch; a CPU-only machine gets
#   a CPU build (torch==$SRA_FAST_CPU_TORCH, "+cpu" local version) from the configured package
#   indexes or else PyTorch's CPU wheel index, rather than a multi-GB CUDA build nobody asked
#   for (PyPI itself has no "+cpu" builds).
# - A torch older than setup.py's minimum (2.4) is upgraded by pip.
# Usage: ./install.sh [EXTRAS]: the package with its extras, default "test" (pytest,
# diffusers for the VAE, TensorBoard); "base" installs the package alone.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
CPU_TORCH=${SRA_FAST_CPU_TORCH:-2.13.0}
EXTRAS=${1:-test}

if $PY -c "import torch" 2>/dev/null; then
  echo "[install] keeping torch $($PY -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[install] GPU found, installing torch"
  $PY -m pip install torch
else
  echo "[install] CPU-only machine: installing a CPU build of torch"
  $PY -m pip install "torch==${CPU_TORCH}+cpu" || {
    echo "[install] no CPU build of torch ${CPU_TORCH} on the configured indexes: trying"
    echo "[install] PyTorch's CPU wheel index"
    $PY -m pip install "torch==${CPU_TORCH}+cpu" \
      --extra-index-url https://download.pytorch.org/whl/cpu
  } || {
    echo "[install] no CPU build of torch ${CPU_TORCH} there either; set PIP_EXTRA_INDEX_URL"
    echo "[install] to a CPU wheel index, or SRA_FAST_CPU_TORCH to another version; falling"
    echo "[install] back to the default torch build"
    $PY -m pip install torch
  }
fi
if [ "$EXTRAS" = base ]; then   # the package alone: no test tools, VAE or TensorBoard
  $PY -m pip install -e .
else
  $PY -m pip install -e ".[${EXTRAS}]"
fi
