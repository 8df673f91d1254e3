"""`python -m dtvg_ds.report`: figures from a synthetic run (in process, fast: group changes, a
torn last line, a mixture's members) and from a real 2-rank DTVG run on the tiny T5 built from
constructed stage-1 artifacts whose group is known (one launch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtvg_ds.report import (
    CANDIDATE,
    EXCLUDED,
    IN_GROUP,
    kc_steps,
    load_run,
    main,
    membership,
    run_facts,
    write_report,
)
from tests.conftest import ROOT, launch, make_tpvs, train_args

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DTVG_FIGURES = {"training.png", "dtvg_groups.png", "dtvg_target_similarity.png", "dtvg_kc.png",
                "summary.png"}


def _assert_pngs(paths, names):
    assert {p.name for p in paths} == names
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, p  # a real picture, not a stub
    assert not [p for p in paths[0].parent.iterdir() if p.name.endswith(".tmp")]


def _write_jsonl(path, recs, torn_tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + torn_tail)


def _synthetic_dtvg(root):
    """12 steps: the group grows from {a} to {a, b}, c drops below the threshold at step 6."""
    out = root / "run"
    out.mkdir()
    train = [{"step": s, "loss": 2.0 / s, "lr": 0.1} for s in range(1, 13)]
    evals = [{"step": s, "eval_accuracy": 50 + s, "eval_score": 50 + s, "eval_seconds": 1.0}
             for s in (4, 8, 12)]
    _write_jsonl(out / "metrics.jsonl", train + evals, torn_tail='{"step": 13, "lo')
    groups = []
    for s in range(12):
        ts = {"a": 0.3, "b": 0.1 + 0.02 * s, "c": 0.05 - 0.01 * s}
        pos = [n for n in sorted(ts, key=ts.get, reverse=True) if ts[n] > 0]
        group = ["a"] if s < 4 else ["a", "b"] if s < 9 else ["b", "a"]
        groups.append({"step": s, "ts": ts, "positive": pos, "group": group, "k": len(group),
                       "kc": [0.0, 0.2, 0.1][:len(pos)], "ts_threshold": 0.0,
                       "group_lambda": 0.0, "ablation": "none"})
    _write_jsonl(out / "groups.jsonl", groups)
    (out / "tpv.json").write_text(json.dumps({
        "task": "tgt", "method": "dtvg", "backbone": "demo",
        "best_metric": {"name": "accuracy", "value": 62.0, "step": 12},
        "extra": {"sources": ["a", "b", "c"], "group": ["b", "a"]}}))
    return out


def test_report_on_a_synthetic_dtvg_run(tmp_path, capsys):
    out = _synthetic_dtvg(tmp_path)
    run = load_run(out)
    assert run.is_dtvg and run.skipped_lines == 1 and len(run.train) == 12
    assert run.metric_key() == "eval_accuracy"
    names, steps, grid = membership(run)
    assert names == ["a", "b", "c"] and steps == list(range(12))  # most similar first
    assert grid[0] == [IN_GROUP] * 12
    assert grid[1] == [CANDIDATE] * 4 + [IN_GROUP] * 8
    assert grid[2][:4] == [CANDIDATE] * 4 and grid[2][6:] == [EXCLUDED] * 6  # TS <= 0
    assert kc_steps(run) == [0, 3, 6, 8, 11]
    facts = "\n".join(run_facts(run))
    assert "group now   b, a" in facts and "unreadable log line" in facts
    assert main([str(out), "--out", str(tmp_path / "figs")]) == 0
    written = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert all(p.parent == tmp_path / "figs" for p in written)
    _assert_pngs(written, DTVG_FIGURES)


def test_report_on_a_stage1_run_and_a_mixture(tmp_path):
    out = tmp_path / "pt"
    out.mkdir()
    recs = [{"step": s, "loss": 1.0 / s} for s in range(1, 40)]
    recs += [{"step": 20, "eval_score": 60.0, "eval_a/accuracy": 70.0, "eval_b/accuracy": 50.0},
             {"step": 39, "eval_score": 65.0, "eval_a/accuracy": 75.0, "eval_b/accuracy": 55.0}]
    _write_jsonl(out / "metrics.jsonl", recs)
    (out / "tpv.json").write_text(json.dumps({"task": "a+b", "method": "pt", "best_metric": {
        "name": "mean_task_score", "value": 65.0, "step": 39}}))
    run = load_run(out)
    assert not run.is_dtvg and run.metric_key() == "eval_score"  # the mixture's mean
    _assert_pngs(write_report(out), {"training.png", "summary.png"})
    assert (out / "report" / "summary.png").is_file()


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
    assert "no such directory" in err[0] and "no metrics.jsonl records" in err[1]


@pytest.mark.dist
def test_report_on_a_real_dtvg_run(tiny_model, tmp_path):
    paths, _ = make_tpvs(tiny_model, tmp_path / "tpvs")
    out = tmp_path / "dtvg"
    launch(ROOT / "launchers" / "train.py", train_args(
        tiny_model, out, method="dtvg", task="senti_a", target_tpv=str(paths["target_t"]),
        source_tpvs=[str(paths[s]) for s in ("src_a", "src_b", "src_c", "src_d")],
        learning_rate=1e-4, target_task_scale_learning_rate=1e-4,
        source_task_scale_learning_rate=1e-4, max_steps=4, eval_steps=2, max_eval_samples=16))
    run = load_run(out)
    assert [r["step"] for r in run.groups] == [0, 1, 2, 3] and len(run.evals) == 2
    names, _, grid = membership(run)
    states = dict(zip(names, grid, strict=True))
    assert states["src_a"] == states["src_b"] == [IN_GROUP] * 4  # the known group
    assert states["src_c"] == states["src_d"] == [EXCLUDED] * 4  # TS < 0 = threshold
    assert run.reference is not None  # the target's stage-1 value, for comparison
    assert set(run.scales) == {"scale_target", "scale_sources"}
    _assert_pngs(write_report(out), DTVG_FIGURES)
