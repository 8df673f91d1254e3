"""`python -m dtvg_ds.plan`: per-rank memory from the config alone. Fast unit tests on the
built-in presets, and one real 2-rank ZeRO-3 run whose measured partition sizes the plan must
predict exactly."""

from __future__ import annotations

import json
import math

import pytest

from dtvg_ds import plan as P
from tests.conftest import ROOT, launch, train_args

ZERO3 = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
ZERO2 = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
OFFLOAD = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
# Published parameter counts (untied lm_head for Flan-T5).
PUBLISHED = {"t5-base": 222_903_552, "google/flan-t5-xl": 2_849_757_184,
             "google/flan-t5-xxl": 11_135_332_352}


@pytest.fixture(scope="module")
def presets():
    out = {}
    for name in P.PRESETS:
        cfg, is_preset = P.load_config(name)
        assert is_preset
        out[name] = (cfg, P.param_shapes(cfg))
    return out


def _plan(presets, name, n, ds, **kw):
    cfg, shapes = presets[name]
    return P.plan(cfg, n, ds, shapes=shapes, **kw)


def test_preset_parameter_counts_are_the_published_ones(presets):
    for name, (_, shapes) in presets.items():
        assert sum(x for _, x in shapes) == PUBLISHED[name], name
        assert ("lm_head.weight" in dict(shapes)) == (name != "t5-base")


