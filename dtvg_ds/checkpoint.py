"""Save and resume of the training state: the only module that writes checkpoints.

A checkpoint is `<output_dir>/checkpoints/step-NNNNNNNN/` holding
- DeepSpeed's own files (trainable parameters, the ZeRO-partitioned optimizer state and the LR
  scheduler), saved with `exclude_frozen_parameters=True` so the frozen backbone is never copied;
- `rng_rank{k}.safetensors` + `rng_rank{k}.json`: every rank's RNG state (dropout, sampling),
  saved by every rank (DeepSpeed's client state is saved by rank 0 only under ZeRO-1/2);
- `best.safetensors`: the best-validation prompt so far (and method extras);
- `manifest.json`: every other file of the directory with its size and sha256;
- `trainer_state.json`, written last by rank 0: step, best metric, the config, the sha256 of
  `manifest.json` and of itself. Its presence marks the checkpoint complete.
The data position is the step itself (see `data.batches`).

Atomic at the directory level: every rank writes into `checkpoints/.tmp-step-NNNNNNNN/`; after
a barrier rank 0 hashes (and fsyncs) every file into the manifest, writes the marker, renames the
directory to `step-NNNNNNNN` and fsyncs the parent. A `step-*` directory therefore either did
not exist before the crash or is complete; a crash mid-save leaves only a hidden `.tmp-*` dir
that resume never looks at and the next successful save removes.

On resume every candidate is verified against its manifest: `--resume auto` takes the newest
checkpoint that verifies and skips torn or modified ones with a warning; an explicit
`--resume DIR` that does not verify is refused. Pruning keeps the newest `--save_total_limit`
checkpoints and never deletes the one just written, the newest one that verifies, or the one this
run resumed from. Checkpoint directories must be on a filesystem every rank (and rank 0 in
particular) can see, as DeepSpeed's own resume requires.

Only our own checkpoints are ever unpickled (DeepSpeed's `torch.save` files, read back by
`engine.load_checkpoint`); user artifacts are safetensors + JSON only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from dtvg_ds import dist
from dtvg_ds.artifacts import atomic_write_bytes, atomic_write_json, fsync_dir

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step-(\d+)$")
# errnos that mean "the output filesystem refuses writes": always the user's to fix.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})  # whichever file
PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR})  # a path of ours
WRITE_ERRNOS = DISK_ERRNOS | PATH_ERRNOS


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message says which and why."""


class OutputWriteError(CheckpointError):
    """The output directory refuses writes (full, read-only, quota, a file in the way)."""


def ckpt_root(out_dir: str | Path) -> Path:
    """Where the checkpoints of a run live."""
    return Path(out_dir) / "checkpoints"


def _tag(step: int) -> str:
    return f"step-{step:08d}"


def step_of(d: Path) -> int | None:
    """The step of a `step-NNNNNNNN` directory name (None for anything else)."""
    m = _STEP_RE.match(d.name)
    return int(m.group(1)) if m else None


def _warn(msg: str) -> None:
    if dist.is_main():
        print(f"[dtvg_ds] warning: {msg}", file=sys.stderr, flush=True)


def is_write_error(e: BaseException) -> bool:
    """True if `e` means the disk refused a write (as opposed to a bug or a dead peer).

    torch.save reports a failed write as a RuntimeError from its zip writer
    ("PytorchStreamWriter failed writing file", "[enforce fail at inline_container.cc ...]").
    """
    if isinstance(e, OSError):
        return e.errno in WRITE_ERRNOS
    if isinstance(e, RuntimeError) and type(e).__name__ != "DistBackendError":
        s = str(e)
        return "PytorchStreamWriter" in s or "inline_container" in s or "file write failed" in s
    return False


def write_error_message(e: BaseException, out_dir: str | Path, what: str) -> str:
    """One line naming the directory, the cause and the fix (no traceback)."""
    if isinstance(e, OSError) and e.errno is not None:
        cause = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
        if e.filename:
            cause += f" ({e.filename})"
    else:
        cause = "torch.save could not write its file"  # its own message is zip-writer noise
    return (f"cannot write {what} in --output_dir {out_dir} ({cause}); the directory is full, "
            "read-only, over quota or blocked by a file: free space or make it writable (or "
            "pass another --output_dir), then continue with --resume auto; checkpoints "
            "already written are intact")


# ----------------------------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------------------------

def _hash_file(p: Path, fsync: bool = False) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())  # DeepSpeed's torch.save files are not fsynced by DeepSpeed
    return {"size": size, "sha256": h.hexdigest()}


