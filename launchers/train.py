#!/usr/bin/env python
"""Train a soft prompt on a frozen backbone with DeepSpeed (thin entry point).

    deepspeed launchers/train.py --deepspeed ds_configs/zero3.json --method pt --task senti_a \
        --model_name_or_path demo --output_dir runs/senti_a

On a CPU-only machine: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/train.py ...
Also runs under `torchrun --nproc_per_node N` and `srun` (see launchers/slurm/).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtvg_ds.cli import run_entry  # noqa: E402

HOW_TO_LAUNCH = """\
launchers/train.py must be started by a distributed launcher, e.g.

  GPUs:  deepspeed --num_gpus 8 launchers/train.py --deepspeed ds_configs/zero3.json \\
             --method pt --task <task> --model_name_or_path <hub id|dir> --output_dir <dir>
  CPU:   DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/train.py ...
  or:    torchrun --nproc_per_node 2 launchers/train.py ...
  SLURM: sbatch launchers/slurm/stage1.sbatch ...

(`--help` lists every flag.)"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ and not (
            {"-h", "--help"} & set(argv)):
        print(HOW_TO_LAUNCH, file=sys.stderr)
        return 2
    from dtvg_ds.engine import train

    return run_entry(train, argv)


if __name__ == "__main__":
    from dtvg_ds.cli import exit_process

    exit_process(main())
