#!/usr/bin/env python
"""Train a soft prompt on a frozen backbone with DeepSpeed (thin entry point; the same as
`deepspeed --module dtvg_ds.train`, which also works from an installed wheel).

    deepspeed launchers/train.py --deepspeed ds_configs/zero3.json --method pt --task senti_a \
        --model_name_or_path demo --output_dir runs/senti_a

On a CPU-only machine: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/train.py ...
Also runs under `torchrun --nproc_per_node N` and `srun` (see launchers/slurm/).
dtvg_ds must be installed (`make setup` installs the checkout in editable mode).
"""

from __future__ import annotations

from dtvg_ds.train import main

if __name__ == "__main__":
    from dtvg_ds.cli import exit_process

    exit_process(main())
