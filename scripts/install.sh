#!/usr/bin/env bash
# Install ephys-gpt and its dependencies, choosing the right PyTorch build first.
#
#   scripts/install.sh [EXTRAS]        e.g. scripts/install.sh preprocess,dev
#
# Environment:
#   EPHYS_PYTHON       python interpreter to install into. Default: the active virtualenv or
#                      conda env if there is one, otherwise ./.venv (created on first use).
#   EPHYS_TORCH_SPEC   pip requirement for torch (default: keep an installed torch; otherwise
#                      "torch==2.13.0" on machines without an NVIDIA GPU, "torch" with one).
#   EPHYS_TORCH_INDEX  extra index to take torch from, e.g. the PyTorch CPU wheel index.
#
# Prints the path of the interpreter it installed into as its last line.
set -euo pipefail
extras="${1:-preprocess,dev}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ -n "${EPHYS_PYTHON:-}" ]]; then
  py="$EPHYS_PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
  py="$VIRTUAL_ENV/bin/python"
elif [[ -n "${CONDA_PREFIX:-}" ]]; then
  py="$CONDA_PREFIX/bin/python"
else
  if [[ ! -x "$root/.venv/bin/python" ]]; then
    echo "[install] creating virtual environment $root/.venv" >&2
    python3 -m venv "$root/.venv"
  fi
  py="$root/.venv/bin/python"
fi

pip_q=(-q --disable-pip-version-check)
if ! "$py" -c "import torch" >/dev/null 2>&1 || [[ -n "${EPHYS_TORCH_SPEC:-}" ]]; then
  if [[ -n "${EPHYS_TORCH_SPEC:-}" ]]; then
    spec="$EPHYS_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch"
  else
    # No GPU: pin the CPU build. A bare "torch" would pull the CUDA build and gigabytes
    # of nvidia-* packages that a CPU-only machine cannot use.
    spec="torch==2.13.0"
  fi
  echo "[install] installing $spec" >&2
  if [[ -n "${EPHYS_TORCH_INDEX:-}" ]]; then
    "$py" -m pip install "${pip_q[@]}" "$spec" --extra-index-url "$EPHYS_TORCH_INDEX" >&2
  else
    "$py" -m pip install "${pip_q[@]}" "$spec" >&2
  fi
fi

target="$root"
[[ -n "$extras" ]] && target="$root[$extras]"
# Installing torch first means the "torch>=2.3" requirement is already met, so pip keeps the
# build chosen above instead of swapping it for the CUDA one.
if ! "$py" -m pip install "${pip_q[@]}" -e "$target" >&2; then
  echo "[install] pip failed installing ephys-gpt[$extras]; see the messages above" >&2
  exit 1
fi
if "$py" -m pip list 2>/dev/null | grep -qi '^nvidia-' && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "[install] warning: CUDA packages are installed on a machine without an NVIDIA GPU" >&2
fi
echo "$py"
