"""Real 2-rank DeepSpeed ZeRO-3 runs on the CPU accelerator: partitioning, the replicated
prompt, and the first-step gradient against a plain single-process PyTorch reference."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, launch, train_args

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
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from dtvg_ds.data import batches
    from dtvg_ds.data.tasks import get_task
    from dtvg_ds.methods.pt import PromptTuning
    from dtvg_ds.model import PromptedSeq2Seq, init_prompt

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    backbone = AutoModelForSeq2SeqLM.from_pretrained(tiny_model, dtype=torch.float32)
    backbone.requires_grad_(False)
    model = PromptedSeq2Seq(PromptTuning(init_prompt(backbone, 8, "vocab", 0)), backbone)
    enc = batches.encode(get_task("senti_a").load("train", limit=256), tok, 256, 16)
    # DeepSpeed averages the per-rank mean losses' gradients: reproduce exactly that.
    losses = [model(**batches.collate(enc, f["indices0"], tok.pad_token_id)) for f in probe]
    for f, loss in zip(probe, losses, strict=True):
        assert f["loss0"] == pytest.approx(float(loss.detach()), abs=1e-5)
    (sum(losses) / len(losses)).backward()
    ref = model.prompter.prompt.grad
    for f in probe:
        got = torch.tensor(f["grad0"])
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert ref.abs().sum() > 0
