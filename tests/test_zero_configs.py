"""Every shipped DeepSpeed config is exercised by a short 2-rank run (CPU accelerator).

`zero3.json` and `zero2.json` run in tests/test_train_dist.py; `zero3_offload.json` here, against
a plain ZeRO-3 run of the same job: offloading the backbone partitions to host memory must not
change the numbers. ZeRO++ quantized frozen weights (`zero_quantized_nontrainable_weights`) are
not shipped: DeepSpeed 0.19.8 builds its quantizer op in `zero.Init`, and on the CPU accelerator
that raises "This op had not been implemented on CPU backend." (see docs/scaling.md)."""

from __future__ import annotations

import json

import pytest

from dtvg_ds.artifacts import load_artifact
from tests.conftest import ROOT, launch, read_jsonl, train_args

TRAIN = ROOT / "launchers" / "train.py"
# config -> where its 2-rank run lives
TESTED = {"zero3.json": "tests/test_train_dist.py", "zero2.json": "tests/test_train_dist.py",
          "zero3_offload.json": "tests/test_zero_configs.py",
          "zero2_8bit.json": "tests/test_quant.py"}


def test_every_shipped_config_has_a_run_test():
    shipped = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    assert shipped == sorted(TESTED), "a config without a 2-rank run test"
    for name, test in TESTED.items():
        assert f"ds_configs/{name}" in (ROOT / test).read_text() or name == "zero3.json"


def test_offload_config_shape():
    ds = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
    zo = ds["zero_optimization"]
    assert zo["stage"] == 3 and zo["offload_param"]["device"] == "cpu"
    assert zo["stage3_param_persistence_threshold"] == "auto"  # the prompt stays whole
    assert "offload_optimizer" not in zo  # the prompt's optimizer state is tiny


@pytest.mark.dist
def test_zero3_offload_runs_and_matches_zero3(tiny_model, tmp_path):
    kw = dict(max_steps=3, eval_steps=3, save_steps=3)  # train, evaluate, checkpoint
    ref, off = tmp_path / "z3", tmp_path / "offload"
    launch(TRAIN, train_args(tiny_model, ref, deepspeed="ds_configs/zero3.json", **kw))
    launch(TRAIN, train_args(tiny_model, off, deepspeed="ds_configs/zero3_offload.json", **kw))
    cfg = json.loads((off / "run_config.json").read_text())
    assert cfg["deepspeed"]["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["world_size"] == 2
    lr = [r["loss"] for r in read_jsonl(ref / "metrics.jsonl") if "loss" in r]
    lo = [r["loss"] for r in read_jsonl(off / "metrics.jsonl") if "loss" in r]
    assert len(lo) == 3 and lo == pytest.approx(lr, rel=1e-5)
    assert any("eval_accuracy" in r for r in read_jsonl(off / "metrics.jsonl"))
    assert (off / "checkpoints" / "step-00000003" / "trainer_state.json").is_file()
    import torch

    torch.testing.assert_close(load_artifact(off).prompt, load_artifact(ref).prompt,
                               rtol=1e-5, atol=1e-6)
