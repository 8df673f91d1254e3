"""MPT: decomposition vs PEFT, the K-task batch sampler, the distillation loss in one process,
and 2-rank ZeRO-3 source training + target adaptation."""

from __future__ import annotations

import pytest
import torch

from dtvg_ds import prompt_math
from dtvg_ds.artifacts import load_artifact, save_artifact
from dtvg_ds.data.batches import k_task_micro_batch
from tests.conftest import ROOT, launch, read_jsonl, train_args

TRAIN = ROOT / "launchers" / "train.py"


def test_decomposition_matches_peft_multitask_prompt_embedding():
    from peft import MultitaskPromptTuningConfig
    from peft.tuners.multitask_prompt_tuning.model import MultitaskPromptEmbedding

    r, d, k = 5, 12, 3
    cfg = MultitaskPromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=r,
                                      token_dim=d, num_tasks=k, num_ranks=1,
                                      num_transformer_submodules=1)
    emb = MultitaskPromptEmbedding(cfg, torch.nn.Embedding(50, d))
    g = torch.Generator().manual_seed(0)
    shared, u, v = torch.randn(r, d, generator=g), torch.randn(k, r, generator=g), \
        torch.randn(k, d, generator=g)
    with torch.no_grad():
        emb.embedding.weight.copy_(shared)
        emb.prefix_task_cols.copy_(u.unsqueeze(-1))   # [k, r, 1]
        emb.prefix_task_rows.copy_(v.unsqueeze(1))    # [k, 1, d]
    task_ids = torch.tensor([2, 0, 1])
    got = emb(torch.arange(r).expand(3, r), task_ids)
    for b, t in enumerate(task_ids.tolist()):
        torch.testing.assert_close(got[b], prompt_math.mpt_prompt(shared, u[t], v[t]))


