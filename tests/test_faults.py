"""Faults with real processes on 2 ranks: preemption (SIGTERM) checkpoints before exit; a rank
killed with SIGKILL ends the job non-zero quickly, the last checkpoint intact and resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import ROOT, VENV_BIN, ds_env, free_port, launch, read_jsonl, train_args

pytestmark = pytest.mark.dist
TRAIN = ROOT / "launchers" / "train.py"


def _start(args, log):
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(TRAIN), *args]
    # output to a file, not a pipe nobody reads while the run goes on (a full pipe blocks it)
    return subprocess.Popen(cmd, cwd=ROOT, env=ds_env(), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_steps(out, n, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = out / "metrics.jsonl"
        if f.is_file() and len(read_jsonl(f)) >= n:
            return
        assert proc.poll() is None, "run ended early"
        time.sleep(0.2)
    raise AssertionError("run did not reach the step in time")


def _ranks(proc):
    return [c for c in psutil.Process(proc.pid).children(recursive=True)
            if "train.py" in " ".join(c.cmdline()) and "--local_rank=" in " ".join(c.cmdline())]


def _complete_ckpts(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step-*")
                  if (p / "trainer_state.json").is_file())


def test_sigterm_writes_a_checkpoint_then_resume_continues(tiny_model, tmp_path):
    out = tmp_path / "pre"
    args = train_args(tiny_model, out, max_steps=3000, save_steps=0)
    p = _start(args, tmp_path / "pre.log")
    _wait_steps(out, 3, p)
    ranks = _ranks(p)
    # Preemption (scancel, SLURM time limit with --signal, Kubernetes) signals every process of
    # the job. (DeepSpeed's single-node `deepspeed` runner does not forward SIGTERM itself.)
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(timeout=120)
    codes = [r.wait(timeout=120) for r in ranks]
    log = (tmp_path / "pre.log").read_text()
    assert all(c != 0 for c in codes), codes
    assert "stopped by a termination signal" in log
    done = _complete_ckpts(out)
    assert len(done) == 1, log[-3000:]
    step = json.loads((out / "checkpoints" / done[0] / "trainer_state.json").read_text())["step"]
    assert step >= 3
    launch(TRAIN, train_args(tiny_model, out, max_steps=3000, save_steps=0, resume="auto",
                             stop_at_step=step + 2))
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps[-2:] == [step + 1, step + 2]


def test_sigkill_of_one_rank_ends_the_job_and_keeps_the_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "kill"
    p = _start(train_args(tiny_model, out, max_steps=3000, save_steps=4), tmp_path / "k.log")
    _wait_steps(out, 9, p)
    before = _complete_ckpts(out)
    assert before
    ranks = _ranks(p)
    assert len(ranks) == 2
    t0 = time.time()
    os.kill(ranks[1].pid, signal.SIGKILL)
    p.wait(timeout=120)
    assert p.returncode != 0 and time.time() - t0 < 60
    assert not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks)
    after = _complete_ckpts(out)
    assert after and after[-1] >= before[-1]
    step = json.loads((out / "checkpoints" / after[-1] / "trainer_state.json").read_text())["step"]
    launch(TRAIN, train_args(tiny_model, out, max_steps=3000, save_steps=4, resume="auto",
                             stop_at_step=step + 3))
    # The resumed run continues exactly as an uninterrupted one: same loss at every step
    # (the loss is a function of the prompt, the optimizer state and the data position).
    ref = tmp_path / "ref"
    launch(TRAIN, train_args(tiny_model, ref, max_steps=3000, save_steps=0, stop_at_step=step + 3))
    last = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}
    want = {r["step"]: r["loss"] for r in read_jsonl(ref / "metrics.jsonl") if "loss" in r}
    for s in range(step + 1, step + 4):
        assert last[s] == pytest.approx(want[s], rel=1e-6), s
