"""`python -m dtvg_ds.protocol`: plans checked against the published settings, the batch
arithmetic, the memory recipe, the table's arithmetic, bad protocol files, and the demo protocol
end to end with the local executor (a failed job blocks its dependants, a re-run continues,
a changed setting makes a run stale instead of silently reusing or overwriting it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtvg_ds.protocol import graph, spec, state, table
from dtvg_ds.protocol.executors import SLURM_DIR, sbatch_command, script
from dtvg_ds.protocol.spec import ProtocolError
from tests.conftest import ROOT, ds_env


def _plan(name: str, out: Path, **overrides) -> list[graph.Job]:
    return graph.build(spec.load(name, overrides), out)


def _by_id(jobs: list[graph.Job]) -> dict[str, graph.Job]:
    return {j.id: j for j in jobs}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtvg_ds.protocol", *args], cwd=ROOT,
                          env=env or ds_env(), capture_output=True, text=True, timeout=1200)


# -- the shipped protocols against the published settings --------------------------------------

SOURCES = ["mnli", "qnli", "qqp", "sst2", "record", "squad"]


def test_t5_base_plan_has_the_published_settings(tmp_path):
    jobs = _by_id(_plan("dtvg_t5_base", tmp_path))
    stage1 = [j for j in jobs.values() if j.kind == "stage1"]
    assert [j.task for j in stage1] == SOURCES
    for j in jobs.values():
        f = j.flags
        assert f["model_name_or_path"] == "t5-base" and f["num_virtual_tokens"] == 100
        assert f["warmup_steps"] == 500 or j.task in ("wsc", "cb")
        # a mixture (MPT's source training) takes the longest of its tasks
        want_len = 512 if "+" in j.task else \
            {"record": 512, "squad": 512, "multirc": 348}.get(j.task, 256)
        assert f["max_source_length"] == want_len, j.id
        assert f["seed"] == f["data_seed"] == j.seed
    # stage 1 and the PT row: lr 0.3, 20 epochs at batch 32
    mnli = jobs["stage1-mnli"].flags
    assert mnli["learning_rate"] == 0.3
    assert mnli["max_steps"] == math.ceil(20 * 392702 / 32)
    assert jobs["pt-rte-full-s42"].flags["max_steps"] == math.ceil(20 * 2490 / 32)
    assert jobs["pt-rte-full-s42"].flags["do_test"] is True
    assert not jobs["stage1-mnli"].test  # a source is not a table entry
    # DTVG as released for t5-base: lr 1e-3 for the prompt and both scales, batch 16, 30k steps
    d = jobs["dtvg-rte-full-s43"]
    assert (d.flags["learning_rate"], d.flags["target_task_scale_learning_rate"],
            d.flags["source_task_scale_learning_rate"]) == (0.001, 0.001, 0.001)
    assert d.flags["max_steps"] == 30000 and d.global_batch == 16
    assert d.flags["target_tpv"] == jobs["pt-rte-full-s43"].output_dir
    assert d.deps == ["pt-rte-full-s43", *(f"stage1-{s}" for s in SOURCES)]
    assert jobs["dtvg_no_kc-rte-full-s43"].flags["ablation"] == "no_kc"
    assert jobs["mpt-rte-full-s42"].deps == ["mpt_source"]
    a = jobs["attempt-cb-full-s44"]  # ATTEMPT as released: lr 0.3, 20 epochs, the 6 sources
    assert a.flags["learning_rate"] == 0.3 and a.flags["max_steps"] == math.ceil(20 * 250 / 32)
    assert a.deps == ["pt-cb-full-s44", *(f"stage1-{s}" for s in SOURCES)]
    # a target that is also a source never transfers from its own stage-1 run
    m = jobs["dtvg-mnli-full-s42"]
    assert m.deps[0] == "pt-mnli-full-s42" and "stage1-mnli" not in m.deps
    assert all("stage1-mnli" not in p for p in m.flags["source_tpvs"])
    # every table row: 13 targets x 3 seeds; outputs never shared
    assert sum(j.label == "dtvg" for j in jobs.values()) == 13 * 3
    assert len({j.output_dir for j in jobs.values()}) == len(jobs)


@pytest.mark.parametrize("gpus", [1, 2, 8, 16])
def test_global_batch_is_the_same_on_any_number_of_gpus(tmp_path, gpus):
    one = _by_id(_plan("dtvg_t5_base", tmp_path))
    many = _by_id(_plan("dtvg_t5_base", tmp_path, gpus_per_node=gpus))
    for jid, j in many.items():
        f = j.flags
        assert f["per_device_train_batch_size"] * f["gradient_accumulation_steps"] * gpus \
            == j.global_batch == one[jid].global_batch, jid
        assert f["max_steps"] == one[jid].flags["max_steps"]
        assert f["per_device_train_batch_size"] <= 32


def test_fewshot_plan(tmp_path):
    jobs = _plan("dtvg_fewshot", tmp_path)
    cells = {(j.cell, j.flags.get("k_shot")) for j in jobs if j.kind in ("target", "method")}
    assert cells == {("k4", 4), ("k16", 16), ("k32", 32)}
    pt = _by_id(jobs)["pt-cb-k16-s2"]
    assert pt.flags["k_shot"] == 16 and pt.flags["data_seed"] == 2 and pt.global_batch == 8
    assert pt.flags["max_steps"] == 1000
    assert all("k_shot" not in j.flags for j in jobs if j.kind == "stage1")  # full-data sources


def test_xl_recipe_is_sized_by_the_memory_planner(tmp_path):
    big = _by_id(_plan("flan_t5_xl", tmp_path, gpus_per_node=8, gpu_memory_gib=40))
    small = _by_id(_plan("flan_t5_xl", tmp_path, gpus_per_node=2, gpu_memory_gib=16))
    for jobs, mem in ((big, 40), (small, 16)):
        for j in jobs.values():
            assert j.recipe["peak_train_gib"] <= 0.85 * mem, j.id
            assert j.flags["deepspeed"] == j.recipe["deepspeed"]
            assert j.flags["per_device_train_batch_size"] * j.flags[
                "gradient_accumulation_steps"] * j.ranks == 32
    # less memory per GPU: a smaller micro batch (and more accumulation) for the same job
    b, s = big["stage1-squad"].flags, small["stage1-squad"].flags
    assert s["per_device_train_batch_size"] < b["per_device_train_batch_size"]
    with pytest.raises(ProtocolError, match="gradient_checkpointing"):
        _plan("flan_t5_xl", tmp_path, gpus_per_node=1, gpu_memory_gib=4)


# -- bad input ------------------------------------------------------------------------------------

def test_bad_protocol_file_lists_every_problem_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nglobal_batch_size: 30\nresources: {gpus_per_node: 4}\n"
                   "sources: [senti_a]\nbenchmarks: {demo: [senti_c]}\nlearning_rate: 0.3\n"
                   "methods: {x: {learning_rate: 0.1}}\n")
    p = _cli("plan", str(bad), "--out", str(tmp_path / "out"))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert all(x.startswith("error: ") for x in lines) and "Traceback" not in p.stderr
    text = p.stderr
    assert "unknown key 'learning_rate'" in text
    assert "model_name_or_path is required" in text
    assert "methods.x: say which --method" in text
    assert not (tmp_path / "out" / graph.PLAN_FILE).exists()
    # flags the training CLI refuses are found at plan time, per job
    bad.write_text("name: bad\nmodel_name_or_path: demo\nglobal_batch_size: 30\n"
                   "resources: {gpus_per_node: 4}\nsources: [senti_a]\n"
                   "benchmarks: {demo: [senti_c]}\nmethods: {d: {method: dtvg, ablation: nope}}\n")
    p = _cli("plan", str(bad), "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and "global_batch_size 30 cannot be split over 4 ranks" in p.stderr
    bad.write_text(bad.read_text().replace("30", "32"))
    p = _cli("plan", str(bad), "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and "job d-senti_c-full-s42: --ablation 'nope'" in p.stderr, p.stderr
    p = _cli("plan", "no_such_protocol", "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and "shipped: demo, dtvg_fewshot" in p.stderr


def test_table_arithmetic(monkeypatch):
    plan = {"protocol": "t", "seeds": [1, 2, 3], "cells": ["full"], "methods": ["pt", "dtvg"],
            "benchmarks": {"B": ["a", "b"]}, "published": {"full": {"dtvg": {"B": 80.0}}}}
    scores = {("full", "a", "pt"): {1: 60.0, 2: 70.0, 3: 80.0},
              ("full", "b", "pt"): {1: 50.0, 2: 50.0},  # seed 3 missing
              ("full", "a", "dtvg"): {1: 90.0, 2: 90.0, 3: 90.0},
              ("full", "b", "dtvg"): {1: 70.0, 2: 80.0, 3: 90.0}}
    monkeypatch.setattr(table, "collect", lambda jobs: scores)
    rows = {(r["task"], r["method"]): r for r in table.build(plan, [])}
    assert rows[("a", "pt")]["mean"] == 70.0 and rows[("a", "pt")]["std"] == 10.0
    assert rows[("b", "pt")]["text"] == "50.0 ± 0.0 (2/3 seeds)"
    # benchmark average per seed (seeds with every task), then over seeds
    assert rows[("B avg", "pt")]["mean"] == pytest.approx((55 + 60) / 2)
    assert rows[("B avg", "pt")]["seeds"] == 2
    avg = rows[("B avg", "dtvg")]
    assert avg["mean"] == pytest.approx(85.0) and avg["std"] == pytest.approx(5.0)
    assert avg["published"] == 80.0 and avg["diff"] == pytest.approx(5.0)
    md = table.markdown(plan, list(rows.values()))
    assert "| B | **B avg** | 57.5 ± 3.5 (2/3 seeds) | 85.0 ± 5.0 |" in md
    assert "| dtvg | B avg | 85.0 ± 5.0 | 80.0 | +5.0 |" in md
    csv = table.to_csv(list(rows.values())).splitlines()
    assert csv[0].startswith("cell,benchmark,task,method,seeds,mean,std,published,diff")
    assert "full,B,B avg,dtvg,3,85.0,5.0,80.0,5.0,s1:80.00 s2:85.00 s3:90.00" in csv


def test_sbatch_commands(tmp_path):
    jobs = _by_id(_plan("demo", tmp_path))
    d = jobs["dtvg-senti_c-full-s1"]
    cmd, env = sbatch_command(tmp_path, d, False, ["11", "12"], ["--partition=x"])
    assert cmd[:2] == ["sbatch", "--parsable"] and "--nodes=1" in cmd
    assert "--dependency=afterok:11:12" in cmd and "--kill-on-invalid-dep=yes" in cmd
    assert cmd[cmd.index(str(SLURM_DIR / "stage2.sbatch")) + 1:] == d.argv()
    assert "--partition=x" in cmd and env["DTVG_RESUME"] == "auto"
    cmd, env = sbatch_command(tmp_path, d, True, [], [])
    assert cmd[-1] == "--overwrite_output_dir" and env["DTVG_RESUME"] == ""
    assert not any(c.startswith("--dependency") for c in cmd)
    assert script(jobs["mpt_source"]).name == "mpt.sbatch"
    assert script(jobs["pt-senti_c-full-s1"]).name == "stage1.sbatch"
    for f in SLURM_DIR.glob("*.sbatch"):  # small jobs may share a node
        assert "--exclusive" not in f.read_text(), f


# -- the demo protocol end to end on this machine ---------------------------------------------------

def _launches(log: Path) -> int:
    return log.read_text().count("$ deepspeed") if log.exists() else 0


@pytest.mark.dist
def test_demo_protocol_local_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "proto"
    small = ["--model_name_or_path", str(tiny_model), "--seeds", "1", "--gpus_per_node", "1",
             "--set", "max_steps=6", "eval_steps=3", "save_steps=6", "max_eval_samples=16",
             "max_test_samples=16", "num_virtual_tokens=8", "max_train_samples=128",
             "warmup_steps=1"]
    p = _cli("plan", "demo", "--out", str(out), *small)
    assert p.returncode == 0, p.stderr
    only = ["--only", "dtvg-senti_c-*"]  # and what it needs: 3 sources, the target's stage 1
    # a file of the user's where one source's output dir goes: that run refuses (exit 2)
    foreign = out / "runs" / "stage1-senti_b"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("mine")
    p = _cli("run", str(out), "--executor", "local", *only)
    assert p.returncode == 1, p.stdout + p.stderr
    _, jobs = graph.read(out)
    v = state.judge(out, jobs)
    assert v["stage1-senti_a"].state == v["pt-senti_c-full-s1"].state == state.DONE
    assert v["stage1-senti_b"].state == state.FAILED and "stage1-senti_b" in \
        v["stage1-senti_b"].detail, v["stage1-senti_b"]
    assert v["dtvg-senti_c-full-s1"].state == state.BLOCKED
    assert v["mpt_source"].state == state.BLOCKED  # not selected, and its input failed
    assert "failed: stage1-senti_b: exit 2: error:" in p.stdout, p.stdout
    assert "blocked: dtvg-senti_c-full-s1: needs stage1-senti_b" in p.stdout
    st = _cli("status", str(out))
    assert st.returncode == 1 and "exit 2: error:" in st.stdout
    assert foreign.read_text() == "mine"  # never touched

    # the user moves the file away and runs the same command: only what is missing runs
    foreign.unlink()
    logs = {j.id: _launches(state.log_path(out, j)) for j in jobs}
    p = _cli("run", str(out), "--executor", "local", *only)
    assert p.returncode == 0, p.stdout + p.stderr
    after = {j.id: _launches(state.log_path(out, j)) for j in jobs}
    assert after["stage1-senti_a"] == logs["stage1-senti_a"] == 1  # skipped: done, verified
    assert after["pt-senti_c-full-s1"] == 1 and after["stage1-senti_b"] == 2
    assert after["dtvg-senti_c-full-s1"] == 1 and after["mpt_source"] == 0
    v = state.judge(out, jobs)
    selected = [j.id for j in jobs if after[j.id]]
    assert all(v[j].state == state.DONE for j in selected), v
    test = json.loads((Path(_by_id(jobs)["dtvg-senti_c-full-s1"].output_dir) / "eval" /
                       "senti_c-test.json").read_text())
    assert test["split"] == "test" and test["examples"] == 16

    p = _cli("table", str(out))
    assert p.returncode == 0, p.stderr
    md = (out / "table.md").read_text()
    lines = md.splitlines()
    head = next(x for x in lines if x.startswith("| benchmark | task |"))
    row = next(x for x in lines if x.startswith("| demo | senti_c |"))
    cells = dict(zip([c.strip() for c in head.strip("|").split("|")],
                     [c.strip() for c in row.strip("|").split("|")], strict=True))
    assert cells["pt"][0].isdigit() and cells["dtvg"][0].isdigit(), row
    assert cells["spot"] == cells["mpt"] == cells["attempt"] == "—", row  # not selected
    assert "has_color_or_number | — |" in md
    csv = (out / "table.csv").read_text()
    assert f"full,demo,senti_c,dtvg,1,{test['score']}," in csv

    # a changed setting: the finished runs are stale, kept and not re-run without being asked
    p = _cli("plan", "demo", "--out", str(out), *small, "warmup_steps=2")
    assert p.returncode == 0, p.stderr
    p = _cli("run", str(out), "--executor", "local", *only)
    assert p.returncode == 1 and "stale: stage1-senti_a: trained with other settings: " \
        "warmup_steps 1 -> 2" in p.stdout, p.stdout
    assert {j.id: _launches(state.log_path(out, j)) for j in jobs} == after
    assert os.path.exists(Path(_by_id(jobs)["stage1-senti_a"].output_dir) / "tpv.json")


def test_job_states_from_records(tmp_path):
    """What `status` says about a job from the executors' records (no artifact yet)."""
    out = tmp_path / "proto"
    jobs = _plan("demo", out)
    by = _by_id(jobs)
    src, pt = by["stage1-senti_a"], by["pt-senti_c-full-s1"]
    dtvg = by["dtvg-senti_c-full-s1"]
    assert state.judge(out, jobs)[src.id].state == state.READY
    assert state.judge(out, jobs)[dtvg.id].state == state.WAITING
    state.write_record(out, src, executor="local", pid=os.getpid(), exit_code=None)
    assert state.judge(out, jobs)[src.id].state == state.RUNNING
    state.write_record(out, src, executor="local", pid=2**22 + 7, exit_code=None)  # gone
    v = state.judge(out, jobs)
    assert v[src.id].state == state.FAILED and "interrupted" in v[src.id].detail
    assert v[dtvg.id].state == state.BLOCKED and src.id in v[dtvg.id].detail
    state.log_path(out, pt).parent.mkdir(parents=True, exist_ok=True)
    state.log_path(out, pt).write_text("$ deepspeed ...\nstep 1\nerror: --task senti_c: boom\n"
                                       "[launcher] exit 2\n")
    state.write_record(out, pt, executor="local", pid=1, exit_code=2)
    assert state.judge(out, jobs)[pt.id].detail == "exit 2: error: --task senti_c: boom"
    # SLURM: the queue decides queued/running; gone from it without an artifact = failed
    state.write_record(out, src, executor="slurm", slurm_job_id="41")
    assert state.judge(out, jobs, {"41": "PENDING"})[src.id].state == state.QUEUED
    assert state.judge(out, jobs, {"41": "RUNNING"})[src.id].state == state.RUNNING
    v = state.judge(out, jobs, {})[src.id]
    assert v.state == state.FAILED and "never started" in v.detail