def test_k_task_batches_are_deterministic_and_split_over_ranks():
    by_task = [list(range(0, 10)), list(range(10, 20)), list(range(20, 30)), list(range(30, 40))]
    for step in range(20):
        parts = [k_task_micro_batch(by_task, 3, step, 6, r, 2, kappa=3) for r in range(2)]
        assert parts[0] == k_task_micro_batch(by_task, 3, step, 6, 0, 2, kappa=3)
        tasks = {i // 10 for p in parts for i in p}
        assert 2 <= len(tasks) <= 3 and all(len(p) == 6 for p in parts)
    ks = {len({i // 10 for r in range(2) for i in k_task_micro_batch(by_task, 1, s, 6, r, 2, 4)})
          for s in range(60)}
    assert ks == {2, 3, 4}  # K ~ U{2..kappa}


def _teachers(model_dir, root, names=("senti_a", "has_color"), noise=0.3):
    from transformers import AutoModelForSeq2SeqLM

    from dtvg_ds.backbone import fingerprint as backbone_fingerprint
    from dtvg_ds.model import init_prompt

    bb = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    p_init, fp = init_prompt(bb, 8, "vocab", 0), backbone_fingerprint(bb.config)
    g = torch.Generator().manual_seed(1)
    out = []
    for n in names:
        save_artifact(root / n, p_init + noise * torch.randn(8, 64, generator=g), p_init, {
            "task": n, "backbone": str(model_dir), "backbone_fingerprint": fp,
            "init_method": "vocab", "init_seed": 0, "steps": 1, "method": "pt",
            "best_metric": {"name": "accuracy", "value": 50.0, "step": 1}})
        out.append(root / n)
    return out


def _source(model_dir, root, **backbone_kw):
    """An MPTSource over two saved teachers on the tiny backbone (`backbone_kw` overrides its
    config, e.g. dropout_rate), wrapped like training does, plus one micro batch and task ids."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from dtvg_ds.config import parse_config
    from dtvg_ds.data import batches
    from dtvg_ds.data.zoo import get_task
    from dtvg_ds.methods.base import Optim
    from dtvg_ds.methods.mpt import MPTSettings, MPTSource
    from dtvg_ds.model import PromptedSeq2Seq

    paths = _teachers(model_dir, root)
    teachers = [load_artifact(p) for p in paths]
    cfg = parse_config(["--method", "mpt_source", "--task", "senti_a+has_color", "--output_dir",
                        "o", "--source_tpvs", *map(str, paths)])
    m = MPTSource(teachers[0].init, teachers, MPTSettings.of(cfg), Optim.of(cfg))
    bb = AutoModelForSeq2SeqLM.from_pretrained(model_dir, **backbone_kw)
    bb.requires_grad_(False)
    model = PromptedSeq2Seq(m, bb)
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = batches.encode(get_task("senti_a").load("train", limit=4), tok, 64, 8)
    b = batches.collate(enc, [0, 1, 2, 3], tok.pad_token_id)
    return m, model, b, torch.tensor([0, 1, 0, 1]), teachers, cfg


def test_distillation_loss_in_one_process(tiny_model, tmp_path):
    from dtvg_ds.methods.base import Optim
    from dtvg_ds.methods.mpt import MPTSettings, MPTSource
    from dtvg_ds.model import PromptedSeq2Seq

    m, model, b, ids, teachers, cfg = _source(tiny_model, tmp_path)
    loss = model(**b, task_ids=ids)
    parts = m.loss_parts()
    assert loss.item() == pytest.approx(parts["loss_plm"] + parts["loss_logits"]
                                        + parts["loss_hidden"], rel=1e-5)
    assert parts["loss_logits"] > 0 and parts["loss_hidden"] > 0
    loss.backward()
    assert m.shared.grad.abs().sum() > 0 and m.u.grad.abs().sum() > 0 and m.v.grad.abs().sum() > 0
    # student == teacher for every task: both distillation terms vanish (a fresh method: the
    # teacher prompts are frozen, their device copy is kept from the first use)
    same = MPTSource(teachers[0].prompt, [teachers[0], teachers[0]], MPTSettings.of(cfg),
                     Optim.of(cfg))
    with torch.no_grad():
        same.u.fill_(1.0)
        same.v.fill_(1.0)
    PromptedSeq2Seq(same, model.backbone)(**b, task_ids=ids)
    assert same.loss_parts()["loss_logits"] == pytest.approx(0, abs=1e-6)
    assert same.loss_parts()["loss_hidden"] == pytest.approx(0, abs=1e-9)


def _flags(module):
    return {n: sub.training for n, sub in module.named_modules()}


def _record_runs(model):
    """Wrap `model.run` (instance attribute): each call's output and the backbone's flags."""
    runs, run = [], model.run

    def recording(*a, **kw):
        flags = _flags(model.backbone)
        out = run(*a, **kw)
        runs.append((out, flags))
        return out

    model.run = recording
    return runs


def test_teacher_pass_has_no_dropout_student_keeps_it(tiny_model, tmp_path):
    m, model, b, ids, _, _ = _source(tiny_model, tmp_path, dropout_rate=0.5)
    model.train()
    teachers, teacher_outputs = [], m.teacher_outputs

    def capture(*a, **kw):
        out = teacher_outputs(*a, **kw)
        teachers.append(out)
        return out

    m.teacher_outputs = capture
    runs = _record_runs(model)
    students = []
    for seed in (0, 1):  # different RNG states: different dropout masks
        torch.manual_seed(seed)
        model(**b, task_ids=ids)
        students.append(runs[-2][0])  # each compute_loss: the student run, then the teacher's
    assert len(teachers) == 2 and len(runs) == 4
    assert teachers[0] is runs[1][0] and teachers[1] is runs[3][0]
    # the student keeps the configured dropout ...
    assert not torch.allclose(students[0].logits, students[1].logits)
    assert all(runs[0][1].values()) and all(runs[2][1].values())
    # ... the teacher runs without it: the same outputs under any RNG state
    torch.testing.assert_close(teachers[0].logits, teachers[1].logits, rtol=0, atol=0)
    torch.testing.assert_close(teachers[0].decoder_hidden_states[-1],
                               teachers[1].decoder_hidden_states[-1], rtol=0, atol=0)
    assert not any(runs[1][1].values()) and not any(runs[3][1].values())
    # ... equal to a plain forward of the teacher prompts with the backbone in eval mode
    model.backbone.eval()
    with torch.no_grad():
        embeds, mask = model.embed(m.teachers[ids], b["input_ids"], b["attention_mask"])
        ref = model.backbone(inputs_embeds=embeds, attention_mask=mask, labels=b["labels"])
    torch.testing.assert_close(teachers[0].logits, ref.logits)


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_compute_loss_restores_every_training_flag(tiny_model, tmp_path, mode):
    _, model, b, ids, _, _ = _source(tiny_model, tmp_path, dropout_rate=0.5)
    model.train(mode != "eval")
    if mode == "mixed":  # per-module flags, not one global mode
        model.backbone.decoder.eval()
        model.backbone.encoder.block[0].layer[0].dropout.eval()
    before = _flags(model)
    assert len(set(before.values())) == (2 if mode == "mixed" else 1)
    model(**b, task_ids=ids)
    assert _flags(model) == before
    # also when the teacher pass (the second run of a compute_loss) raises
    run, calls = model.run, []

    def failing_teacher(*a, **kw):
        calls.append(_flags(model.backbone))
        if len(calls) == 2:
            assert not any(calls[1].values())  # the teacher pass was in eval mode
            raise RuntimeError("teacher pass failed")
        return run(*a, **kw)

    model.run = failing_teacher
    with pytest.raises(RuntimeError, match="teacher pass failed"):
        model(**b, task_ids=ids)
    assert _flags(model) == before


@pytest.mark.dist
def test_mpt_source_then_target_zero3_two_ranks(tiny_model, tmp_path):
    # Real teachers: a stage-1 prompt (12 steps on senti_a), reused as has_color's teacher.
    stage1 = tmp_path / "stage1"
    launch(TRAIN, train_args(tiny_model, stage1, max_steps=12))
    t = load_artifact(stage1)
    paths = []
    for name in ("senti_a", "has_color"):
        paths.append(tmp_path / "teachers" / name)
        save_artifact(paths[-1], t.prompt, t.init, {**t.meta, "task": name})
    src = tmp_path / "mpt_source"
    launch(TRAIN, train_args(tiny_model, src, method="mpt_source", task="senti_a+has_color",
                             source_tpvs=[str(p) for p in paths], max_steps=40,
                             learning_rate=0.1, eval_steps=40))
    recs = [r for r in read_jsonl(src / "metrics.jsonl") if "loss_logits" in r]
    distill = [r["loss_logits"] + r["loss_hidden"] for r in recs]
    assert len(distill) == 40
    assert sum(distill[-5:]) / 5 < 0.7 * sum(distill[:5]) / 5  # the distillation loss falls
    art = load_artifact(src)
    assert art.meta["method"] == "mpt_source"
    assert art.meta["extra"]["mpt_tasks"] == ["senti_a", "has_color"]
    assert art.tensors["u"].shape == (2, 8) and art.tensors["v"].shape == (2, 64)
    tgt = tmp_path / "mpt_target"
    launch(TRAIN, train_args(tiny_model, tgt, method="mpt_target", task="senti_b",
                             mpt_source=str(src), max_steps=3))
    t = load_artifact(tgt)
    x = t.tensors
    torch.testing.assert_close(t.prompt, prompt_math.mpt_prompt(x["shared"], x["u"], x["v"]))
    assert t.meta["extra"]["mpt_source_tasks"] == ["senti_a", "has_color"]
