#!/usr/bin/env bash
# Create ./.venv and install dtvg_ds into it. torch goes in FIRST and pinned, so that nothing
# later resolves "torch" to a multi-GB CUDA build on a CPU-only machine.
#   TORCH_VERSION (default 2.13.0)  TORCH_INDEX_URL (optional, e.g. a CUDA wheel index)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
STAMP=.venv/.dtvg_ds-installed
want="$(cat setup.cfg pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
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
.venv/bin/pip install -q numpy ninja packaging psutil py-cpuinfo pydantic hjson msgpack
.venv/bin/pip install -q --no-build-isolation "deepspeed==0.19.8"
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, deepspeed, transformers; print('dtvg_ds env: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$STAMP"
