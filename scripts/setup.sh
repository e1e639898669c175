#!/usr/bin/env bash
# Create .venv (if missing) and install vargen with its dev tools into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch/torchvision: a range in pyproject.toml; pip takes the local 2.14.1/0.29.1 pair where present.
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import vargen, vargen_kernels, torch; print('vargen ready: torch', torch.__version__)"
