"""Rank-0 run logging: JSONL always, TensorBoard / Weights & Biases on request, tqdm bars.

Every rank may call these; only rank 0 writes or draws, so logs never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from dtvg_ds import dist

LOGGER = logging.getLogger("dtvg_ds")
LOG_LEVELS = ("debug", "info", "warning", "error")


class _Stdout(logging.Handler):
    """To whatever sys.stdout is at the time (test capture, redirection), flushed per line so
    SLURM logs show every line as it happens."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001  -- logging must never take a run down
            self.handleError(record)


def configure_logging(level: str = "info", on_each_node: bool = False) -> None:
    """Python logging for the `dtvg_ds` logger: rank 0 logs at `level` (HF Trainer's
    --log_level); the other ranks only warnings and errors, unless `on_each_node`
    (--log_on_each_node), when every rank logs at `level` with a `rank N` tag."""
    every = on_each_node and dist.world_size() > 1
    handler = _Stdout()
    tag = f"[dtvg_ds rank {dist.rank()}]" if every else "[dtvg_ds]"
    handler.setFormatter(logging.Formatter(f"{tag} %(message)s"))
    LOGGER.handlers[:] = [handler]
    LOGGER.propagate = False
    loud = dist.is_main() or every
    LOGGER.setLevel(getattr(logging, level.upper()) if loud else logging.WARNING)


def info(msg: str) -> None:
    """Log a line at INFO (by default shown on rank 0 only)."""
    if not LOGGER.handlers:
        configure_logging()
    LOGGER.info(msg)


class RunLogger:
    """Appends one JSON object per line to `<output_dir>/<name>` (always) and mirrors scalars
    to TensorBoard and/or Weights & Biases (rank 0 only)."""

    def __init__(self, out_dir: str | Path, sinks: list[str] | tuple[str, ...] = (),
                 name: str = "metrics.jsonl", config: dict[str, Any] | None = None):
        self.main = dist.is_main()
        self.path = Path(out_dir) / name
        self.tb = self.wandb = None
        if not self.main:
            return
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from dtvg_ds.config import ConfigError

                raise ConfigError(["--report_to tensorboard needs the tensorboard package (a "
                                   "dependency of dtvg_ds): pip install tensorboard, or pass "
                                   "--report_to none"]) from None
            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        if "wandb" in sinks:
            self.wandb = _start_wandb(Path(out_dir), config or {})

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must contain `step`)."""
        if not self.main:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)
                   and k not in ("step", "time")}
        if self.tb is not None:  # HF Trainer's tags: eval/<metric>, train/<anything else>
            for k, v in scalars.items():
                tag = f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
                self.tb.add_scalar(tag, v, record["step"])
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=int(record["step"]))

    def close(self) -> None:
        """Flush TensorBoard and finish the W&B run."""
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(out_dir: Path, config: dict[str, Any]) -> Any:
    """A W&B run tied to `out_dir`: its id is kept in the output dir, so `--resume` continues
    the same W&B run instead of starting a new one. Project from WANDB_PROJECT (default
    dtvg_ds); WANDB_MODE=offline works without an account."""
    import uuid

    import wandb

    from dtvg_ds.config import ConfigError

    id_file = out_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dtvg_ds"), id=run_id,
                         resume="allow", name=config.get("run_name") or out_dir.name,
                         dir=str(out_dir), config=config)
    except Exception as e:  # noqa: BLE001  -- wandb raises many types (auth, network, usage)
        raise ConfigError([f"--report_to wandb: W&B did not start ({type(e).__name__}: "
                           f"{str(e)[:200]}); run `wandb login`, or set WANDB_MODE=offline, "
                           "or drop wandb from --report_to"]) from None
    id_file.write_text(run_id)
    return run


def progress(total: int, initial: int = 0, desc: str = "train", disable: bool = False):
    """A tqdm bar with rate and ETA on rank 0 (unless `disable`); a silent stand-in elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=disable or not dist.is_main(),
                dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
