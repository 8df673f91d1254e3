"""The trainer from a wheel, without the checkout: a wheel built from the repo, installed with pip
into a fresh venv, run from a directory outside the checkout with no PYTHONPATH.

The fresh venv gets the dependencies of this test venv through a .pth line (installing torch and
DeepSpeed again would take minutes and test pip, not us); dtvg_ds itself comes only from the
wheel (the test venv's editable install is a .pth *finder*, which a plain path line does not
activate), as the first assertion checks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT, ds_env, free_port, train_args

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """The python of a fresh venv with dtvg_ds installed from a wheel of this checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the working tree: setuptools never empties a build/ dir, so a wheel
    # built in the checkout could carry modules that were since renamed or deleted.
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "build", "dist", "out", "*.egg-info", "__pycache__", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(src), "-w", str(tmp / "dist")],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("dtvg_ds-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True).stdout
    (Path(purelib.strip()) / "test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Without PYTHONPATH (make exports the checkout, whose dtvg_ds.egg-info would make pip
    # think dtvg_ds is installed already) and ignoring what the linked test venv holds.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", "--ignore-installed", str(wheel)], check=True,
                   capture_output=True, timeout=300, env=_env())
    return py


def _env() -> dict[str, str]:
    env = ds_env()
    env.pop("PYTHONPATH")  # nothing of the checkout on the path
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_the_package_comes_from_the_wheel_with_its_configs(fresh, tmp_path):
    p = _run([str(fresh), "-c", "import dtvg_ds, dtvg_ds.config as c; print(dtvg_ds.__file__); "
              "print(c.read_ds_config('zero3')['zero_optimization']['stage'])"], tmp_path)
    assert p.returncode == 0, p.stderr
    where, stage = p.stdout.split()
    assert Path(where).is_relative_to(fresh.parents[1]) and not Path(where).is_relative_to(ROOT)
    assert stage == "3"
    p = _run([str(fresh), "-m", "dtvg_ds.train", "--help"], tmp_path)
    assert p.returncode == 0 and "usage: dtvg_ds.train" in p.stdout
    assert "3 = stopped by SIGTERM/SIGUSR1" in " ".join(p.stdout.split())  # exit codes in --help
    # the shipped protocol files are package data too
    p = _run([str(fresh), "-m", "dtvg_ds.protocol", "plan", "dtvg_t5_base", "--out",
              str(tmp_path / "proto")], tmp_path)
    assert p.returncode == 0 and "dtvg_t5_base: 358 jobs" in p.stdout, p.stderr


def test_deepspeed_module_launch_from_the_wheel(fresh, tiny_model, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model, out, max_steps=2)  # --deepspeed defaults to the shipped zero3
    p = _run([str(fresh), "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
              str(free_port()), "--module", "dtvg_ds.train", *args], tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["config"]["deepspeed"] == "zero3"
    assert cfg["deepspeed"]["zero_optimization"]["stage"] == 3
    assert (out / "prompt.safetensors").is_file() and (out / "tpv.json").is_file()


def test_torchrun_module_launch_from_the_wheel(fresh, tiny_model, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model, out, max_steps=1, deepspeed="zero2")
    p = _run([str(fresh), "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
              str(free_port()), "-m", "dtvg_ds.train", *args], tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert json.loads((out / "tpv.json").read_text())["steps"] == 1
