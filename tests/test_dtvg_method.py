"""The DTVG prompt module in one process: grouping cadence, ablations, gradients, resume state."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dtvg_ds.config import parse_config
from dtvg_ds.methods import load_inputs
from dtvg_ds.methods.dtvg import DTVG, DTVGSettings
from tests.conftest import make_tpvs


@pytest.fixture(scope="module")
def tpvs(tiny_model, tmp_path_factory):
    return make_tpvs(tiny_model, tmp_path_factory.mktemp("tpvs_m"))


def build(paths, tmp_path, **kw) -> DTVG:
    argv = ["--method", "dtvg", "--task", "senti_a", "--output_dir", str(tmp_path),
            "--target_tpv", str(paths["target_t"]),
            "--source_tpvs", *(str(paths[s]) for s in ("src_a", "src_b", "src_c", "src_d"))]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    cfg = parse_config(argv)
    inputs = load_inputs(cfg)
    return DTVG(inputs.target.init, inputs,
                DTVGSettings.of(dataclasses.replace(cfg, **inputs.adopted)))


def test_default_rule_groups_aligned_sources_every_step(tpvs, tmp_path):
    m = build(tpvs[0], tmp_path)
    recs = [m.on_step_start(s) for s in range(3)]
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert all(r["group"] == ["src_a", "src_b"] for r in recs)
    assert m.group == [0, 1]


@pytest.mark.parametrize("ablation,group", [("no_kc", ["src_a", "src_b"]),
                                            ("target_only", []),
                                            ("all_sources", ["src_a", "src_b", "src_c", "src_d"])])
def test_ablations(tpvs, tmp_path, ablation, group):
    m = build(tpvs[0], tmp_path, ablation=ablation)
    m.on_step_start(0)
    assert [m.source_names[i] for i in m.group] == group


def test_no_kc_keeps_every_positive_source(tpvs, tmp_path):
    m = build(tpvs[0], tmp_path, ts_threshold=-1.0, ablation="no_kc")
    r = m.on_step_start(0)
    assert r["group"] == r["positive"] and len(r["group"]) == 4
    m2 = build(tpvs[0], tmp_path, ts_threshold=-1.0)
    assert len(m2.on_step_start(0)["group"]) < 4  # KC drops the conflicting sources


def test_regroup_every_and_fixed_group(tpvs, tmp_path):
    m = build(tpvs[0], tmp_path, regroup_every=3)
    steps = [s for s in range(7) if m.on_step_start(s) is not None]
    assert steps == [0, 3, 6]
    f = build(tpvs[0], tmp_path, ablation="fixed_group")
    assert f.on_step_start(0)["group"] == ["src_a", "src_b"]
    with torch.no_grad():  # even if the target moves, the fixed group never changes
        f.prompt.mul_(-1)
    assert f.on_step_start(1) is None and f.group == [0, 1]


def test_group_follows_the_target(tpvs, tmp_path):
    m = build(tpvs[0], tmp_path)
    with torch.no_grad():  # flip the target vector: the -v sources become the positive ones
        m.prompt.copy_(2 * m.p_init - m.prompt)
    r = m.on_step_start(0)
    assert set(r["positive"]) == {"src_c", "src_d"}


def test_merge_gradients_reach_only_selected_scales(tpvs, tmp_path):
    m = build(tpvs[0], tmp_path)
    m.on_step_start(0)
    m().pow(2).sum().backward()
    assert m.prompt.grad.abs().sum() > 0 and m.scale_target.grad.abs().sum() > 0
    g = m.scale_sources.grad
    assert g[:2].abs().sum() > 0 and torch.count_nonzero(g[2:]) == 0


def test_extra_state_round_trip(tpvs, tmp_path):
    m = build(tpvs[0], tmp_path, ablation="fixed_group")
    m.on_step_start(0)
    m2 = build(tpvs[0], tmp_path, ablation="fixed_group")
    m2.load_extra_state(m.extra_state())
    assert m2.group == m.group and m2.on_step_start(5) is None


def test_source_scale_init_extension(tpvs, tmp_path):
    m = build(tpvs[0], tmp_path, source_scale_init=0.2)
    assert torch.equal(m.scale_sources, torch.full_like(m.scale_sources, 0.2))
    assert torch.equal(m.scale_target, torch.ones_like(m.scale_target))  # a_t keeps init 1
    assert m.artifact_meta()["source_scale_init"] == 0.2
    assert torch.equal(build(tpvs[0], tmp_path).scale_sources, torch.ones_like(m.scale_sources))


def test_norm_matched_merge_extension(tpvs, tmp_path):
    plain, normed = build(tpvs[0], tmp_path), build(tpvs[0], tmp_path, merge_norm="target")
    r = normed.on_step_start(0)
    plain.on_step_start(0)
    t_t = normed.prompt.detach() - normed.p_init
    d_norm, d_plain = normed().detach() - normed.p_init, plain().detach() - plain.p_init
    assert float(d_norm.norm()) == pytest.approx(float(t_t.norm()), rel=1e-5)
    assert float(d_plain.norm()) > 1.2 * float(t_t.norm())  # the released merge grows the step
    cos = torch.nn.functional.cosine_similarity(d_norm.flatten(), d_plain.flatten(), dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-5)  # same direction
    assert r["norm_mix"] == pytest.approx(float(t_t.norm()), rel=1e-5)


def test_frozen_tensors_move_to_the_device_once(tpvs, tmp_path):
    m = build(tpvs[0], tmp_path)
    m.on_step_start(0)
    m()
    first = m._resident["source_vectors"]
    m()
    assert m._resident["source_vectors"] is first  # kept, not copied again per micro step
    assert m.resident("p_init", m.prompt.device) is m._resident["p_init"]
