"""Rank-0 run logging: JSONL always, TensorBoard when installed, tqdm progress bars.

Every rank may call these; only rank 0 writes or draws, so logs never interleave.
"""

from __future__ import annotations

import json
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
    """Appends one JSON object per line to `<output_dir>/<name>` and mirrors scalars to TB."""

    def __init__(self, out_dir: str | Path, tensorboard: bool, name: str = "metrics.jsonl"):
        self.main = dist.is_main()
        self.path = Path(out_dir) / name
        self.tb = None
        if self.main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must contain `step`)."""
        if not self.main:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tb is not None:
            self.tb.close()


def progress(total: int, initial: int = 0, desc: str = "train"):
    """A tqdm bar with rate and ETA on rank 0; a silent stand-in elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not dist.is_main(),
                dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
