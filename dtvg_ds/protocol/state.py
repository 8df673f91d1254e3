"""What a job's output dir holds, and what the executors recorded about it.

A job is *done* only when its artifact is complete and verified (checksum, `status: complete`,
all `max_steps` trained), it was trained with the job's current settings (its run_config.json
agrees with every flag that changes what is trained), and, for a scored job, its test score
belongs to that artifact's prompt. Anything less is run again; a finished run with other
settings is *stale* and is never overwritten unless asked (`run --overwrite_stale`).

Executors record each launch in `<out>/state/<job>.json` (local: pid and exit code; SLURM: the
job id) and write the job's output to `<out>/logs/<job>.log`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtvg_ds.artifacts import COMPLETE, ArtifactError, atomic_write_json, load_artifact
from dtvg_ds.config import parse_config
from dtvg_ds.evaluation import EVAL_DIR
from dtvg_ds.protocol.graph import Job
from dtvg_ds.rundir import MAY_CHANGE_ON_RESUME

DONE, STALE, FAILED, RUNNING, QUEUED, READY, WAITING, BLOCKED = (
    "done", "stale", "failed", "running", "queued", "ready", "waiting", "blocked")


@dataclass
class Verdict:
    """A job's state and the one line that explains it."""

    state: str
    detail: str = ""


def log_path(out: Path, job: Job) -> Path:
    return out / "logs" / f"{job.id}.log"


def record_path(out: Path, job: Job) -> Path:
    return out / "state" / f"{job.id}.json"


def read_record(out: Path, job: Job) -> dict[str, Any]:
    try:
        return json.loads(record_path(out, job).read_text())
    except (OSError, ValueError):
        return {}


def write_record(out: Path, job: Job, **rec: Any) -> None:
    atomic_write_json(record_path(out, job), rec)


def verify(job: Job) -> Verdict:
    """DONE, STALE (finished with other settings: the differences), or '' with the reason."""
    out = Path(job.output_dir)
    if not (out / "tpv.json").is_file():
        return Verdict("", "no artifact yet" if not out.exists() else "no artifact yet "
                       "(started, not finished)")
    cfg = parse_config(job.argv())
    try:
        meta = json.loads((out / "tpv.json").read_text())
    except (OSError, ValueError) as e:
        return Verdict("", f"artifact unreadable ({e})")
    if meta.get("status", COMPLETE) != COMPLETE or meta.get("steps") != cfg.max_steps:
        return Verdict("", f"partial: best so far at step {meta.get('steps')} of "
                       f"{cfg.max_steps}")
    try:
        art = load_artifact(out)  # the checksum of the tensors against tpv.json
    except ArtifactError as e:
        return Verdict("", f"artifact unusable: {e}")
    diffs = _settings_differ(out, cfg)
    if diffs:
        return Verdict(STALE, f"trained with other settings: {'; '.join(diffs)}")
    if job.test:
        return _test_score(out, job, art.meta)
    return Verdict(DONE, _best(art.meta))


def _settings_differ(out: Path, cfg: Any) -> list[str]:
    """The flags of this job whose value differs from the finished run's run_config.json."""
    try:
        ran = json.loads((out / "run_config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return ["run_config.json missing or unreadable"]
    want = cfg.to_dict()
    keys = sorted(k for k in cfg.explicit if k not in MAY_CHANGE_ON_RESUME and k in want)
    return [f"{k} {ran.get(k)!r} -> {want[k]!r}" for k in keys
            if _norm(ran.get(k)) != _norm(want[k])]


def _norm(v: Any) -> Any:
    return [str(x) for x in v] if isinstance(v, (list, tuple)) else v


def _test_score(out: Path, job: Job, meta: dict[str, Any]) -> Verdict:
    f = out / EVAL_DIR / f"{job.task}-test.json"
    try:
        res = json.loads(f.read_text())
    except (OSError, ValueError):
        return Verdict("", f"trained, but no test score ({f.name}); the run ends by scoring it")
    best_step = (meta.get("best_metric") or {}).get("step")
    if best_step is not None and res.get("best_step") != best_step:
        return Verdict("", f"{f.name} scores the prompt of step {res.get('best_step')}, the "
                       f"artifact holds step {best_step}")
    return Verdict(DONE, f"test {res['metric']} {res['score']:.2f}; {_best(meta)}")


def _best(meta: dict[str, Any]) -> str:
    b = meta.get("best_metric") or {}
    return f"dev {b.get('name', '?')} {b.get('value', float('nan')):.2f} at step {b.get('step')}"


def error_line(log: Path) -> str:
    """The line of a job's log that says why it failed (the last `error:` line, else the last
    exception line, else the last line)."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return f"(no log at {log})"
    for pat in ("error:", "Error:", "Error", "Killed"):
        for line in reversed(lines):
            if pat in line and not line.startswith("$ "):
                return line[-300:]
    return lines[-1][-300:] if lines else "(empty log)"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def judge(out: Path, jobs: list[Job], slurm_states: dict[str, str] | None = None
          ) -> dict[str, Verdict]:
    """Every job's state, in plan order. `slurm_states`: SLURM job id -> squeue state of the
    jobs still known to the queue (finished jobs have left it)."""
    verdicts: dict[str, Verdict] = {}
    for job in jobs:
        verdicts[job.id] = _judge_one(out, job, verdicts, slurm_states or {})
    return verdicts


def _judge_one(out: Path, job: Job, done_so_far: dict[str, Verdict],
               queue: dict[str, str]) -> Verdict:
    v = verify(job)
    if v.state in (DONE, STALE):
        return v
    rec = read_record(out, job)
    if rec.get("slurm_job_id"):
        q = queue.get(str(rec["slurm_job_id"]))
        if q == "PENDING":
            return Verdict(QUEUED, f"SLURM job {rec['slurm_job_id']} pending; {v.detail}")
        if q is not None:
            return Verdict(RUNNING, f"SLURM job {rec['slurm_job_id']} {q.lower()}; {v.detail}")
        log = log_path(out, job)
        why = error_line(log) if log.exists() else \
            "it never started (SLURM cancels a job whose afterok dependency failed)"
        return Verdict(FAILED, f"SLURM job {rec['slurm_job_id']} ended without a verified "
                       f"artifact ({v.detail}): {why}")
    if rec.get("pid") and rec.get("exit_code") is None:
        if pid_alive(int(rec["pid"])):
            return Verdict(RUNNING, f"pid {rec['pid']}; {v.detail}")
        return Verdict(FAILED, f"interrupted: the `protocol run` that started it was stopped "
                       f"({v.detail}); the next run resumes it from its last checkpoint")
    if rec.get("exit_code") not in (None, 0) or rec.get("pid"):
        return Verdict(FAILED, f"exit {rec.get('exit_code')}: {error_line(log_path(out, job))}")
    failed = [d for d in job.deps if done_so_far.get(d, Verdict("")).state in (FAILED, BLOCKED,
                                                                                STALE)]
    if failed:
        return Verdict(BLOCKED, f"needs {', '.join(failed)}")
    pending = [d for d in job.deps if done_so_far.get(d, Verdict("")).state != DONE]
    if pending:
        return Verdict(WAITING, f"needs {', '.join(pending)}")
    return Verdict(READY, v.detail)
