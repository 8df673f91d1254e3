"""Train a soft prompt on a frozen backbone with DeepSpeed: the training entry point.

    deepspeed --module dtvg_ds.train --deepspeed zero3 --method pt --task rte \\
        --model_name_or_path google/flan-t5-xl --output_dir runs/rte
    torchrun --nproc_per_node 8 -m dtvg_ds.train ...
    deepspeed launchers/train.py ...        (the same, from a checkout)

Works from an installed wheel (no checkout): the shipped DeepSpeed configs are package data,
selectable by name (`--deepspeed zero3`) or by path. Exit codes: 0 done, 2 user error, 3
preempted and checkpointed (resume with --resume auto).
"""

from __future__ import annotations

import os
import sys

HOW_TO_LAUNCH = """\
dtvg_ds.train must be started by a distributed launcher, e.g.

  GPUs:  deepspeed --num_gpus 8 --module dtvg_ds.train --deepspeed zero3 \\
             --method pt --task <task> --model_name_or_path <hub id|dir> --output_dir <dir>
  CPU:   DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module dtvg_ds.train ...
  or:    torchrun --nproc_per_node 2 -m dtvg_ds.train ...
  from a checkout: deepspeed launchers/train.py ...;  SLURM: sbatch launchers/slurm/stage1.sbatch ...

(`--help` lists every flag.)"""


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and train; the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ and not (
            {"-h", "--help"} & set(argv)):
        print(HOW_TO_LAUNCH, file=sys.stderr)
        return 2
    from dtvg_ds.cli import run_entry
    from dtvg_ds.engine import train

    return run_entry(train, argv)


if __name__ == "__main__":
    from dtvg_ds.cli import exit_process

    exit_process(main())
