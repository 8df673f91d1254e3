"""Watching a run: --report_to sinks (TensorBoard, Weights & Biases offline) and the start-up
timing every launch logs once."""

from __future__ import annotations

import pytest

from dtvg_ds.config import ConfigError, parse_config, report_sinks
from tests.conftest import ROOT, ds_env, launch, read_jsonl, train_args


def test_report_to_values():
    assert report_sinks("none") == [] and report_sinks("tensorboard, wandb") == ["tensorboard",
                                                                                 "wandb"]
    for bad in ("mlflow", "none,wandb"):
        with pytest.raises(ConfigError, match="--report_to"):
            parse_config(["--task", "senti_a", "--output_dir", "/tmp/x", "--report_to", bad])


@pytest.mark.dist
def test_wandb_offline_tensorboard_startup_timing_and_resume(tiny_model, tmp_path):
    out = tmp_path / "run"
    env = ds_env(WANDB_MODE="offline", WANDB_SILENT="true")
    common = dict(max_steps=6, save_steps=3, report_to="tensorboard,wandb")
    launch(ROOT / "launchers" / "train.py",
           train_args(tiny_model, out, stop_at_step=3, **common), env=env)
    run_id = (out / "wandb_run_id").read_text().strip()
    launch(ROOT / "launchers" / "train.py",
           train_args(tiny_model, out, resume="auto", **common), env=env)

    # one W&B run, continued by the resume (same id), holding our scalars
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs), runs
    blob = b"".join(p.read_bytes() for r in runs for p in r.glob("*.wandb"))
    for key in (b"loss", b"startup_s_to_first_step", b"steps_per_second"):
        assert key in blob
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # start-up timing: logged once per launch, at the launch's first step
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "startup_s_to_first_step" in r]
    assert [r["step"] for r in rows] == [1, 4]
    for r in rows:
        phases = {k: v for k, v in r.items() if k.startswith("startup_") and k.endswith("_s")}
        assert {"startup_load_backbone_s", "startup_deepspeed_initialize_s",
                "startup_first_step_s", "startup_interpreter_and_imports_s"} <= set(phases)
        assert all(v >= 0 for v in phases.values())
        assert sum(phases.values()) == pytest.approx(r["startup_s_to_first_step"], abs=0.05)
