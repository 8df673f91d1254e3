"""Stage 2 (DTVG) and SPoT on 2 CPU ranks under ZeRO-3, from constructed stage-1 artifacts whose
right group is known; plus the input validation that runs before any training."""

from __future__ import annotations

import json

import pytest
import torch

from dtvg_ds.artifacts import ArtifactError, load_artifact, save_artifact
from dtvg_ds.config import parse_config
from dtvg_ds.methods import load_inputs
from dtvg_ds.methods.inputs import check_against_run
from tests.conftest import ROOT, launch, make_tpvs, p_init_of, read_jsonl, train_args

TRAIN = ROOT / "launchers" / "train.py"


@pytest.fixture(scope="module")
def tpvs(tiny_model, tmp_path_factory):
    return make_tpvs(tiny_model, tmp_path_factory.mktemp("tpvs"))


def _dtvg_args(model, out, paths, **kw):
    return train_args(model, out, method="dtvg", task="senti_a", target_tpv=str(paths["target_t"]),
                      source_tpvs=[str(paths[s]) for s in ("src_a", "src_b", "src_c", "src_d")],
                      learning_rate=1e-4, target_task_scale_learning_rate=1e-4,
                      source_task_scale_learning_rate=1e-4, max_steps=4, fingerprint_every=2, **kw)


