"""Real 2-rank DeepSpeed ZeRO-3 runs on the CPU accelerator: partitioning, the replicated
prompt, and the first-step gradient against a plain single-process PyTorch reference."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, assert_first_step_matches, launch, train_args

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def probe(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    out = tmp / "facts.json"
    args = train_args(tiny_model, tmp / "run", max_steps=3,
                      deepspeed="ds_configs/zero3.json")
    launch(ROOT / "tests" / "dist_probe.py", [str(out), *args])
    return [json.loads((tmp / f"facts.json.rank{r}").read_text()) for r in range(2)]


def test_backbone_is_partitioned_about_half_per_rank_and_frozen(probe):
    for f in probe:
        assert f["world"] == 2
        assert f["backbone_trainable"] == 0
        frac = f["backbone_local"] / f["backbone_total"]
        assert 0.45 <= frac <= 0.55, frac
    assert probe[0]["backbone_total"] == probe[1]["backbone_total"]


def test_prompt_is_whole_and_identical_on_every_rank(probe):
    for f in probe:
        assert f["prompt_persist"] is True
        assert f["prompt_local_numel"] == 8 * 64  # r x d, not a 1/N partition
    assert probe[0]["prompt_final"] == probe[1]["prompt_final"]  # bitwise after 3 steps
    assert probe[0]["fingerprint"] == probe[1]["fingerprint"]


def test_first_step_gradient_matches_single_process_reference(probe, tiny_model):
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    backbone = AutoModelForSeq2SeqLM.from_pretrained(tiny_model, dtype=torch.float32)
    backbone.requires_grad_(False)
    assert_first_step_matches(backbone, tiny_model, probe)


def test_no_shared_memory_segment_is_left_behind(tiny_model, tmp_path):
    """DeepSpeed's CPU all-reduce creates a ~64 MB /dev/shm segment per rank and never removes
    it; dist.init unlinks each rank's once all ranks have mapped them."""
    from pathlib import Path

    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    launch(ROOT / "launchers" / "train.py", train_args(tiny_model, tmp_path / "run", max_steps=2))
    assert set(shm.glob("deepspeed_allreduce_buffer_*")) - before == set()