def test_untied_lm_head_is_counted_as_from_pretrained_loads_it(tmp_path):
    """transformers 5 builds T5 tied, but from_pretrained keeps a checkpoint's own lm_head."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=100, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = torch.randn(100, 16)  # as the published Flan-T5 files hold
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(conf))
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path)
    real = sum(p.numel() for p in loaded.parameters())
    cfg2, is_preset = P.load_config(str(tmp_path))
    assert not is_preset
    assert sum(x for _, x in P.param_shapes(cfg2)) == real


def test_zero3_partitions_every_tensor_with_padding(presets):
    _, shapes = presets["google/flan-t5-xl"]
    total = sum(x for _, x in shapes)
    for n in (1, 3, 8, 64):
        p = _plan(presets, "google/flan-t5-xl", n, ZERO3, bf16=True)
        bb = p["backbone"]
        assert bb["partitioned"] and bb["params"] == total
        assert bb["partition_elements_per_rank"] == sum(math.ceil(x / n) for _, x in shapes)
        assert total / n <= bb["partition_elements_per_rank"] < total / n + len(shapes)
        assert bb["partition_bytes_per_rank"] == 2 * bb["partition_elements_per_rank"]
    assert _plan(presets, "google/flan-t5-xl", 1, ZERO3)["backbone"][
        "partition_elements_per_rank"] == total


def test_persistent_tensors_are_the_small_ones_kept_whole(presets):
    p = _plan(presets, "google/flan-t5-xl", 8, ZERO3, bf16=True, num_virtual_tokens=100)
    bb = p["backbone"]
    assert bb["persistence_threshold"] == 100 * 2048  # 'auto' = the prompt, as the engine sets
    # 122 layer norms (d each) + 2 relative attention biases (32 buckets x 32 heads)
    assert bb["persistent_tensors"] == 124
    assert bb["persistent_elements"] == 122 * 2048 + 2 * 32 * 32
    assert bb["elements_per_rank"] == bb["partition_elements_per_rank"] + bb["persistent_elements"]
    with pytest.raises(P.PlanError, match="below the prompt"):
        ds = json.loads(json.dumps(ZERO3))
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
        _plan(presets, "google/flan-t5-xl", 8, ds)


def test_model_persistence_cap_is_applied_in_registration_order(presets):
    ds = json.loads(json.dumps(ZERO3))
    zo = ds["zero_optimization"]
    zo["stage3_model_persistence_threshold"] = 100 * 768  # the prompt takes the whole budget
    assert _plan(presets, "t5-base", 2, ds)["backbone"]["persistent_tensors"] == 0
    # room for one 12 x 32 relative attention bias (the first small tensor registered), not for
    # a 768-element layer norm
    zo["stage3_model_persistence_threshold"] = 100 * 768 + 384
    bb = _plan(presets, "t5-base", 2, ds)["backbone"]
    assert (bb["persistent_tensors"], bb["persistent_elements"]) == (1, 384)


def test_zero2_keeps_the_backbone_whole(presets):
    p = _plan(presets, "google/flan-t5-xxl", 8, ZERO2, bf16=True)
    bb = p["backbone"]
    assert not bb["partitioned"] and bb["elements_per_rank"] == bb["params"]
    assert bb["persistent_bytes_per_rank"] == 2 * bb["params"]
    assert p["optimizer"]["partitioned"] and p["gradients"]["partitioned"]
    assert p["optimizer"]["elements_per_rank"] == math.ceil(100 * 4096 / 8)


def test_prompt_optimizer_and_gradients_pt_and_dtvg(presets):
    r, d = 100, 2048
    pt = _plan(presets, "google/flan-t5-xl", 8, ZERO3, bf16=True, method="pt")
    assert pt["prompt"]["trainable_elements"] == r * d
    assert pt["prompt"]["bytes_per_rank"] == r * d * 2 + r * d * 4  # bf16 prompt + fp32 P_init
    assert pt["optimizer"]["elements_per_rank"] == r * d // 8
    assert pt["optimizer"]["bytes_per_rank"] == 12 * r * d // 8
    assert pt["gradients"]["bytes_per_rank"] == 4 * r * d // 8
    dt = _plan(presets, "google/flan-t5-xl", 8, ZERO3, bf16=True, method="dtvg", num_sources=6)
    assert dt["prompt"]["trainable_tensors"] == [r * d, r, 6 * r]
    assert dt["prompt"]["frozen_fp32_elements"] == r * d * 7  # P_init + 6 source vectors
    # three parameter groups, each partitioned (and padded) on its own
    assert dt["optimizer"]["elements_per_rank"] == r * d // 8 + math.ceil(r / 8) + 6 * r // 8
    assert dt["backbone"] == pt["backbone"]
    fp32 = _plan(presets, "google/flan-t5-xl", 8, ZERO3, bf16=False)
    assert fp32["backbone"]["partition_bytes_per_rank"] == 2 * pt["backbone"][
        "partition_bytes_per_rank"]
    with pytest.raises(P.PlanError, match="num_sources"):
        _plan(presets, "google/flan-t5-xl", 8, ZERO3, method="dtvg", num_sources=0)


def test_offload_moves_the_partition_to_host(presets):
    on = _plan(presets, "google/flan-t5-xxl", 8, ZERO3, bf16=True)
    off = _plan(presets, "google/flan-t5-xxl", 8, OFFLOAD, bf16=True)
    part = on["backbone"]["partition_bytes_per_rank"]
    assert off["backbone"]["partition_device"] == "cpu"
    assert off["host_bytes_per_rank"] == part
    assert off["accelerator_bytes_per_rank"] == on["accelerator_bytes_per_rank"] - part


def test_ds_bf16_setting_and_quantized_weights_refused(presets):
    ds = json.loads(json.dumps(ZERO3))
    ds["bf16"] = {"enabled": True}
    assert _plan(presets, "t5-base", 2, ds)["bf16"] is True
    assert _plan(presets, "t5-base", 2, ZERO3)["bf16"] is False  # 'auto' follows --bf16
    ds["zero_optimization"]["zero_quantized_nontrainable_weights"] = True
    with pytest.raises(P.PlanError, match="quantized"):
        _plan(presets, "t5-base", 2, ds)


def test_cli_text_and_json(capsys, tiny_model):
    assert P.main(["--model", "google/flan-t5-xl", "--world_size", "8", "--config",
                   str(ROOT / "ds_configs" / "zero3.json"), "--bf16"]) == 0
    text = capsys.readouterr().out
    assert "built-in preset" in text and "backbone partition" in text and "not measured" in text
    assert P.main(["--model", str(tiny_model), "--world_size", "2", "--config",
                   str(ROOT / "ds_configs" / "zero2.json"), "--json", "--method", "dtvg",
                   "--num_sources", "3", "--num_virtual_tokens", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] is False and out["zero_stage"] == 2 and out["d_model"] == 64
    assert out["prompt"]["trainable_tensors"] == [8 * 64, 8, 24]
    assert P.main(["--model", str(tiny_model / "nope"), "--world_size", "2", "--config",
                   str(ROOT / "ds_configs" / "zero3.json")]) == 2
    assert "could not read its config" in capsys.readouterr().err
    # the training command's flag names, and a shipped DeepSpeed config by name
    assert P.main(["--model_name_or_path", "google/flan-t5-xl", "--world_size", "8",
                   "--deepspeed", "zero3", "--bf16"]) == 0
    assert "backbone partition" in capsys.readouterr().out
    assert P.main(["--model_name_or_path", "google/flan-t5-xl", "--world_size", "8",
                   "--deepspeed", "zero9"]) == 2
    assert "a shipped config by name" in capsys.readouterr().err


@pytest.mark.dist
def test_plan_matches_partition_sizes_of_a_real_zero3_run(tiny_model, tmp_path):
    out = tmp_path / "facts.json"
    launch(ROOT / "tests" / "dist_probe.py",
           [str(out), *train_args(tiny_model, tmp_path / "run", max_steps=1,
                                  deepspeed="ds_configs/zero3.json")])
    facts = [json.loads((tmp_path / f"facts.json.rank{r}").read_text()) for r in range(2)]
    cfg, _ = P.load_config(str(tiny_model))
    p = P.plan(cfg, 2, ZERO3, num_virtual_tokens=8)
    bb = p["backbone"]
    for f in facts:
        assert f["backbone_total"] == bb["params"]
        assert f["backbone_local"] == bb["partition_elements_per_rank"]  # ceil(numel/2) each
        assert bb["params"] / 2 <= f["backbone_local"] <= bb["params"] / 2 + bb["tensors"]
        assert f["prompt_local_numel"] == p["prompt"]["trainable_elements"]