def _listed_files(d: Path) -> list[Path]:
    """Every regular file of a checkpoint dir the manifest covers (all but itself and the marker)."""
    skip = {MANIFEST_FILE, STATE_FILE}
    return sorted(p for p in d.rglob("*") if p.is_file() and p.relative_to(d).as_posix() not in skip)


def build_manifest(d: Path, step: int, fsync: bool = True) -> dict[str, Any]:
    """{"step", "files": {relative path: {"size", "sha256"}}} of checkpoint dir `d`."""
    files = {p.relative_to(d).as_posix(): _hash_file(p, fsync) for p in _listed_files(d)}
    return {"format": 1, "step": step, "files": files}


def _state_digest(state: dict[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify(d: str | Path) -> dict[str, Any]:
    """The trainer state of checkpoint `d` if it is complete and unmodified; else CheckpointError.

    Checks: the marker exists and is intact, the manifest is the one the marker names, and every
    file the manifest lists exists with its size and sha256.
    """
    d = Path(d)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    sf, mf = d / STATE_FILE, d / MANIFEST_FILE
    if not sf.is_file():
        raise CheckpointError(f"{d}: incomplete (no {STATE_FILE}: the save was interrupted)")
    try:
        state = json.loads(sf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d}: {STATE_FILE} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or "manifest_sha256" not in state:
        raise CheckpointError(f"{d}: {STATE_FILE} has no manifest checksum (torn, or written by "
                              "a dtvg_ds without checkpoint manifests)")
    if state.get("state_sha256") != _state_digest(state):
        raise CheckpointError(f"{d}: {STATE_FILE} was modified (its checksum does not match)")
    if not mf.is_file():
        raise CheckpointError(f"{d}: {MANIFEST_FILE} is missing")
    blob = mf.read_bytes()
    if hashlib.sha256(blob).hexdigest() != state["manifest_sha256"]:
        raise CheckpointError(f"{d}: {MANIFEST_FILE} does not match {STATE_FILE} (modified)")
    manifest = json.loads(blob)
    for rel, want in sorted(manifest["files"].items()):
        f = d / rel
        if not f.is_file():
            raise CheckpointError(f"{d}: {rel} is missing")
        got = _hash_file(f)
        if got["size"] != want["size"]:
            raise CheckpointError(f"{d}: {rel} has {got['size']} bytes, the manifest says "
                                  f"{want['size']} (truncated or modified)")
        if got["sha256"] != want["sha256"]:
            raise CheckpointError(f"{d}: {rel} does not match its sha256 in {MANIFEST_FILE} "
                                  "(modified or corrupt)")
    return state


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------

def _save_rng(d: Path) -> None:
    from safetensors.torch import save

    k = dist.rank()
    from deepspeed.accelerator import get_accelerator

    tensors = {"torch": torch.get_rng_state()}
    acc = get_accelerator()
    if acc.device_name() != "cpu":  # the device's own generator (CUDA, XPU, NPU, ...)
        tensors["device"] = acc.get_rng_state()
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
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(tensors["torch"])
    acc = get_accelerator()
    device_state = tensors.get("device", tensors.get("cuda"))  # "cuda": older checkpoints
    if device_state is not None and acc.device_name() != "cpu":
        acc.set_rng_state(device_state)
    version, state, gauss = json.loads((d / f"rng_rank{k}.json").read_text())["python"]
    random.setstate((version, tuple(state), gauss))


def _commit(tmp: Path, final: Path, step: int, state: dict[str, Any]) -> None:
    """Rank 0: manifest, marker, rename into place, `latest`."""
    manifest = build_manifest(tmp, step)
    blob = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(tmp / MANIFEST_FILE, blob)
    full = {**state, "step": step, "world_size": dist.world_size(),
            "manifest_sha256": hashlib.sha256(blob).hexdigest()}
    full["state_sha256"] = _state_digest(full)
    atomic_write_json(tmp / STATE_FILE, full)
    fsync_dir(tmp)
    old = None
    if final.exists():  # a torn or stale dir of the same step (e.g. resumed from an older one)
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    atomic_write_bytes(final.parent / LATEST_FILE, final.name.encode())  # DeepSpeed's pointer


def save(engine: Any, out_dir: str | Path, step: int, state: dict[str, Any],
         best_tensors: dict[str, torch.Tensor] | None, keep: int,
         protect: Path | None = None) -> Path:
    """Write a checkpoint of `step` (all ranks call this), then prune to the newest `keep`;
    `protect` (the checkpoint this run resumed from) is never pruned.

    A write refused by the filesystem raises `OutputWriteError` (exit code 2); the step dir is
    then never created, so the previous checkpoints stay the newest complete ones.
    """
    from safetensors.torch import save as st_save

    root = ckpt_root(out_dir)
    final = root / _tag(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    try:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _raise_write(e, out_dir, step)
    dist.barrier()  # the stale tmp dir is gone before anyone writes into it
    try:
        # collective: DeepSpeed gathers nothing here but every rank writes its optimizer
        # partition. A write error inside raises on that rank right away (DeepSpeed's own
        # collectives follow, so we cannot agree on it); the launcher then ends the job.
        engine.save_checkpoint(str(root), tag=tmp.name, exclude_frozen_parameters=True,
                               save_latest=False)
    except (OSError, RuntimeError) as e:
        if is_write_error(e):
            _raise_write(e, out_dir, step)
        raise
    failure: BaseException | None = None
    try:
        _save_rng(tmp)
        if dist.is_main() and best_tensors:
            atomic_write_bytes(tmp / "best.safetensors",
                               st_save({k: v.contiguous() for k, v in best_tensors.items()}))
    except OSError as e:
        failure = e
    # collective: every rank's files are on disk (or one rank failed) before the marker
    if dist.any_rank(failure is not None):
        _raise_write(failure, out_dir, step)
    if dist.is_main():
        try:
            _commit(tmp, final, step, state)
            _prune(root, keep, {final, *([protect] if protect else [])})
        except OSError as e:
            failure = e
    # collective: nobody races ahead while rank 0 commits and prunes; all learn if it failed
    if dist.any_rank(failure is not None):
        _raise_write(failure, out_dir, step)
    return final


def _raise_write(e: BaseException | None, out_dir: str | Path, step: int) -> None:
    if e is None:  # another rank failed; it printed the cause
        raise OutputWriteError(f"another rank could not write checkpoint {_tag(step)} in "
                               f"--output_dir {out_dir}; see its error above")
    if not is_write_error(e):
        raise e
    raise OutputWriteError(write_error_message(e, out_dir, f"checkpoint {_tag(step)}")) from None


def _complete(root: Path) -> list[Path]:
    """`step-*` dirs with a completion marker, oldest first (not verified)."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if step_of(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(done, key=step_of)


def _newest_valid(root: Path, known_good: set[Path]) -> Path | None:
    for d in reversed(_complete(root)):
        if d in known_good:
            return d
        try:
            verify(d)
            return d
        except CheckpointError:
            continue
    return None


def _prune(root: Path, keep: int, protect: set[Path]) -> None:
    """Keep the newest `keep` complete checkpoints, plus every protected one and the newest
    valid one; remove stale `.tmp-*` dirs of interrupted saves."""
    protect = {p.resolve() for p in protect}
    done = _complete(root)
    newest_ok = _newest_valid(root, {p for p in done if p.resolve() in protect})
    if newest_ok is not None:
        protect.add(newest_ok.resolve())
    for old in done[:-keep]:
        if old.resolve() not in protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------------------------

def newest_valid(out_dir: str | Path) -> Path | None:
    """The newest checkpoint of `out_dir` that verifies; torn or modified ones are skipped with
    a warning (on the calling process: no collectives)."""
    root = ckpt_root(out_dir)
    if not root.is_dir():
        return None
    cands = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None),
                   key=step_of, reverse=True)
    for d in cands:
        try:
            verify(d)
            return d
        except CheckpointError as e:
            _warn(f"--resume auto: skipping {e}")
    return None


def find_resume(out_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint dir that `--resume` names ('auto': the newest that verifies, or None).

    Rank 0 decides and broadcasts, so every rank resumes from the same directory.
    """
    if not resume:
        return None
    choice: tuple[str | None, str | None] = (None, None)
    if dist.is_main():
        try:
            if resume == "auto":
                found = newest_valid(out_dir)
                choice = (str(found) if found else None, None)
            else:
                verify(resume)
                choice = (str(Path(resume)), None)
        except CheckpointError as e:
            choice = (None, f"--resume {resume}: cannot resume from {e}; pass an intact "
                            "checkpoints/step-* dir, or --resume auto (skips torn ones)")
    path, err = dist.broadcast_object(choice)  # collective: every rank, rank 0 decided
    if err:
        raise CheckpointError(err)
    return Path(path) if path else None


def load(engine: Any, d: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore engine, optimizer, scheduler and RNG from `d` (all ranks call this).

    `d` comes from `find_resume`, which verified it against its manifest. Returns (trainer
    state, best tensors).
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
