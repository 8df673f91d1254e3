"""Shared entry-point plumbing: parse the config, run, turn user errors into one clear line.

A user error (bad flag, bad file, incompatible artifact) prints `error: ...` and exits 2 with no
traceback unless `--debug`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from dtvg_ds.artifacts import ArtifactError
from dtvg_ds.checkpoint import CheckpointError
from dtvg_ds.config import ConfigError, TrainConfig, parse_config
from dtvg_ds.data.tasks import TaskError
from dtvg_ds.engine import Preempted, TrainingError
from dtvg_ds.model import ModelLoadError

USER_ERRORS = (ConfigError, ArtifactError, TaskError, ModelLoadError, CheckpointError,
               TrainingError)


def run_entry(fn: Callable[[TrainConfig], Any], argv: list[str]) -> int:
    """Parse `argv` into a TrainConfig, call `fn`, map user errors to exit code 2."""
    debug = "--debug" in argv
    try:
        cfg = parse_config(argv)
        fn(cfg)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return 3
    except USER_ERRORS as e:
        if debug:
            raise
        msg = str(e)
        print(f"error:{chr(10) if isinstance(e, ConfigError) else ' '}{msg}", file=sys.stderr)
        return 2
    finally:
        _shutdown()
    return 0


def _shutdown() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        # Without this torch aborts at exit ("terminate called without an active exception").
        tdist.destroy_process_group()
