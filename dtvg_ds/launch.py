"""Start a real local training run: `deepspeed --num_gpus N --module dtvg_ds.train ...`.

The one place that builds that command and its environment (the demo, the protocol's local
executor and the benchmarks launch through it). On a machine without a GPU the ranks are CPU
processes (DS_ACCELERATOR=cpu, gloo) with one thread each; with GPUs DeepSpeed picks CUDA/NCCL.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> str:
    """A free TCP port for the rendezvous (two local runs must not share 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def gpus() -> int:
    """CUDA devices this process sees, unless DS_ACCELERATOR=cpu asks for the CPU."""
    import torch

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def command(args: list[str], ranks: int) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of a `deepspeed` launch of dtvg_ds.train with `ranks` ranks."""
    env = dict(os.environ)
    if (ROOT / "dtvg_ds").is_dir():  # a checkout: its code, whatever is installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if not gpus():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return ([deepspeed, "--num_gpus", str(ranks), "--master_port", free_port(), "--module",
             "dtvg_ds.train", *args], env)


def start(args: list[str], ranks: int, log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """Start dtvg_ds.train on `ranks` local ranks, its output appended to `log` (after the
    command line, so a log says what ran)."""
    cmd, env = command(args, ranks)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ deepspeed --num_gpus {ranks} --module dtvg_ds.train {' '.join(args)}\n")
        f.flush()
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)


def run(args: list[str], ranks: int, log: Path, cwd: Path = ROOT) -> int:
    """Run dtvg_ds.train on `ranks` local ranks, output to `log`; returns the exit code."""
    return start(args, ranks, log, cwd).wait()
