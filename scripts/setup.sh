#!/usr/bin/env bash
# Create .venv (if missing) and install vargen with its dev tools into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch/torchvision: a range in pyproject.toml; pip takes the local 2.14.1/0.29.1 pair where present.
log=$(mktemp)
if ! .venv/bin/python -m pip install -e ".[dev]" >"$log" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -40
  echo "setup failed: pip install -e .[dev] (full log: $log)" >&2
  exit 1
fi
rm -f "$log"
.venv/bin/python -c "import vargen, vargen_kernels, torch; print('vargen ready: torch', torch.__version__)"
