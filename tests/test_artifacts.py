"""The task prompt vector artifact: round trip, metadata, atomic writes, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from dtvg_ds.artifacts import (
    ArtifactError,
    check_compatible,
    load_artifact,
    save_artifact,
    tensor_fingerprint,
)


def _meta(**kw):
    m = {"task": "t", "backbone": "b", "backbone_fingerprint": "fp", "init_method": "vocab",
         "init_seed": 0, "steps": 3, "best_metric": {"name": "accuracy", "value": 50.0, "step": 3},
         "method": "pt"}
    m.update(kw)
    return m


def _save(path, r=4, d=6, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(r, d, generator=g)
    prompt = init + 0.1 * torch.randn(r, d, generator=g)
    save_artifact(path, prompt, init, _meta(**kw))
    return prompt, init


def test_round_trip(tmp_path):
    prompt, init = _save(tmp_path / "a")
    art = load_artifact(tmp_path / "a")
    torch.testing.assert_close(art.prompt, prompt)
    torch.testing.assert_close(art.init, init)
    torch.testing.assert_close(art.task_vector, prompt - init)
    assert art.meta["num_tokens"] == 4 and art.meta["d_model"] == 6
    assert art.meta["init_fingerprint"] == tensor_fingerprint(init)
    assert art.meta["format_version"] == 1 and "dtvg_ds_version" in art.meta
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["prompt.safetensors", "tpv.json"]


def test_missing_dir_and_files(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        load_artifact(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="tpv.json: missing"):
        load_artifact(tmp_path / "empty")


def test_truncated_safetensors_detected(tmp_path):
    _save(tmp_path / "a")
    f = tmp_path / "a" / "prompt.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ArtifactError, match="checksum does not match"):
        load_artifact(tmp_path / "a")


def test_nan_refused(tmp_path):
    from safetensors.torch import save

    _save(tmp_path / "a")
    meta_f = tmp_path / "a" / "tpv.json"
    meta = json.loads(meta_f.read_text())
    t = torch.zeros(4, 6)
    t[0, 0] = float("nan")
    blob = save({"prompt": t, "init": torch.zeros(4, 6), "task_vector": t.clone()})
    (tmp_path / "a" / "prompt.safetensors").write_bytes(blob)
    meta.pop("safetensors_sha256")
    meta_f.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="NaN/Inf"):
        load_artifact(tmp_path / "a")


def test_incompatible_artifacts_named(tmp_path):
    _save(tmp_path / "a", seed=0)
    _save(tmp_path / "b", seed=1)  # another init
    _save(tmp_path / "c", seed=0, backbone_fingerprint="other")
    a, b, c = (load_artifact(tmp_path / x) for x in "abc")
    with pytest.raises(ArtifactError, match="prompt init differs"):
        check_compatible([a, b])
    with pytest.raises(ArtifactError, match="backbone differs"):
        check_compatible([a, c])
    check_compatible([a, load_artifact(tmp_path / "a")])


def test_rewrite_is_atomic_and_leaves_no_temp_files(tmp_path):
    _save(tmp_path / "a", seed=0)
    _save(tmp_path / "a", seed=0, steps=9)
    assert load_artifact(tmp_path / "a").meta["steps"] == 9
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]


def test_in_progress_artifact_is_refused_unless_allowed(tmp_path, capsys):
    _save(tmp_path / "run", status="in_progress", steps=40)
    with pytest.raises(ArtifactError, match=r"has not finished \(best so far, written at step 40\);"
                                            r" let that run finish"):
        load_artifact(tmp_path / "run")
    art = load_artifact(tmp_path / "run", allow_in_progress=True)
    assert art.meta["status"] == "in_progress"
    assert "WARNING" in capsys.readouterr().err
    _save(tmp_path / "done", status="complete")
    _save(tmp_path / "old")  # written before the status field existed: complete
    assert load_artifact(tmp_path / "done") and load_artifact(tmp_path / "old")
