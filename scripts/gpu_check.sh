#!/usr/bin/env bash
# The GPU path in one command, for the first GPU machine that becomes available.
# NOT RUN YET: the development and CI machines have no GPU (see README, "What runs where").
#
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 scripts/gpu_check.sh   # ~8 min
#
# 1. Flan-T5-XL at its real size on this machine's GPUs (NCCL, bf16, ZeRO-3): PT with a
#    --stop_at_step checkpoint, --resume auto + evaluation by generation, and a batch-4 step
#    with --gradient_checkpointing; per-phase torch.cuda.max_memory_allocated next to the plan.
# 2. The real-launch test tier (`-m dist`) with DTVG_TEST_ACCELERATOR=cuda: those tests run 2
#    ranks, which needs 2 GPUs (NCCL refuses two ranks on one device); with one GPU a 1-rank
#    smoke of train -> stop -> resume -> predict on the tiny test model runs instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
PY=.venv/bin/python
NGPU=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$NGPU" -lt 1 ]; then
  echo "gpu_check: no CUDA device visible to torch ($($PY -c 'import torch; print(torch.__version__)'));" \
       "install a CUDA build: TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 scripts/setup_env.sh" >&2
  exit 2
fi
unset DS_ACCELERATOR  # DeepSpeed picks CUDA and NCCL
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1
RANKS=$(( NGPU < 8 ? NGPU : 8 ))
echo "== 1. XL on $RANKS GPU(s)"
timeout 360 $PY bench/xl_scale.py --ranks "$RANKS" --cases pt_stop pt_resume batch4_gc \
  --out bench/out/xl_gpu
echo "== 2. real launches on GPUs"
if [ "$NGPU" -ge 2 ]; then
  DTVG_TEST_ACCELERATOR=cuda timeout 300 $PY -m pytest -q -ra -m dist -x tests/test_train_dist.py \
    tests/test_memory.py tests/test_dist_core.py
else
  tmp=$(mktemp -d)
  $PY -c "from pathlib import Path; from tests.conftest import build_tiny_t5; build_tiny_t5(Path('$tmp/m'))"
  common=(--task senti_a --model_name_or_path "$tmp/m" --output_dir "$tmp/run" --bf16
          --num_virtual_tokens 8 --max_steps 6 --per_device_train_batch_size 4 --eval_steps 3
          --max_eval_samples 16 --report_to none --trace_memory)
  .venv/bin/deepspeed --num_gpus 1 launchers/train.py "${common[@]}" --stop_at_step 3
  .venv/bin/deepspeed --num_gpus 1 launchers/train.py "${common[@]}" --resume auto
  $PY -m dtvg_ds.predict --help >/dev/null
  grep -h '"phase"' "$tmp"/run/memory.rank0.jsonl | tail -3
  echo "gpu_check: 1-GPU smoke passed (2-rank tests need 2 GPUs)"
fi
echo "gpu_check: done"
