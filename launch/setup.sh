#!/usr/bin/env bash
# Create .venv (if missing) and install dstein with its test tools. Idempotent.
# DSTEIN_TORCH selects the torch build (default: the CPU build torch==2.13.0; on a GPU
# cluster set it to the CUDA build you use, e.g. DSTEIN_TORCH="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${DSTEIN_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
# DeepSpeed JIT-builds a small shared-memory op on CPU at its first use (g++ and ninja).
# Build it here, once, with the ninja of .venv and into this environment's own build
# directory, as every start does (own_op_build): another ninja release first on PATH, or
# another environment's build in the same directory, would rebuild it (about 30 s). A rank
# killed during that build leaves torch's lock there (deepspeed_shm_comm/lock), which the
# next start removes at once (dstein/op_build.py).
.venv/bin/python -c "from dstein.op_build import prepare_op; prepare_op()" >/dev/null
