"""Prompt artifacts: `prompt.safetensors` + `tpv.json`, written atomically, validated on read.

The task prompt vector (TPV) format, version 1 — a directory holding:
- `prompt.safetensors`: fp32 tensors `prompt` (r x d, the best checkpoint's prompt), `init`
  (r x d, the shared P_init) and `task_vector` (= prompt - init); methods may add tensors
  (e.g. DTVG's final scales `scale_target`, `scale_sources`).
- `tpv.json`: `format_version`, `task`, `method`, `backbone`, `backbone_fingerprint`,
  `num_tokens`, `d_model`, `init_method`, `init_seed`, `init_fingerprint`, `steps`,
  `best_metric` {name, value, step}, `dtvg_ds_version`, `safetensors_sha256`, and free-form
  `extra`.
Loading never unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
TENSORS_FILE = "prompt.safetensors"
META_FILE = "tpv.json"
REQUIRED_META = ("task", "backbone", "backbone_fingerprint", "num_tokens", "d_model",
                 "init_method", "init_seed", "init_fingerprint", "steps", "best_metric",
                 "dtvg_ds_version")


class ArtifactError(ValueError):
    """A prompt artifact is missing, corrupt or incompatible; the message names file and fix."""


def tensor_fingerprint(t: torch.Tensor) -> str:
    """Short sha256 of a tensor's fp32 bytes: identical inits have identical fingerprints."""
    data = t.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def fsync_dir(path: Path) -> None:
    """Make a rename or new file in `path` durable (best effort where directories cannot be
    opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """All rows or nothing: one atomic write (temp file, fsync, rename)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(path, data.encode("utf-8"))


