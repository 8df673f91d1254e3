"""The output directory of a run: what belongs to it, starting over safely, and run identity.

A run dir holds only files dtvg_ds writes (`OWNED`). `--overwrite_output_dir` moves all of them
into a hidden `.replaced-<time>/` dir first (a rename: nothing is copied or lost) and deletes that
only once the new run has finished its first step; a dir holding anything else is refused with
the list, so a user's own files are never deleted. Every new run writes `run.json` with a fresh
run id; checkpoints record that id and the run's config, and `--resume` refuses a checkpoint
from another run, or one whose settings differ from this launch's, naming each difference.

Rank 0 does all file work and decides; the other ranks learn the outcome by broadcast.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from dtvg_ds import dist
from dtvg_ds.artifacts import atomic_write_json
from dtvg_ds.config import ConfigError, TrainConfig

RUN_FILE = "run.json"
ASIDE_PREFIX = ".replaced-"
# Everything a training run writes into its output dir (logs.py, engine.py, artifacts.py,
# checkpoint.py, memtrace.py, methods/dtvg.py, evaluation.py, W&B, the sbatch scripts' shared-fs probe).
OWNED = ("checkpoints", "metrics.jsonl", "groups.jsonl", "method.jsonl", "group_trace",
         "eval_examples.jsonl",
         "run_config.json", RUN_FILE, "prompt.safetensors", "tpv.json", "tensorboard", "wandb",
         "wandb_run_id", "adapter", "report", "eval", "memory.rank*.jsonl", ".*.tmp",
         ".slurm-shared-check.*", ".dtvg_ds-write-probe-*", f"{ASIDE_PREFIX}*")
# Settings a resumed run may change: how long it runs, how often it logs/evaluates/saves, where
# logs go and how it is launched. Anything else changes what is being trained.
MAY_CHANGE_ON_RESUME = frozenset({
    "max_steps", "stop_at_step", "eval_steps", "eval_on_start", "save_steps", "logging_steps",
    "save_total_limit", "report_to", "trace_memory", "resume", "overwrite_output_dir",
    "output_dir", "eval_gather_backbone", "per_device_eval_batch_size", "fingerprint_every",
    "gradient_checkpointing", "cache_dir", "tokenized_cache", "config", "deepspeed",
    "run_name", "ddp_timeout", "disable_tqdm", "debug", "allow_in_progress_artifacts",
    "log_level", "log_on_each_node", "do_test", "max_test_samples"})


def owned(name: str) -> bool:
    """Whether an entry of a run dir is one dtvg_ds writes."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in OWNED)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def read_run(out: Path) -> dict[str, Any] | None:
    """The dir's `run.json` (its current run), or None."""
    try:
        return json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _move_aside(out: Path, refuse_foreign: bool = True) -> Path | None:
    """Rank 0: move the previous run's files into `.replaced-<time>/`. Files dtvg_ds did not
    write are refused (`--overwrite_output_dir`) or left where they are."""
    entries = [p for p in out.iterdir() if not p.name.startswith(ASIDE_PREFIX)]
    foreign = sorted(p.name for p in entries if not owned(p.name))
    entries = [p for p in entries if owned(p.name)]
    if foreign and refuse_foreign:
        raise ConfigError([
            f"--overwrite_output_dir {out}: it holds files dtvg_ds did not write: "
            f"{', '.join(foreign[:20])}{' ...' if len(foreign) > 20 else ''}; nothing was "
            "changed. Move them out (or pick a new --output_dir)"])
    if not entries:
        return None
    aside = out / f"{ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{new_run_id()[:6]}"
    aside.mkdir()
    for p in entries:
        p.rename(aside / p.name)  # same filesystem: atomic, nothing copied
    return aside


def _resume_state(cfg: TrainConfig) -> dict[str, Any] | None:
    """Rank 0: the trainer state of the checkpoint `--resume` will pick (None: a new run).
    A checkpoint that does not verify is left to `checkpoint.find_resume` to report."""
    from dtvg_ds import checkpoint

    if not cfg.resume:
        return None
    d = checkpoint.newest_valid(cfg.output_dir) if cfg.resume == "auto" else Path(cfg.resume)
    try:
        return {**json.loads((d / checkpoint.STATE_FILE).read_text()), "_path": str(d)} if d else None
    except (OSError, ValueError):
        return None


