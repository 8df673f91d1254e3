"""Run a planned protocol: one job after another on this machine, or as SLURM jobs.

Both executors walk the plan in dependency order, skip every job whose artifact is done and
verified (`state.verify`), never start a job whose inputs are not done (or, on SLURM, submitted:
`--dependency=afterok`), and leave a stale run (finished with other settings) alone unless
`overwrite_stale` (then the job runs with --overwrite_output_dir, which moves the old files
aside instead of deleting them). A job that fails stops its dependants only; everything
independent goes on. Re-running the same command continues where the last one stopped.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dtvg_ds import launch
from dtvg_ds.protocol import state
from dtvg_ds.protocol.graph import Job
from dtvg_ds.protocol.spec import ProtocolError
from dtvg_ds.protocol.state import (
    BLOCKED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    STALE,
    Verdict,
)

SLURM_DIR = launch.ROOT / "launchers" / "slurm"
LIVE = (QUEUED, RUNNING)


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """One `protocol run` per protocol dir at a time (two would launch the same jobs twice)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".run.lock").open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProtocolError([f"{out}: another `protocol run` is working on this dir; wait "
                                 "for it (`protocol status` shows its jobs)"]) from None
        yield


def _runnable(v: Verdict, overwrite_stale: bool) -> bool | None:
    """None if the job should not run now; else whether it starts over (a stale run, its old
    files moved aside by --overwrite_output_dir) instead of resuming its own checkpoint."""
    if v.state in (DONE, *LIVE) or (v.state == STALE and not overwrite_stale):
        return None
    return v.state == STALE


def _inputs_ok(job: Job, verdicts: dict[str, Verdict], live_ok: bool) -> bool:
    ok = (DONE, *LIVE) if live_ok else (DONE,)
    return all(verdicts[d].state in ok for d in job.deps)


def run_local(out: Path, jobs: list[Job], overwrite_stale: bool = False,
              say: Callable[[str], None] = print) -> dict[str, Verdict]:
    """Every job in plan order through the real launcher, one at a time (1 node only)."""
    multi = [j.id for j in jobs if j.nodes > 1]
    if multi:
        raise ProtocolError([f"the local executor runs on one machine; {multi[0]} and "
                             f"{len(multi) - 1} more jobs need resources.nodes > 1: use "
                             "--executor slurm, or plan with --nodes 1"])
    with exclusive(out):
        verdicts: dict[str, Verdict] = {}
        for job in jobs:
            v = state.verify(job)
            if v.state != DONE and not _inputs_ok(job, verdicts, live_ok=False):
                bad = [d for d in job.deps if verdicts[d].state != DONE]
                verdicts[job.id] = Verdict(BLOCKED, f"needs {', '.join(bad)}")
            else:
                fresh = _runnable(v, overwrite_stale)
                verdicts[job.id] = v if fresh is None else _launch_local(
                    out, job, [*job.argv(), *(["--overwrite_output_dir"] if fresh
                                              else ["--resume", "auto"])], say)
            say(f"{job.id:<40} {verdicts[job.id].state:<8} {verdicts[job.id].detail}")
        return verdicts


def _launch_local(out: Path, job: Job, argv: list[str], say: Callable[[str], None]) -> Verdict:
    log = state.log_path(out, job)
    say(f"{job.id:<40} running  ({job.ranks} ranks; log {log})")
    t0 = time.time()
    p = launch.start(argv, job.ranks, log)
    state.write_record(out, job, executor="local", pid=p.pid, started=t0, exit_code=None)
    rc = p.wait()
    state.write_record(out, job, executor="local", pid=p.pid, started=t0, exit_code=rc,
                       seconds=round(time.time() - t0, 1))
    v = state.verify(job)
    if rc != 0 or v.state != DONE:
        return Verdict(FAILED, f"exit {rc}: {state.error_line(log)}" if rc else
                       f"exit 0 but {v.detail}")
    return v


# -- SLURM ------------------------------------------------------------------------------------