@pytest.fixture(scope="module")
def dtvg_run(tiny_model, tpvs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dtvg") / "run"
    launch(TRAIN, _dtvg_args(tiny_model, out, tpvs[0], eval_on_start=True))
    return out


@pytest.mark.dist
def test_dtvg_zero3_two_ranks_known_group(dtvg_run, tpvs):
    paths, vectors = tpvs
    out = dtvg_run
    recs = read_jsonl(out / "groups.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    for r in recs:
        assert r["positive"] == ["src_a", "src_b"]
        assert r["group"] == ["src_a", "src_b"] and r["k"] == 2
        assert r["kc"][0] == 0.0 and r["kc"][1] > 0
        assert r["ts_threshold"] == 0.0 and r["group_lambda"] == 0.0
    # TS at step 0 equals the hand computation (all scales are 1 then)
    t = vectors["target_t"]
    for name in ("src_a", "src_b", "src_c"):
        want = float((t.mean(0) * vectors[name].mean(0)).mean())
        assert recs[0]["ts"][name] == pytest.approx(want, rel=1e-4)
    # the diagnostics each record carries: at step 0 every scale is 1, so ||P_mix - P_init||
    # is the norm of T_t + T_a + T_b
    mix0 = vectors["target_t"] + vectors["src_a"] + vectors["src_b"]
    assert recs[0]["norm_mix"] == pytest.approx(float(mix0.norm()), rel=1e-4)
    assert recs[0]["norm_target"] == pytest.approx(float(t.norm()), rel=1e-4)
    assert recs[0]["scale_target_mean"] == recs[0]["scale_group_mean"] == 1.0
    assert set(recs[0]["scale_sources_mean"]) == {"src_a", "src_b", "src_c", "src_d"}
    # --eval_on_start: the step-0 merge is scored and logged, but never exported as the best
    evals = [m for m in read_jsonl(out / "metrics.jsonl") if "eval_score" in m]
    assert [m["step"] for m in evals] == [0, 4]
    assert load_artifact(out).meta["best_metric"]["step"] == 4
    traces = [read_jsonl(out / "group_trace" / f"rank{k}.jsonl") for k in range(2)]
    assert traces[0] == traces[1] and len(traces[0]) == 4  # every rank applied the same group
    art = load_artifact(out)
    assert art.meta["method"] == "dtvg" and art.meta["extra"]["group"] == ["src_a", "src_b"]
    assert art.tensors["scale_target"].shape == (8,)
    assert art.tensors["scale_sources"].shape == (4, 8)
    # the exported prompt is P_mix = P_init + a_t T_t + sum a_s T_s over the group (~ at tiny lr)
    approx = art.init + vectors["target_t"] + vectors["src_a"] + vectors["src_b"]
    torch.testing.assert_close(art.prompt, approx, atol=5e-3, rtol=0)


@pytest.mark.dist
def test_spot_picks_most_similar_source(tiny_model, tpvs, tmp_path):
    paths, _ = tpvs
    out = tmp_path / "spot"
    launch(TRAIN, train_args(tiny_model, out, method="spot", target_tpv=str(paths["target_t"]),
                             source_tpvs=[str(paths[s]) for s in ("src_c", "src_b", "src_a")],
                             max_steps=2))
    extra = load_artifact(out).meta["extra"]
    sims = extra["spot_similarities"]
    # cosine of whole stage-1 prompts (which share P_init): +v sources beat the -v one
    assert extra["spot_source"] == "src_a" == max(sims, key=sims.get)
    assert sims["src_a"] > sims["src_b"] > sims["src_c"]


@pytest.mark.dist
def test_bad_stage2_input_exits_2_and_writes_nothing(tiny_model, tpvs, tmp_path):
    paths, _ = tpvs
    out = tmp_path / "bad"
    args = _dtvg_args(tiny_model, out, paths)
    i = args.index("--source_tpvs")
    args[i + 1] = str(paths["target_t"])
    p = launch(TRAIN, args, check=False)
    assert p.returncode != 0
    assert "the target is never its own source" in p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists()


def _cfg(paths, *sources, **kw):
    argv = ["--method", "dtvg", "--task", "senti_a", "--output_dir", "/tmp/o",
            "--target_tpv", str(paths["target_t"]), "--source_tpvs", *map(str, sources)]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    return parse_config(argv)


def test_input_validation_messages(tpvs, tmp_path, tiny_model):
    paths, _ = tpvs
    with pytest.raises(ArtifactError, match="given twice"):
        load_inputs(_cfg(paths, paths["src_a"], paths["src_a"]))
    with pytest.raises(ArtifactError, match="never its own source"):
        load_inputs(_cfg(paths, paths["target_t"]))
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        load_inputs(_cfg(paths, tmp_path / "missing"))
    with pytest.raises(ArtifactError, match="--num_virtual_tokens 5 differs"):
        load_inputs(_cfg(paths, paths["src_a"], num_virtual_tokens=5))
    cfg = _cfg(paths, paths["src_a"])
    inputs = load_inputs(cfg)
    assert inputs.adopted == {"num_virtual_tokens": 8}  # from the target artifact, returned
    assert inputs.adopted_from == str(paths["target_t"]) and cfg.num_virtual_tokens == 100
    p_init, fp = p_init_of(tiny_model)
    meta = {"backbone": "x", "backbone_fingerprint": fp, "init_fingerprint": "y"}
    check_against_run(inputs, meta, p_init)
    with pytest.raises(ArtifactError, match="its P_init differs"):
        check_against_run(inputs, meta, p_init + 1)
    with pytest.raises(ArtifactError, match="pass the --model_name_or_path it was trained on"):
        check_against_run(inputs, {**meta, "backbone_fingerprint": "zzz"}, p_init)
    # a source from another init is refused before anything runs
    other = tmp_path / "other"
    save_artifact(other, torch.ones(8, 64), torch.zeros(8, 64), {
        **json.loads((paths["src_a"] / "tpv.json").read_text()), "task": "other"})
    with pytest.raises(ArtifactError, match="prompt init differs"):
        load_inputs(_cfg(paths, paths["src_a"], other))


@pytest.mark.dist
def test_dtvg_stop_and_resume_equals_uninterrupted(dtvg_run, tiny_model, tpvs, tmp_path):
    out = tmp_path / "resumed"
    launch(TRAIN, _dtvg_args(tiny_model, out, tpvs[0], stop_at_step=2))
    launch(TRAIN, _dtvg_args(tiny_model, out, tpvs[0], resume="auto"))
    a, b = load_artifact(dtvg_run), load_artifact(out)
    for k in ("prompt", "scale_target", "scale_sources"):
        torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-6, atol=1e-7)
    strip = [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(dtvg_run / "groups.jsonl")]
    got = [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(out / "groups.jsonl")]
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    assert [r["group"] for r in got] == [r["group"] for r in strip]
    for x, y in zip(got, strip, strict=True):
        assert x["ts"] == pytest.approx(y["ts"], rel=1e-5)


@pytest.mark.dist
def test_generic_spot_from_a_mixture_trained_prompt(tiny_model, tmp_path):
    mix = tmp_path / "mix"
    launch(TRAIN, train_args(tiny_model, mix, task="senti_a+has_color", max_steps=4,
                             mixture_cap=100))
    evals = [r for r in read_jsonl(mix / "metrics.jsonl") if "eval_score" in r]
    assert {"eval_senti_a/accuracy", "eval_has_color/accuracy"} <= set(evals[-1])
    assert evals[-1]["eval_score"] == pytest.approx(
        (evals[-1]["eval_senti_a/accuracy"] + evals[-1]["eval_has_color/accuracy"]) / 2)
    assert load_artifact(mix).meta["best_metric"]["name"] == "mean_task_score"
    out = tmp_path / "generic_spot"
    launch(TRAIN, train_args(tiny_model, out, method="spot", task="senti_b",
                             source_tpvs=[str(mix)], max_steps=2))
    assert load_artifact(out).meta["extra"]["spot_source"] == "senti_a+has_color"
