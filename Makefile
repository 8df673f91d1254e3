# dtvg_ds — `make demo` and `make test` set themselves up (./.venv) on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# The CPU accelerator unless a GPU answers (then DeepSpeed picks CUDA and NCCL by itself);
# DS_ACCELERATOR set by the caller always wins.
ifeq ($(origin DS_ACCELERATOR), undefined)
  ifeq ($(shell nvidia-smi -L 2>/dev/null | grep -c GPU),0)
    export DS_ACCELERATOR := cpu
  endif
endif
export PYTHONPATH := $(CURDIR)
# One JIT-compiled DeepSpeed op cache per checkout (built once, ~60 s, on the first launch).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup test test-fast demo lint bench bench-xl bench-transfer gpu-check clean

setup:
	@scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q -ra tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not dist and not slurm" tests

demo: setup
	$(PY) -m dtvg_ds.demo

lint: setup
	$(VENV)/bin/ruff check dtvg_ds launchers tests bench

# Benchmarks (minutes to an hour on 2 CPU cores); figures go to bench/RESULTS*.md by hand/script.
bench: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 bench/grouping_cost.py
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 bench/eval_generation.py
	$(PY) bench/step_time.py
	$(PY) bench/compare_methods.py
	$(PY) bench/quant_memory.py

# Flan-T5-XL at its real size (~30 min and ~22 GiB on 2 CPU ranks: run nothing beside it).
# Few-shot transfer: PT, SPoT, MPT, DTVG, ablations, lr_2 sweep, extensions (~2 h on 2 cores).
bench-transfer: setup
	$(PY) bench/transfer.py

bench-xl: setup
	$(PY) bench/xl_scale.py

# On a GPU machine: the GPU path in one command (see scripts/gpu_check.sh).
gpu-check: setup
	scripts/gpu_check.sh

clean:
	rm -rf runs .pytest_cache .ruff_cache
