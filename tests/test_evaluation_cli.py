"""Scoring a prompt on any split: `--do_test` at the end of training, `python -m
dtvg_ds.evaluation` (one rank, or sharded under a launcher) and `python -m dtvg_ds.predict
--deepspeed`. Every path must decode the same predictions for the same prompt and inputs; the
scores must be the task metric of exactly the split's examples, in order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, VENV_BIN, ds_env, free_port, launch, read_jsonl, train_args

from dtvg_ds.data import metrics
from dtvg_ds.data.zoo import get_task

pytestmark = pytest.mark.dist
N_TEST = 24


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    launch(ROOT / "launchers" / "train.py",
           train_args(tiny_model, out, max_steps=4, eval_steps=2, max_eval_samples=24,
                      do_test="true", max_test_samples=N_TEST))
    return out


def _module(mod: str, args: list[str], nproc: int = 0) -> subprocess.CompletedProcess:
    """`python -m mod args`, or under the deepspeed launcher on `nproc` CPU ranks."""
    if nproc:
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
               str(free_port()), "--module", mod, *args]
    else:
        cmd = [sys.executable, "-m", mod, *args]
    return subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=600)


def _preds(path: Path) -> list[str]:
    return [r["prediction"] for r in read_jsonl(path)]


def test_do_test_scores_the_best_prompt_on_the_test_split(run_dir):
    res = json.loads((run_dir / "eval" / "senti_a-test.json").read_text())
    rows = read_jsonl(run_dir / "eval" / "senti_a-test.predictions.jsonl")
    test = get_task("senti_a").load("test", "", N_TEST, 0)
    assert [r["source"] for r in rows] == [r["source"] for r in test]  # the split, in order
    assert [r["target"] for r in rows] == [r["target"] for r in test]
    want = metrics.compute("accuracy", [r["prediction"] for r in rows],
                           [r["target"] for r in test], get_task("senti_a").labels)
    assert res["metrics"] == pytest.approx(want) and res["score"] == want["score"]
    meta = json.loads((run_dir / "tpv.json").read_text())
    assert res["best_step"] == meta["best_metric"]["step"]  # the dev-selected prompt
    assert res["split"] == "test" and res["examples"] == N_TEST and res["world_size"] == 2
    logged = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "test_accuracy" in r]
    assert len(logged) == 1 and logged[0]["step"] == 4 and logged[0]["test_score"] == res["score"]


def test_cli_on_one_rank_reproduces_do_test(run_dir, tmp_path):
    p = _module("dtvg_ds.evaluation", ["--artifact", str(run_dir), "--max_eval_samples",
                                       str(N_TEST), "--output_dir", str(tmp_path)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "senti_a test: accuracy = " in p.stdout
    assert _preds(tmp_path / "senti_a-test.predictions.jsonl") == \
        _preds(run_dir / "eval" / "senti_a-test.predictions.jsonl")
    res = json.loads((tmp_path / "senti_a-test.json").read_text())
    assert res["world_size"] == 1 and res["zero_stage"] == 3  # the shipped default config
    assert res["data_seed"] == 0 and res["max_source_length"] == 256  # from run_config.json


def test_cli_sharded_synced_equals_one_rank_resident(run_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--artifact", str(run_dir), "--split", "validation", "--max_eval_samples", "30"]
    p1 = _module("dtvg_ds.evaluation", args + ["--output_dir", str(one)])
    p2 = _module("dtvg_ds.evaluation", args + ["--output_dir", str(two), "--deepspeed", "zero3",
                                               "--eval_gather_backbone", "never"], nproc=2)
    assert p1.returncode == 0 and p2.returncode == 0, (p1.stderr + p2.stderr)[-3000:]
    r1 = json.loads((one / "senti_a-validation.json").read_text())
    r2 = json.loads((two / "senti_a-validation.json").read_text())
    assert (r1["world_size"], r1["backbone_resident"]) == (1, True)
    assert (r2["world_size"], r2["backbone_resident"]) == (2, False)
    assert _preds(one / "senti_a-validation.predictions.jsonl") == \
        _preds(two / "senti_a-validation.predictions.jsonl")
    assert r1["metrics"] == r2["metrics"] and r1["examples"] == 30


def test_predict_sharded_equals_single_device(run_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    test = get_task("senti_a").load("test", "", 13, 0)
    src.write_text("".join(json.dumps({"id": i, "source": r["source"]}) + "\n"
                           for i, r in enumerate(test)))
    args = ["--artifact", str(run_dir), "--input", str(src), "--quiet"]
    p1 = _module("dtvg_ds.predict", args + ["--output", str(tmp_path / "one.jsonl")])
    p2 = _module("dtvg_ds.predict", args + ["--output", str(tmp_path / "two.jsonl"),
                                            "--deepspeed", "zero3"], nproc=2)
    assert p1.returncode == 0 and p2.returncode == 0, (p1.stderr + p2.stderr)[-3000:]
    assert p2.stdout.count("predictions written to") == 1  # rank 0 only
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert one == two and [r["id"] for r in two] == list(range(13))


def test_cli_user_errors(run_dir, tmp_path):
    p = _module("dtvg_ds.evaluation", ["--artifact", str(tmp_path / "nothing")])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("error: ") == 1 and "nothing" in p.stderr
    p = _module("dtvg_ds.evaluation", ["--artifact", str(run_dir), "--task", "no_such_task"])
    assert p.returncode == 2 and p.stderr.count("error: ") == 1 and "no_such_task" in p.stderr
