#!/usr/bin/env bash
# Create ./.venv and install dtvg_ds into it. torch goes in FIRST and pinned, so that nothing
# later resolves "torch" to a multi-GB CUDA build on a CPU-only machine.
#   TORCH_VERSION (default 2.13.0)  TORCH_INDEX_URL (optional, e.g. a CUDA wheel index)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
STAMP=.venv/.dtvg_ds-installed
want="$(cat setup.cfg pyproject.toml scripts/setup_env.sh scripts/constraints.txt | sha256sum | cut -c1-16)"
# The exact versions tested; setup.cfg has ranges. DTVG_CONSTRAINTS= (empty) installs the newest
# versions the ranges allow instead.
CONSTRAINTS="${DTVG_CONSTRAINTS-scripts/constraints.txt}"
C=()
if [ -n "$CONSTRAINTS" ]; then C=(-c "$CONSTRAINTS"); fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/pip install -q "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/pip install -q "torch==${TORCH_VERSION}"
fi
# deepspeed's setup.py imports torch: build it against the torch just installed.
.venv/bin/pip install -q "${C[@]}" numpy ninja packaging psutil py-cpuinfo pydantic hjson msgpack
.venv/bin/pip install -q "${C[@]}" --no-build-isolation "deepspeed>=0.19,<0.20"
.venv/bin/pip install -q "${C[@]}" -e ".[dev]"
.venv/bin/python -c "import torch, deepspeed, transformers; print('dtvg_ds env: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$STAMP"