def queue_states() -> dict[str, str]:
    """SLURM job id -> state of this user's jobs still in the queue (finished ones leave it)."""
    import getpass

    p = subprocess.run(["squeue", "-h", "-o", "%i|%T", f"--user={getpass.getuser()}"],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise ProtocolError([f"squeue failed ({p.stderr.strip()[:200]}); is this a SLURM "
                             "login node (SLURM_CONF, slurmctld reachable)?"])
    return dict(line.split("|", 1) for line in p.stdout.split() if "|" in line)


def script(job: Job) -> Path:
    """The project's sbatch script of a job (each passes our flags to dtvg_ds.train)."""
    if job.method.startswith("mpt_"):
        return SLURM_DIR / "mpt.sbatch"
    return SLURM_DIR / ("stage1.sbatch" if job.kind in ("stage1", "target") else "stage2.sbatch")


def sbatch_command(out: Path, job: Job, fresh: bool, after: list[str],
                   extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """The sbatch command line and environment of a job."""
    env = dict(os.environ)
    if env.get("DS_ACCELERATOR") == "cpu":  # CPU nodes: ranks are processes, no GPUs to ask for
        gpus = ["--gpus-per-node=0"]
        env["NPROC_PER_NODE"] = str(job.ranks // job.nodes)
    else:
        gpus = [f"--gpus-per-node={job.ranks // job.nodes}"]
    # The scripts resume from the job's checkpoint themselves (DTVG_RESUME=auto), also when
    # SLURM requeues them; a stale job starts over with its old files moved aside.
    env["DTVG_RESUME"] = "" if fresh else "auto"
    argv = [*job.argv(), *(["--overwrite_output_dir"] if fresh else [])]
    dep = [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"] if after \
        else []
    cmd = ["sbatch", "--parsable", f"--job-name=dtvg-{job.id}", f"--nodes={job.nodes}", *gpus,
           f"--output={state.log_path(out, job)}", "--open-mode=append", *dep, *extra,
           str(script(job)), *argv]
    return cmd, env


def run_slurm(out: Path, jobs: list[Job], max_in_flight: int = 0, extra: list[str] = (),
              overwrite_stale: bool = False, wait: bool = False, poll: float = 30.0,
              say: Callable[[str], None] = print) -> dict[str, Verdict]:
    """Submit every job that can go, with afterok dependencies on its submitted inputs; with
    `max_in_flight` keep at most that many queued or running (and stay until all are
    submitted); with `wait` stay until nothing is queued or running."""
    if not SLURM_DIR.is_dir():
        raise ProtocolError([f"the SLURM executor submits the sbatch scripts of a dtvg_ds "
                             f"checkout ({SLURM_DIR} is missing): run it from a clone"])
    with exclusive(out):
        tried: set[str] = set()  # submitted by this call: a failure is reported, not retried
        while True:
            verdicts = state.judge(out, jobs, queue_states())
            in_flight = sum(v.state in LIVE for v in verdicts.values())
            waiting_capacity = False
            for job in jobs:
                v = verdicts[job.id]
                if job.id in tried or not _inputs_ok(job, verdicts, live_ok=True):
                    continue
                fresh = _runnable(v, overwrite_stale)
                if fresh is None:
                    continue
                if max_in_flight and in_flight >= max_in_flight:
                    waiting_capacity = True
                    break
                after = [_slurm_id(out, d, jobs) for d in job.deps if verdicts[d].state in LIVE]
                verdicts[job.id] = _submit(out, job, fresh, after, list(extra), say)
                tried.add(job.id)
                in_flight += 1
            live = in_flight > 0
            if not (waiting_capacity or (wait and live)):
                return state.judge(out, jobs, queue_states())
            time.sleep(poll)


def _slurm_id(out: Path, job_id: str, jobs: list[Job]) -> str:
    job = next(j for j in jobs if j.id == job_id)
    return str(state.read_record(out, job)["slurm_job_id"])


def _submit(out: Path, job: Job, fresh: bool, after: list[str], extra: list[str],
            say: Callable[[str], None]) -> Verdict:
    cmd, env = sbatch_command(out, job, fresh, after, extra)
    state.log_path(out, job).parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(cmd, cwd=launch.ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    if p.returncode != 0:
        v = Verdict(FAILED, f"sbatch refused it: {p.stderr.strip()[:300]}")
    else:
        jid = p.stdout.strip().split(";")[0]
        state.write_record(out, job, executor="slurm", slurm_job_id=jid, submitted=time.time(),
                           after=after)
        v = Verdict(QUEUED, f"SLURM job {jid}" + (f" after {','.join(after)}" if after else ""))
    say(f"{job.id:<40} {v.state:<8} {v.detail}")
    return v
