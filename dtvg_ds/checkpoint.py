"""Save and resume of the training state: the only module that writes checkpoints.

A checkpoint is `<output_dir>/checkpoints/step-XXXXXXXX/` holding
- DeepSpeed's own files (trainable parameters, the ZeRO-partitioned optimizer state and the LR
  scheduler), saved with `exclude_frozen_parameters=True` so the frozen backbone is never copied;
- `rng_rank{k}.safetensors` + `rng_rank{k}.json`: every rank's RNG state (dropout, sampling),
  saved by every rank (DeepSpeed's client state is saved by rank 0 only under ZeRO-1/2);
- `best.safetensors`: the best-validation prompt so far (and method extras);
- `trainer_state.json`, written last by rank 0: step, best metric, the config. Its presence
  marks the checkpoint complete; a directory without it is ignored by `--resume auto`.
The data position is the step itself (see `data.batches`).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from dtvg_ds import dist
from dtvg_ds.artifacts import atomic_write_bytes, atomic_write_json

STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message says which and why."""


def ckpt_root(out_dir: str | Path) -> Path:
    """Where the checkpoints of a run live."""
    return Path(out_dir) / "checkpoints"


def _tag(step: int) -> str:
    return f"step-{step:08d}"


def _save_rng(d: Path) -> None:
    from safetensors.torch import save

    k = dist.rank()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    atomic_write_bytes(d / f"rng_rank{k}.safetensors", save(tensors))
    version, state, gauss = random.getstate()
    atomic_write_json(d / f"rng_rank{k}.json", {"python": [version, list(state), gauss]})


def _load_rng(d: Path) -> None:
    from safetensors.torch import load

    k = dist.rank()
    f = d / f"rng_rank{k}.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing; was this checkpoint written with another world size?")
    tensors = load(f.read_bytes())
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, state, gauss = json.loads((d / f"rng_rank{k}.json").read_text())["python"]
    random.setstate((version, tuple(state), gauss))


def save(engine: Any, out_dir: str | Path, step: int, state: dict[str, Any],
         best_tensors: dict[str, torch.Tensor] | None, keep: int) -> Path:
    """Write a checkpoint of `step` (all ranks call this), then prune to the newest `keep`."""
    from safetensors.torch import save as st_save

    root = ckpt_root(out_dir)
    d = root / _tag(step)
    # collective: DeepSpeed gathers nothing here but every rank writes its optimizer partition
    engine.save_checkpoint(str(root), tag=_tag(step), exclude_frozen_parameters=True)
    _save_rng(d)
    if dist.is_main() and best_tensors:
        atomic_write_bytes(d / "best.safetensors",
                           st_save({k: v.contiguous() for k, v in best_tensors.items()}))
    dist.barrier()  # every rank's files are on disk before the completion marker
    if dist.is_main():
        atomic_write_json(d / STATE_FILE, {"step": step, "world_size": dist.world_size(), **state})
        _prune(root, keep)
    dist.barrier()  # nobody races ahead while rank 0 prunes
    return d


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def _prune(root: Path, keep: int) -> None:
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume(out_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint dir that `--resume` names ('auto': the newest complete one, or None)."""
    if not resume:
        return None
    if resume == "auto":
        done = _complete(ckpt_root(out_dir))
        return done[-1] if done else None
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); "
                              "pass a checkpoints/step-* dir or 'auto'")
    return p


def load(engine: Any, d: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore engine, optimizer, scheduler and RNG from `d` (all ranks call this).

    Returns (trainer state, best tensors).
    """
    from safetensors.torch import load as st_load

    state = json.loads((d / STATE_FILE).read_text())
    if state.get("world_size") != dist.world_size():
        raise CheckpointError(f"{d}: written with world size {state.get('world_size')}, now "
                              f"{dist.world_size()}; resume with the same number of ranks")
    # collective: every rank loads its own optimizer partition
    path, _ = engine.load_checkpoint(str(d.parent), tag=d.name, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"{d}: DeepSpeed could not load it (see the log above)")
    _load_rng(d)
    best_f = d / "best.safetensors"
    best = st_load(best_f.read_bytes()) if best_f.is_file() else {}
    return state, best
