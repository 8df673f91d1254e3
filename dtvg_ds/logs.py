"""Rank-0 run logging: JSONL always, TensorBoard / Weights & Biases on request, tqdm bars.

Every rank may call these; only rank 0 writes or draws, so logs never interleave.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from dtvg_ds import dist


def info(msg: str) -> None:
    """Print a line on rank 0."""
    if dist.is_main():
        print(f"[dtvg_ds] {msg}", flush=True)


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

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self.tb = None
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
