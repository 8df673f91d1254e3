"""Shared entry-point plumbing: parse the config, run, turn user errors into one clear line.

A user error (bad flag, bad file, incompatible artifact, an output directory that refuses
writes) prints `error: <problem>; <fix>` -- one line per problem -- and exits 2 with no traceback
unless `--debug`; anything else is a bug and keeps its traceback. Before the run starts the
output directory is probed with a real write (not `os.access`, which root always passes); if the
run fails with a user error before writing anything, a directory it created is removed again.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from dtvg_ds import dist
from dtvg_ds.artifacts import ArtifactError
from dtvg_ds.checkpoint import (
    DISK_ERRNOS,
    PATH_ERRNOS,
    CheckpointError,
    OutputWriteError,
    write_error_message,
)
from dtvg_ds.config import ConfigError, TrainConfig, parse_config
from dtvg_ds.data.zoo import TaskError
from dtvg_ds.errors import Preempted, TrainingError
from dtvg_ds.methods import validate as validate_method
from dtvg_ds.model import ModelLoadError

USER_ERRORS = (ConfigError, ArtifactError, TaskError, ModelLoadError, CheckpointError,
               TrainingError)


def run_entry(fn: Callable[[TrainConfig], Any], argv: list[str]) -> int:
    """Parse `argv` into a TrainConfig, call `fn`, map user errors to exit code 2."""
    debug = "--debug" in argv
    cfg: TrainConfig | None = None
    created: list[Path] = []
    try:
        cfg = parse_config(argv, checks=[validate_method])
        created = _missing_dirs(cfg.output_dir)
        check_output_writable(cfg.output_dir, bool(cfg.resume or cfg.overwrite_output_dir))
        fn(cfg)
    except dist.PeerError as e:  # another rank failed and reports why; one line per node
        if dist.local_rank() == 0:
            report_error(e)
        return 2
    except Preempted as e:
        _close_progress_bars()
        sys.stderr.write(f"preempted: {e}\n")
        return 3
    except USER_ERRORS as e:
        if debug:
            raise
        report_error(e)
        _remove_if_empty(created)
        return 2
    except OSError as e:
        if debug or cfg is None or not _is_output_write_error(e, cfg.output_dir):
            raise
        report_error(OutputWriteError(_write_line(e, cfg.output_dir)))
        return 2
    finally:
        shutdown()
    return 0


def run_tool(body: Callable[[], Any], errors: tuple[type[Exception], ...] = ()) -> int:
    """Run a distributed tool's `body` (evaluation, predict): a user error (`USER_ERRORS` plus
    `errors`) prints one `error:` line and returns 2; a failed peer is reported once per node;
    the process group is torn down either way. 0 when `body` returned."""
    try:
        body()
    except dist.PeerError as e:  # another rank failed and reports why
        if dist.local_rank() == 0:
            report_error(e)
        return 2
    except (*USER_ERRORS, *errors) as e:
        report_error(e)
        return 2
    finally:
        shutdown()
    return 0


def report_error(e: Exception) -> None:
    """One `error:` line per problem (a ConfigError or ProtocolError may list several)."""
    _close_progress_bars()
    problems = getattr(e, "problems", None) or [str(e)]
    # one write per line: ranks share the launcher's stderr, and print() writes the text and
    # the newline separately, which interleaves two ranks' lines
    sys.stderr.write("".join(f"error: {' '.join(str(p).split())}\n" for p in problems))
    sys.stderr.flush()


def _close_progress_bars() -> None:
    """End a live tqdm bar's line, so that `error:` starts a line of its own."""
    tq = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tq, "tqdm", None), "_instances", ())):
        bar.close()


def check_output_writable(out_dir: str, may_write_into: bool = False) -> None:
    """Refuse an output directory that cannot be written, before anything starts.

    Probes with a real write + fsync in the directory (or its nearest existing ancestor, where it
    would be created), so a read-only mount, a full disk or a file where a directory should be
    fail here in a second with the fix, instead of at the first checkpoint. A non-empty directory
    is probed only with `may_write_into` (--resume / --overwrite_output_dir): without them it is
    refused later, untouched.
    """
    if not out_dir:
        return
    p = Path(out_dir).absolute()
    if p.is_dir() and not may_write_into and any(p.iterdir()):
        return
    here = p
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise OutputWriteError(f"--output_dir {out_dir}: {here} is a file, not a directory; "
                               "move it away or pass another --output_dir")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dtvg_ds-write-probe-", dir=here)
        try:
            data = memoryview(b"\0" * 4096)
            while data:  # a full disk or a size limit may first accept part of a write
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise OutputWriteError(
            f"--output_dir {out_dir}: cannot write in {here} ({errno.errorcode.get(e.errno, e.errno)}"
            f": {e.strerror}); make it writable, free space, or pass another --output_dir"
        ) from None


def _missing_dirs(out_dir: str) -> list[Path]:
    """The output dir and its ancestors that do not exist yet, deepest first."""
    out: list[Path] = []
    if not out_dir:
        return out
    p = Path(out_dir).absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _remove_if_empty(created: list[Path]) -> None:
    """Rank 0: undo the creation of directories that are still empty (nothing was written)."""
    if os.environ.get("RANK", "0") != "0":
        return
    from dtvg_ds.rundir import RUN_FILE

    for d in created:
        try:
            left = list(d.iterdir()) if d.is_dir() else []
            if [p.name for p in left] == [RUN_FILE]:  # this launch's run identity, nothing else
                left[0].unlink()
            d.rmdir()  # only ever removes an empty directory
        except OSError:
            return


def _under(path: Any, root: str) -> bool:
    try:
        return Path(os.fsdecode(path)).absolute().is_relative_to(Path(root).absolute())
    except (TypeError, ValueError):
        return False


def _is_output_write_error(e: OSError, out_dir: str) -> bool:
    if e.errno in DISK_ERRNOS:  # a problem of the disk, whichever file it hit
        return True
    return e.errno in PATH_ERRNOS and bool(e.filename) and _under(e.filename, out_dir)


def _write_line(e: OSError, out_dir: str) -> str:
    if e.filename and not _under(e.filename, out_dir):  # e.g. the cache dir
        return (f"cannot write {e.filename} ({errno.errorcode.get(e.errno, e.errno)}: "
                f"{e.strerror}); free space or make it writable (--cache_dir moves the cache)")
    return write_error_message(e, out_dir, "run files")


def exit_process(code: int) -> NoReturn:
    """End a distributed worker with `code` once its own clean-up is done, skipping the
    interpreter's teardown.

    torch 2.13's gloo backend can abort a rank while Python finalises ("terminate called
    without an active exception", SIGABRT) even after destroy_process_group, when a worker
    thread still holds an async work object (pytorch PR #179291 describes the mechanism); it hit
    one rank of one launch in one of our full test runs (~100 launches), after the work was done.
    Everything the run writes is closed (and fsynced) before this point, so only the
    interpreter's own teardown is skipped.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shutdown() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        # Without this torch aborts at exit ("terminate called without an active exception").
        tdist.destroy_process_group()
