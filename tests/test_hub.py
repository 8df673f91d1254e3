"""Offline compute nodes: the pre-download command, runs from a Hub cache with HF_HUB_OFFLINE=1,
advice that fits offline, and reads that happen once per node (local rank 0 first)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import HUB_COMMIT as COMMIT
from conftest import HUB_REPO as REPO
from conftest import ROOT, ds_env, free_port, launch, train_args


def fetch(home, *args: str, offline: bool = True) -> subprocess.CompletedProcess:
    env = ds_env(HF_HOME=str(home), HF_HUB_OFFLINE="1" if offline else "0")
    return subprocess.run([sys.executable, "-m", "dtvg_ds.fetch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_fetch_offline_finds_the_cached_snapshot_and_task(hf_home):
    p = fetch(hf_home, "--model_name_or_path", REPO, "--task", "senti_a")
    assert p.returncode == 0, p.stderr
    assert f"ok    model {REPO}: {hf_home}/hub/models--dtvg-test--tiny-t5/snapshots/{COMMIT}" in p.stdout
    assert "ok    task senti_a: senti_a/train 4,000, senti_a/validation 400, senti_a/test 400" in p.stdout
    assert "HF_HUB_OFFLINE=1" in p.stdout.splitlines()[-1]


def test_fetch_offline_names_what_is_missing_and_the_command(hf_home):
    p = fetch(hf_home, "--model_name_or_path", REPO, "dtvg-test/absent", "--task", "rte")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errs) == 2, p.stderr
    assert errs[0].startswith("error: model dtvg-test/absent: ")
    assert (f"`HF_HOME={hf_home} python -m dtvg_ds.fetch --model_name_or_path dtvg-test/absent`"
            in errs[0])
    assert "HF_HUB_OFFLINE=0" not in p.stderr  # the old, wrong advice for an offline node
    assert errs[1].startswith("error: task rte: ") and "--task rte" in errs[1]
    assert f"ok    model {REPO}" in p.stdout  # the others are still checked


def test_fetch_needs_something_to_fetch(hf_home):
    p = fetch(hf_home)
    assert p.returncode == 2 and "nothing to fetch" in p.stderr


@pytest.mark.dist
def test_two_ranks_train_offline_from_the_hub_cache(hf_home, tmp_path):
    out = tmp_path / "run"
    args = train_args(hf_home, out, max_steps=1)
    args[args.index("--model_name_or_path") + 1] = REPO
    launch(ROOT / "launchers" / "train.py", args, env=ds_env(HF_HOME=str(hf_home)))
    meta = json.loads((out / "tpv.json").read_text())
    assert meta["backbone"] == REPO  # the name the user gave, not the cache path


@pytest.mark.dist
def test_a_missing_backbone_stops_every_rank_with_one_error(hf_home, tmp_path):
    out = tmp_path / "run"
    args = train_args(hf_home, out, max_steps=1)
    args[args.index("--model_name_or_path") + 1] = "dtvg-test/absent"
    p = launch(ROOT / "launchers" / "train.py", args, check=False,
               env=ds_env(HF_HOME=str(hf_home)), timeout=300)
    assert p.returncode != 0
    errs = [ln for ln in (p.stdout + p.stderr).splitlines() if "error: " in ln]
    assert len(errs) == 1, errs  # local rank 0 reports; rank 1 stops quietly (PeerError)
    assert "dtvg-test/absent: not available (not in the cache)" in errs[0]
    assert "python -m dtvg_ds.fetch --model_name_or_path dtvg-test/absent" in errs[0]
    assert not out.exists()  # nothing was written


@pytest.mark.dist
def test_each_node_reads_once_on_its_local_rank_0(tmp_path):
    """Two "nodes" of 2 ranks on one machine, each with its own cache dir (per-node
    disks): per node only local rank 0 tokenises; the node's other rank runs a `local_first`
    read after its local rank 0 finished; a failure on node 1's local rank 0 stops every rank."""
    # The 4 ranks are started directly with the launcher's environment (2 "nodes" x 2 local
    # ranks), not by two torchrun agents: the agent that hosts the rendezvous store can exit
    # before the other agent's exit barrier, which fails that agent although every rank passed.
    port = str(free_port())
    procs = []
    for node in (0, 1):
        for local in (0, 1):
            env = ds_env(RANK=str(2 * node + local), WORLD_SIZE="4", LOCAL_RANK=str(local),
                         LOCAL_WORLD_SIZE="2", GROUP_RANK=str(node), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port)
            cmd = [sys.executable, str(ROOT / "tests" / "node_probe.py"), str(tmp_path),
                   str(tmp_path / f"cache{node}"), "1"]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0][-3000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for f in facts:
        assert f["n"] == 50
        assert f["tokenised"] == (1 if f["local_rank"] == 0 else 0), f
        same_node_first = next(g for g in facts if g["node"] == f["node"] and g["local_rank"] == 0)
        if f["local_rank"] != 0:
            assert f["first"][0] >= same_node_first["first"][1]  # started after it finished
        if f["node"] == 1 and f["local_rank"] == 0:
            assert f["error"] == "ValueError: node 1 has no such file"
        else:
            assert f["error"].startswith("PeerError: stopped: the local rank 0 of a node failed")
    assert (tmp_path / "cache0").is_dir() and (tmp_path / "cache1").is_dir()
