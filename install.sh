#!/usr/bin/env bash
# Installs sra-fast into the active Python environment.
# - A torch that is already installed (e.g. your CUDA build) is kept: nothing is reinstalled.
# - With no torch: a machine with an NVIDIA GPU gets the default torch; a CPU-only machine gets
#   a CPU build (torch==$SRA_FAST_CPU_TORCH, "+cpu" local version) where one is available from
#   the configured package indexes, rather than a multi-GB CUDA build nobody asked for.
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
    echo "[install] no CPU build of torch ${CPU_TORCH} on the configured indexes; set"
    echo "[install] PIP_EXTRA_INDEX_URL to a CPU wheel index, or SRA_FAST_CPU_TORCH to another"
    echo "[install] version; falling back to the default torch build"
    $PY -m pip install torch
  }
fi
$PY -m pip install -e ".[${EXTRAS}]"
