"""The output dir with real launches: overwriting replaces a run completely, foreign files are
never deleted, and --resume refuses another run's checkpoint or other settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dtvg_ds import rundir
from dtvg_ds.artifacts import ArtifactError, load_artifact
from dtvg_ds.config import parse_config
from dtvg_ds.methods import load_inputs
from tests.conftest import ROOT, launch, read_jsonl, train_args

TRAIN = ROOT / "launchers" / "train.py"


def _ckpts(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))


def _run_id(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["run_id"]


def test_owned_names():
    for name in ("checkpoints", "metrics.jsonl", "memory.rank3.jsonl", ".tpv.json.ab12.tmp",
                 "wandb", "run.json", ".replaced-20260101-000000-abcdef"):
        assert rundir.owned(name), name
    for name in ("notes.txt", "metrics.jsonl.bak", "data", "prompt.pt"):
        assert not rundir.owned(name), name


@pytest.mark.dist
def test_overwrite_replaces_the_previous_run_completely(tiny_model, tmp_path):
    out = tmp_path / "x"
    launch(TRAIN, train_args(tiny_model, out, max_steps=6, save_steps=3))
    assert _ckpts(out) == ["step-00000003", "step-00000006"]
    old_id = _run_id(out)
    launch(TRAIN, train_args(tiny_model, out, max_steps=2, save_steps=1,
                             overwrite_output_dir=True))
    # nothing of the old run is left: checkpoints, metrics, run id, artifact, the aside dir
    assert _ckpts(out) == ["step-00000001", "step-00000002"]
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert max(steps) == 2 and steps.count(1) == 2  # start-up record + loss of step 1, once
    assert _run_id(out) != old_id
    assert not list(out.glob(".replaced-*"))
    assert load_artifact(out).meta["steps"] == 2
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["run_id"] == _run_id(out) and state["config"]["max_steps"] == 2


@pytest.mark.dist
def test_overwrite_refuses_a_dir_with_foreign_files(tiny_model, tmp_path):
    out = tmp_path / "x"
    launch(TRAIN, train_args(tiny_model, out, max_steps=2), nproc=1)
    before = sorted(p.name for p in out.iterdir())
    run_id = _run_id(out)
    (out / "notes.txt").write_text("mine")
    p = launch(TRAIN, train_args(tiny_model, out, max_steps=2, overwrite_output_dir=True),
               nproc=1, check=False)
    assert p.returncode == 2
    assert "did not write: notes.txt" in p.stderr and "nothing was changed" in p.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "notes.txt"])
    assert _run_id(out) == run_id and (out / "notes.txt").read_text() == "mine"


@pytest.mark.dist
def test_resume_refuses_other_settings_and_another_runs_checkpoint(tiny_model, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    launch(TRAIN, train_args(tiny_model, a, max_steps=4, save_steps=2, stop_at_step=2,
                             eval_steps=2))
    # the stopped run's best-so-far artifact is marked in progress: stage 2 refuses it
    assert load_artifact(a, allow_in_progress=True).meta["status"] == "in_progress"
    with pytest.raises(ArtifactError, match="has not finished.*--allow_in_progress_artifacts"):
        load_inputs(parse_config(["--method", "spot", "--task", "senti_b", "--output_dir",
                                  str(tmp_path / "s"), "--source_tpvs", str(a)]))
    # other settings: every difference is named, nothing is trained
    p = launch(TRAIN, train_args(tiny_model, a, max_steps=4, save_steps=2, resume="auto",
                                 learning_rate=0.1, task="senti_b"), check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "--learning_rate 0.3 -> 0.1" in p.stderr and "--task 'senti_a' -> 'senti_b'" in p.stderr
    assert _ckpts(a) == ["step-00000002"]
    # a checkpoint copied in from another run (same settings) is not this dir's run
    launch(TRAIN, train_args(tiny_model, b, max_steps=4, save_steps=2, stop_at_step=1,
                             save_total_limit=1))
    shutil.copytree(a / "checkpoints" / "step-00000002", b / "checkpoints" / "step-00000002")
    p = launch(TRAIN, train_args(tiny_model, b, max_steps=4, save_steps=2, resume="auto"),
               check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"belongs to run {_run_id(a)}" in p.stderr and f"now holds run {_run_id(b)}" in p.stderr
    # the right settings resume the right run, which keeps its id
    run_a = _run_id(a)
    launch(TRAIN, train_args(tiny_model, a, max_steps=4, save_steps=2, resume="auto",
                             eval_steps=2))  # how often it evaluates may change
    art = load_artifact(a)
    assert art.meta["steps"] == 4 and art.meta["status"] == "complete" and _run_id(a) == run_a


def test_task_aliases_are_one_task_to_stage_2(tmp_path):
    """`record` and `superglue-record` name one task: given both as sources, one is refused."""
    import torch

    from dtvg_ds.artifacts import save_artifact

    init = torch.zeros(4, 6)
    meta = {"backbone": "b", "backbone_fingerprint": "fp", "init_method": "vocab", "init_seed": 0,
            "steps": 3, "best_metric": {"name": "f1", "value": 1.0, "step": 3}, "method": "pt"}
    for i, name in enumerate(("squad", "record", "superglue-record")):
        save_artifact(tmp_path / name, init + i + 1, init, {**meta, "task": name})
    cfg = parse_config(["--method", "dtvg", "--task", "squad", "--output_dir", str(tmp_path / "o"),
                        "--target_tpv", str(tmp_path / "squad"), "--source_tpvs",
                        str(tmp_path / "record"), str(tmp_path / "superglue-record")])
    with pytest.raises(ArtifactError, match="task 'superglue-record' is already given by"):
        load_inputs(cfg)


def _cfg(out: Path, *flags: str):
    return parse_config(["--task", "senti_a", "--output_dir", str(out), *flags])


def test_a_wrong_resume_dir_moves_nothing(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000004").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    before = sorted(p.name for p in out.iterdir())
    run_id, aside = rundir.prepare(_cfg(out, "--resume", str(out / "checkpoints" / "step-9")))
    assert aside is None and sorted(p.name for p in out.iterdir()) == before


def test_resume_auto_refuses_unverifiable_checkpoints_and_finished_artifacts(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000004").mkdir(parents=True)  # no marker: does not verify
    with pytest.raises(Exception, match="none of which verifies; nothing was changed"):
        rundir.prepare(_cfg(out, "--resume", "auto"))
    assert (out / "checkpoints" / "step-00000004").is_dir()
    done = tmp_path / "done"
    done.mkdir()
    (done / "tpv.json").write_text(json.dumps({"status": "complete"}))
    with pytest.raises(Exception, match="a finished run's artifact"):
        rundir.prepare(_cfg(done, "--resume", "auto"))


def test_resume_auto_replaces_a_run_that_never_saved(tmp_path):
    """A requeued job whose first launch died before any checkpoint starts over; the unsaved
    run's files go aside (foreign files stay), and every aside dir goes after the first step."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "tpv.json").write_text(json.dumps({"status": "in_progress"}))
    (out / "notes.txt").write_text("mine")
    (out / ".replaced-older").mkdir()  # left by a replacement whose new run died early
    run_id, aside = rundir.prepare(_cfg(out, "--resume", "auto"))
    assert aside is not None and sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl",
                                                                            "tpv.json"]
    assert (out / "notes.txt").read_text() == "mine" and _run_id(out) == run_id
    rundir.finish_replacing(aside)
    assert not list(out.glob(".replaced-*"))