def prepare(cfg: TrainConfig) -> tuple[str, Path | None]:
    """Make `cfg.output_dir` ready for this launch (all ranks call it; rank 0 acts).

    A new run (no checkpoint to resume) first moves any previous run's files aside:
    `--overwrite_output_dir` refuses foreign files; `--resume auto` with nothing to resume (a
    run that never saved, e.g. a requeued job) leaves them alone. Returns (run id, the dir the
    previous run was moved to or None)."""
    out = Path(cfg.output_dir)
    result: tuple[str | None, str | None, list[str] | None] = (None, None, None)
    if dist.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            resume_state = _resume_state(cfg)
            aside = None
            if cfg.overwrite_output_dir:
                aside = _move_aside(out)
            elif cfg.resume == "auto" and resume_state is None:
                _refuse_unresumable(out)  # only a run that never saved may be replaced
                aside = _move_aside(out, refuse_foreign=False)
            if cfg.resume and cfg.resume != "auto" and resume_state is None:
                run_id = (read_run(out) or {}).get("run_id", "")  # find_resume says what is wrong
            else:
                run_id = _identity(out, cfg, resume_state)
            result = (run_id, str(aside) if aside else None, None)
        except ConfigError as e:
            result = (None, None, e.problems)
        except Exception as e:  # noqa: BLE001  -- e.g. a full disk: tell every rank, not just this one
            result = (None, None, [f"--output_dir {out}: {type(e).__name__}: {e}"])
    run_id, aside, problems = dist.broadcast_object(result)  # collective: rank 0 decided
    if problems:
        raise ConfigError(problems)
    return str(run_id), Path(aside) if aside else None


def _refuse_unresumable(out: Path) -> None:
    """`--resume auto` found nothing to resume: refuse if the dir still holds checkpoints (none
    verifies) or a finished artifact, rather than starting over on top of them."""
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if out.is_dir() else []
    meta = {}
    if (out / "tpv.json").is_file():
        try:
            meta = json.loads((out / "tpv.json").read_text())
        except ValueError:
            meta = {"status": "unreadable"}
    done = bool(meta) and meta.get("status", "complete") != "in_progress"
    if ckpts or done:
        what = (f"checkpoints {', '.join(ckpts[-3:])} none of which verifies" if ckpts
                else "a finished run's artifact (tpv.json)")
        raise ConfigError([f"--resume auto: {out} holds {what}; nothing was changed. Pass "
                           "--resume DIR for a specific checkpoint, --overwrite_output_dir to "
                           "start over (the old run is moved aside first), or a new --output_dir"])


def _identity(out: Path, cfg: TrainConfig, resume_state: dict[str, Any] | None) -> str:
    """Rank 0: the run id of this launch; writes run.json for a new run."""
    current = read_run(out)
    if resume_state is None:  # a new run (also --resume auto into an empty dir)
        run_id = new_run_id()
        atomic_write_json(out / RUN_FILE, {"run_id": run_id, "started": time.time(),
                                           "run_name": cfg.run_name or out.name,
                                           "task": cfg.task, "method": cfg.method})
        return run_id
    problems = check_resume(resume_state, cfg, current)
    if problems:
        raise ConfigError(problems)
    run_id = resume_state.get("run_id") or (current or {}).get("run_id") or new_run_id()
    if current is None:  # a dir from before run ids, or run.json deleted: adopt the checkpoint's
        atomic_write_json(out / RUN_FILE, {"run_id": run_id, "started": time.time(),
                                           "task": cfg.task, "method": cfg.method})
    return run_id


def check_resume(state: dict[str, Any], cfg: TrainConfig,
                 current: dict[str, Any] | None) -> list[str]:
    """Why the checkpoint with trainer state `state` must not be resumed by `cfg` (empty: fine)."""
    where = state.get("_path", "the checkpoint")
    probs = []
    ckpt_id, dir_id = state.get("run_id"), (current or {}).get("run_id")
    if ckpt_id and dir_id and ckpt_id != dir_id:
        probs.append(f"--resume: {where} belongs to run {ckpt_id}, but {cfg.output_dir} now holds "
                     f"run {dir_id} ({RUN_FILE}); it is a replaced or copied run's checkpoint. "
                     "Resume from one of this run's checkpoints, or start over with "
                     "--overwrite_output_dir")
    saved = state.get("config")
    if isinstance(saved, dict):
        now = cfg.to_dict()
        diffs = [f"--{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(saved)
                 if k in now and k not in MAY_CHANGE_ON_RESUME and saved[k] != now[k]]
        if dist.world_size() != state.get("world_size", dist.world_size()):
            diffs.append(f"world size {state['world_size']} -> {dist.world_size()}")
        if diffs:
            probs.append(f"--resume: {where} was written by a run with other settings: "
                         f"{'; '.join(diffs)}. Resume with the run's settings, or train into a new "
                         "--output_dir (or --overwrite_output_dir)")
    return probs


def finish_replacing(aside: Path | None) -> None:
    """Rank 0, once the new run has taken its first step: delete the replaced run's files,
    and those of any earlier replacement whose new run died before its first step."""
    if aside is not None and dist.is_main():
        for old in aside.parent.glob(f"{ASIDE_PREFIX}*"):
            shutil.rmtree(old, ignore_errors=True)
