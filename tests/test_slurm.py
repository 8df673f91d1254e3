"""The project's own sbatch scripts on a real SLURM cluster: slurmctld + two slurmd "nodes" on this
machine (tests/slurm/start_cluster.sh), CPU ranks over gloo.

`sbatch launchers/slurm/stage1.sbatch` on 2 nodes x 1 rank (artifact checked), stage2.sbatch
(DTVG) on 2 nodes from constructed stage-1 artifacts (every rank applied the same groups), a
failing run failing its job, and 2 nodes x 2 ranks where the time-limit signal requeues the job
and the requeued job resumes from its checkpoint.

The module starts the cluster once (installing Debian's slurmctld/slurmd/slurm-client/munge with
apt-get when missing) and stops it at the end, also on failure. Where that is impossible (not
root, no apt-get, no network for apt) every test is skipped with the reason; DTVG_REQUIRE_SLURM=1
turns that skip into a failure (for CI, where the cluster must come up).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dtvg_ds.artifacts import load_artifact
from tests.conftest import HUB_REPO, ROOT, ds_env, make_tpvs, read_jsonl, train_args

pytestmark = pytest.mark.slurm

HARNESS = ROOT / "tests" / "slurm"
STAGE1 = ROOT / "launchers" / "slurm" / "stage1.sbatch"
STAGE2 = ROOT / "launchers" / "slurm" / "stage2.sbatch"
JOB_TIMEOUT = 240  # seconds per job; the runs here take 20-60 s


@dataclass
class Job:
    id: int
    out: Path  # the job's output file (stdout + stderr of the batch script and every node)
    state: str = ""
    exit_code: str = ""
    restarts: int = 0

    def log(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else f"(no {self.out})"


class Cluster:
    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.conf = state_dir / "etc" / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """The job environment: sbatch exports it to the job (its default --export=ALL)."""
        return ds_env(SLURM_CONF=str(self.conf),
                      DTVG_ROOT=str(ROOT),  # the checkout under test ...
                      DTVG_PYTHON=sys.executable,  # ... and its .venv python (no resolve: venv)
                      GLOO_SOCKET_IFNAME="lo", **extra)

    def cmd(self, *args: str, check: bool = True) -> str:
        p = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p.stdout

    def daemon_logs(self) -> str:
        return "".join(f"\n--- {f.name} (tail)\n" + "\n".join(f.read_text(errors="replace")
                                                             .splitlines()[-15:])
                       for f in sorted((self.dir / "log").glob("*.log")))

    def sbatch(self, script: Path, out: Path, args: list[str], nodes: int = 2, ranks: int = 1,
               **env: str) -> Job:
        """Submit `script args` on `nodes` x `ranks` CPU ranks, from the checkout's root."""
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--time=00:10:00",
               f"--output={out}", str(script), *args]
        p = subprocess.run(cmd, cwd=ROOT, env=self.env(NPROC_PER_NODE=str(ranks), **env),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"sbatch failed: {p.stdout}{p.stderr}"
        return Job(int(p.stdout.strip().split(";")[0]), out)

    def show(self, job: Job) -> Job:
        line = self.cmd("scontrol", "show", "job", "-o", str(job.id))
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        job.state, job.exit_code = fields["JobState"], fields["ExitCode"]
        job.restarts = int(fields.get("Restarts", "0"))
        return job

    def wait(self, job: Job, until: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED",
                                                        "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout: float = JOB_TIMEOUT) -> Job:
        """Poll until the job reaches a state in `until`; on timeout cancel it and fail loudly."""
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.show(job).state in until:
                return job
            time.sleep(0.5)
        self.cmd("scancel", str(job.id), check=False)
        raise AssertionError(f"job {job.id} still {job.state} after {timeout:.0f} s; output:\n"
                             f"{job.log()[-8000:]}\n{self.daemon_logs()}")

    def expect_completed(self, job: Job) -> Job:
        self.wait(job)
        assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), (
            f"job {job.id}: {job.state} exit {job.exit_code}; output:\n{job.log()[-8000:]}")
        return job


def _start_failed(reason: str) -> None:
    if os.environ.get("DTVG_REQUIRE_SLURM") == "1":
        pytest.fail(f"DTVG_REQUIRE_SLURM=1 but no SLURM cluster: {reason}", pytrace=False)
    pytest.skip(f"no local SLURM cluster: {reason}")


@pytest.fixture(scope="module")
def cluster(request):
    # A short path: slurmd's per-step unix sockets live under it (108-byte limit).
    state_dir = Path(tempfile.mkdtemp(prefix="dtvg-slurm-", dir="/tmp"))
    failed_before = request.session.testsfailed
    try:
        try:
            p = subprocess.run(["bash", str(HARNESS / "start_cluster.sh"), str(state_dir), "2"],
                               capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            _start_failed("tests/slurm/start_cluster.sh took more than 900 s")
        if p.returncode == 77:
            _start_failed(p.stderr.strip().splitlines()[-1])
        if p.returncode != 0:
            _start_failed(f"tests/slurm/start_cluster.sh exited {p.returncode}:\n"
                          f"{p.stdout[-3000:]}{p.stderr[-3000:]}")
        yield Cluster(state_dir)
    finally:
        s = subprocess.run(["bash", str(HARNESS / "stop_cluster.sh"), str(state_dir)],
                           capture_output=True, text=True, timeout=180)
        if s.returncode != 0:
            print(f"stop_cluster.sh failed ({s.returncode}):\n{s.stdout}{s.stderr}", file=sys.stderr)
        if s.returncode == 0 and request.session.testsfailed == failed_before:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:  # keep the daemon logs for the post-mortem
            print(f"SLURM test cluster state and logs kept in {state_dir}", file=sys.stderr)


def _rendezvous(job: Job) -> str:
    m = re.search(r"rendezvous (\S+):(\d+)", job.log())
    assert m, job.log()[-4000:]
    assert int(m.group(2)) == 20000 + job.id % 10000  # the per-job port
    return m.group(1)


def test_stage1_two_nodes_one_rank_each(cluster, hf_home, tmp_path):
    """Also the offline-node path: the backbone is a Hub id found only in HF_HOME's cache, with
    HF_HUB_OFFLINE=1 (as `python -m dtvg_ds.fetch` on a login node leaves it)."""
    out = tmp_path / "senti_a"
    args = train_args(hf_home, out, max_steps=4, save_steps=2, max_train_samples=64)
    args[args.index("--model_name_or_path") + 1] = HUB_REPO
    job = cluster.expect_completed(cluster.sbatch(
        STAGE1, tmp_path / "stage1.out", args, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1"))
    log = job.log()
    assert "2 x 1 ranks (cpu)" in log
    assert f"HF_HOME {hf_home}, HF_HUB_OFFLINE=1" in log
    assert _rendezvous(job) == "127.0.0.1"  # the head node's NodeAddr from scontrol
    # one torchrun per node (srun --label prefixes each node's lines with its task id)
    assert re.search(r"^0: ", log, re.M) and re.search(r"^1: ", log, re.M), log[-4000:]
    art = load_artifact(out)
    assert art.prompt.shape == (8, 64) and art.task_vector.abs().sum() > 0
    assert art.meta["method"] == "pt" and art.meta["task"] == "senti_a" and art.meta["steps"] == 4
    assert art.meta["backbone"] == HUB_REPO
    cfg = (out / "run_config.json").read_text()
    assert '"world_size": 2' in cfg
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert not list(out.glob(".slurm-shared-check.*"))  # the shared-dir probe cleans up


def test_stage2_dtvg_two_nodes_same_group_on_every_rank(cluster, tiny_model, tmp_path):
    paths, _ = make_tpvs(tiny_model, tmp_path / "tpvs")
    out = tmp_path / "dtvg"
    args = train_args(tiny_model, out, method="dtvg", target_tpv=str(paths["target_t"]),
                      source_tpvs=[str(paths[s]) for s in ("src_a", "src_b", "src_c", "src_d")],
                      learning_rate=1e-4, target_task_scale_learning_rate=1e-4,
                      source_task_scale_learning_rate=1e-4, max_steps=4, fingerprint_every=2,
                      max_train_samples=64)
    args = [a for a in args if a not in ("--method", "dtvg")]  # stage2.sbatch's own default
    job = cluster.expect_completed(cluster.sbatch(STAGE2, tmp_path / "stage2.out", args))
    assert "--method dtvg" in job.log()
    groups = read_jsonl(out / "groups.jsonl")
    assert [r["step"] for r in groups] == [0, 1, 2, 3]
    assert all(r["group"] == ["src_a", "src_b"] for r in groups)
    traces = [read_jsonl(out / "group_trace" / f"rank{k}.jsonl") for k in range(2)]
    assert traces[0] == traces[1] and len(traces[0]) == 4, traces
    art = load_artifact(out)
    assert art.meta["method"] == "dtvg" and art.meta["extra"]["group"] == ["src_a", "src_b"]
    assert art.tensors["scale_sources"].shape == (4, 8)


def test_a_failing_run_fails_its_job(cluster, tiny_model, tmp_path):
    out = tmp_path / "bad"
    args = train_args(tiny_model, out, max_steps=2) + ["--learning_rate", "-1"]
    job = cluster.wait(cluster.sbatch(STAGE1, tmp_path / "bad.out", args))
    assert job.state == "FAILED" and job.exit_code != "0:0", (job, job.log()[-4000:])
    assert "--learning_rate must be > 0" in job.log()
    assert "srun exited with status" in job.log()


def test_two_nodes_two_ranks_requeued_job_resumes(cluster, tiny_model, tmp_path):
    """2 x 2 ranks; on the time-limit signal (sent now instead of 5 min before --time) the ranks
    checkpoint and stop, the batch script requeues the job, and the restart continues from that
    checkpoint: no step lost."""
    out = tmp_path / "requeue"
    steps = 16
    job = cluster.sbatch(STAGE1, tmp_path / "requeue.out",
                         train_args(tiny_model, out, max_steps=steps, save_steps=4,
                                    per_device_train_batch_size=2, max_train_samples=64),
                         ranks=2)
    first_ckpt = out / "checkpoints" / "step-00000004" / "trainer_state.json"
    t_end = time.time() + JOB_TIMEOUT
    while not first_ckpt.exists():
        assert time.time() < t_end and cluster.show(job).state in ("PENDING", "RUNNING"), (
            f"job {job.id} {job.state}, no first checkpoint; output:\n{job.log()[-8000:]}")
        time.sleep(0.2)
    # exactly what `#SBATCH --signal=B:USR1@300` delivers: SIGUSR1 to the batch shell only
    cluster.cmd("scancel", "--batch", "--signal=USR1", str(job.id))
    # the requeued job starts again by itself once its old credentials expired (cred_expire=10
    # in the test cluster; SLURM's default makes that 121 s)
    cluster.expect_completed(job)
    assert job.restarts == 1
    log = job.log()  # --open-mode=append: both runs in one file
    assert "(restart 0)" in log and "(restart 1)" in log and "requeueing job" in log, log[-8000:]
    # every rank checkpointed at the end of the step it was in, and the restart began there
    stopped = re.search(r"stopped at step (\d+) by a termination signal", log)
    resumed = re.search(r"resumed from \S+step-(\d+) at step (\d+)", log)
    assert stopped and resumed, log[-8000:]
    assert 4 <= int(stopped.group(1)) == int(resumed.group(2)) < steps, log[-8000:]
    assert "2 x 2 ranks (cpu)" in log
    art = load_artifact(out)
    assert art.meta["steps"] == steps
    assert '"world_size": 4' in (out / "run_config.json").read_text()
    logged = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert logged[-1] == steps and set(logged) == set(range(1, steps + 1))


def _scontrol(cluster, job_id: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", cluster.cmd("scontrol", "show", "job", "-o", job_id)))


def test_protocol_slurm_executor(cluster, tiny_model, tmp_path):
    """`protocol run --executor slurm` on the 2-node cluster: every job submitted at once with
    afterok dependencies; one source fails, SLURM cancels the job that needs it, the others
    finish; the re-run (at most 1 in flight) resubmits only what is missing."""
    from dtvg_ds.protocol import graph, state

    out = tmp_path / "proto"
    env = cluster.env()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dtvg_ds.protocol", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=900)

    p = cli("plan", "demo", "--out", str(out), "--model_name_or_path", str(tiny_model),
            "--seeds", "1", "--gpus_per_node", "1", "--set", "max_steps=4", "eval_steps=2",
            "save_steps=4", "max_eval_samples=16", "max_test_samples=16",
            "num_virtual_tokens=8", "max_train_samples=64", "warmup_steps=1")
    assert p.returncode == 0, p.stderr
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "stage1-senti_b").write_text("mine")  # its output dir is a file: it fails
    run = ["run", str(out), "--executor", "slurm", "--only", "dtvg-senti_c-*", "--wait",
           "--poll", "2", "--sbatch_arg=--time=00:10:00"]
    p = cli(*run)
    assert p.returncode == 1, p.stdout + p.stderr
    _, jobs = graph.read(out)
    by_id = {j.id: j for j in jobs}
    rec = {j: state.read_record(out, by_id[j]) for j in ("stage1-senti_a", "stage1-senti_b",
                                                          "stage1-has_color",
                                                          "pt-senti_c-full-s1",
                                                          "dtvg-senti_c-full-s1")}
    dtvg = rec.pop("dtvg-senti_c-full-s1")
    assert sorted(dtvg["after"]) == sorted(r["slurm_job_id"] for r in rec.values())
    v = state.judge(out, jobs, {})
    assert v["stage1-senti_a"].state == v["pt-senti_c-full-s1"].state == state.DONE
    assert v["stage1-senti_b"].state == state.FAILED
    assert "stage1-senti_b" in v["stage1-senti_b"].detail  # the log line of the failure
    assert v["dtvg-senti_c-full-s1"].state == state.FAILED
    assert "never started" in v["dtvg-senti_c-full-s1"].detail
    assert _scontrol(cluster, dtvg["slurm_job_id"])["JobState"] == "CANCELLED"
    assert "failed: stage1-senti_b" in p.stdout

    # fixed; the same command with at most one job in flight continues where it stopped
    (out / "runs" / "stage1-senti_b").unlink()
    p = cli(*run[:-3], "--max_in_flight", "1", *run[-3:])
    assert p.returncode == 0, p.stdout + p.stderr
    again = {j: state.read_record(out, by_id[j]) for j in
             ("stage1-senti_a", "stage1-senti_b", "pt-senti_c-full-s1", "dtvg-senti_c-full-s1")}
    assert again["stage1-senti_a"]["slurm_job_id"] == rec["stage1-senti_a"]["slurm_job_id"]
    assert again["pt-senti_c-full-s1"] == rec["pt-senti_c-full-s1"]  # done: not resubmitted
    src, dt = again["stage1-senti_b"]["slurm_job_id"], again["dtvg-senti_c-full-s1"]
    assert src != rec["stage1-senti_b"]["slurm_job_id"]
    # one in flight: DTVG was submitted only once its input's artifact was complete
    assert dt["after"] == []
    assert dt["submitted"] >= (Path(by_id["stage1-senti_b"].output_dir) / "tpv.json").stat(
        ).st_mtime
    v = state.judge(out, jobs, {})
    assert all(v[j].state == state.DONE for j in again), v