@dataclass
class PromptArtifact:
    """An artifact in memory: fp32 CPU tensors and the metadata dict."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path | None = None

    @property
    def prompt(self) -> torch.Tensor:
        return self.tensors["prompt"]

    @property
    def init(self) -> torch.Tensor:
        return self.tensors["init"]

    @property
    def task_vector(self) -> torch.Tensor:
        return self.tensors["task_vector"]

    @property
    def name(self) -> str:
        return str(self.meta["task"])


IN_PROGRESS, COMPLETE = "in_progress", "complete"  # tpv.json `status` of a training run's artifact


def save_artifact(out_dir: str | Path, prompt: torch.Tensor, init: torch.Tensor,
                  meta: dict[str, Any], extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a prompt artifact (call on rank 0 only, with full tensors). Returns the dir."""
    from safetensors.torch import save

    from dtvg_ds import __version__

    out = Path(out_dir)
    prompt, init = prompt.detach().float().cpu().contiguous(), init.detach().float().cpu().contiguous()
    if prompt.shape != init.shape or prompt.dim() != 2:
        raise ValueError(f"prompt {tuple(prompt.shape)} and init {tuple(init.shape)} must be r x d")
    tensors = {"prompt": prompt, "init": init, "task_vector": (prompt - init).contiguous()}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().float().cpu().contiguous()
    blob = save(tensors)
    full = {  # derived fields last: they describe the tensors actually written
        **meta,
        "format_version": FORMAT_VERSION,
        "dtvg_ds_version": __version__,
        "num_tokens": int(prompt.shape[0]),
        "d_model": int(prompt.shape[1]),
        "init_fingerprint": tensor_fingerprint(init),
        "safetensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    missing = [k for k in REQUIRED_META if k not in full]
    if missing:
        raise ValueError(f"artifact metadata lacks {missing}")
    # Tensors first, JSON last: the JSON carries the tensors' checksum, so a reader never
    # accepts a JSON that describes different tensors than the ones on disk.
    atomic_write_bytes(out / TENSORS_FILE, blob)
    atomic_write_json(out / META_FILE, full)
    return out


def load_artifact(path: str | Path, allow_in_progress: bool = False) -> PromptArtifact:
    """Read and validate an artifact dir (or its tpv.json). Never unpickles.

    A run rewrites its artifact at every new best, with `status: in_progress` until the run
    ends; such an artifact is refused unless `allow_in_progress` (then a warning says so).
    Artifacts without a status (written before it existed) count as complete."""
    from safetensors.torch import load

    p = Path(path)
    if p.name in (META_FILE, TENSORS_FILE):
        p = p.parent
    meta_f, tens_f = p / META_FILE, p / TENSORS_FILE
    if not p.is_dir():
        raise ArtifactError(f"{p}: no such artifact directory; pass the output dir of a "
                            "stage-1 run (it holds prompt.safetensors and tpv.json)")
    for f in (meta_f, tens_f):
        if not f.is_file():
            raise ArtifactError(f"{f}: missing; {p} is not a complete prompt artifact "
                                "(re-run or re-export it)")
    try:
        meta = json.loads(meta_f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{meta_f}: not valid JSON ({e}); the file is corrupt") from None
    blob = tens_f.read_bytes()
    want = meta.get("safetensors_sha256")
    if want and hashlib.sha256(blob).hexdigest() != want:
        raise ArtifactError(f"{tens_f}: checksum does not match {META_FILE} (truncated or "
                            "modified); restore it or re-run the stage that wrote it")
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types for torn files
        raise ArtifactError(f"{tens_f}: unreadable safetensors ({e}); the file is corrupt") from None
    art = PromptArtifact(tensors=tensors, meta=meta, path=p)
    _check(art, meta_f, tens_f)
    if meta.get("status") == IN_PROGRESS:
        what = (f"{p}: the artifact of a run that has not finished (best so far, written at step "
                f"{meta.get('steps')})")
        if not allow_in_progress:
            raise ArtifactError(f"{what}; let that run finish (--resume auto), or pass "
                                "--allow_in_progress_artifacts to use it anyway")
        print(f"WARNING: {what}; used because --allow_in_progress_artifacts was given",
              file=sys.stderr, flush=True)
    return art


def _check(art: PromptArtifact, meta_f: Path, tens_f: Path) -> None:
    missing = [k for k in REQUIRED_META if k not in art.meta]
    if missing:
        raise ArtifactError(f"{meta_f}: lacks {missing}; not a dtvg_ds prompt artifact")
    for k in ("prompt", "init", "task_vector"):
        if k not in art.tensors:
            raise ArtifactError(f"{tens_f}: lacks tensor {k!r}; not a dtvg_ds prompt artifact")
    r, d = art.meta["num_tokens"], art.meta["d_model"]
    for k in ("prompt", "init", "task_vector"):
        t = art.tensors[k]
        if tuple(t.shape) != (r, d):
            raise ArtifactError(f"{tens_f}: {k} has shape {tuple(t.shape)}, {META_FILE} says "
                                f"{r} x {d}; the files do not belong together")
        if not torch.isfinite(t).all():
            raise ArtifactError(f"{tens_f}: {k} contains NaN/Inf; the run that wrote it "
                                "diverged: re-train it (lower --learning_rate)")
    if not torch.allclose(art.task_vector, art.prompt - art.init, atol=1e-5):
        raise ArtifactError(f"{tens_f}: task_vector != prompt - init; the artifact was edited")
    if tensor_fingerprint(art.init) != art.meta["init_fingerprint"]:
        raise ArtifactError(f"{tens_f}: init does not match init_fingerprint in {META_FILE}")


def check_compatible(arts: list[PromptArtifact]) -> None:
    """Refuse artifacts that do not share P_init, backbone, r and d (TPVs would be meaningless)."""
    if not arts:
        return
    ref = arts[0]
    for a in arts[1:]:
        for key, what in (("backbone_fingerprint", "backbone"), ("num_tokens", "prompt length r"),
                          ("d_model", "d_model"), ("init_fingerprint", "prompt init")):
            if a.meta[key] != ref.meta[key]:
                raise ArtifactError(
                    f"{a.path}: {what} differs from {ref.path} ({key} {a.meta[key]!r} vs "
                    f"{ref.meta[key]!r}); task prompt vectors are only comparable when trained "
                    "from the same backbone and the same --prompt_init/--prompt_init_seed")


def best_metric(name: str, value: float, step: int) -> dict[str, Any]:
    """The `best_metric` record of the metadata."""
    return {"name": name, "value": None if math.isnan(value) else float(value), "step": int(step)}
