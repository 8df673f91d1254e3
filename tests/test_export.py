"""PEFT prompt-tuning export/import: PEFT loads our export and reproduces PromptedSeq2Seq (logits
and greedy generations), PEFT's own adapters import, the round trip is lossless, bad inputs are
refused with one clear line. In process, on the tiny T5 (a few seconds)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dtvg_ds import prompt_math
from dtvg_ds.artifacts import ArtifactError, load_artifact, save_artifact
from dtvg_ds.backbone import fingerprint as backbone_fingerprint
from dtvg_ds.export import (
    PEFT_CONFIG_FILE,
    PEFT_PROMPT_KEY,
    PEFT_WEIGHTS_FILE,
    ExportError,
    export_peft,
    import_peft,
    main,
)
from dtvg_ds.model import FixedPrompt, PromptedSeq2Seq, init_prompt
from tests.conftest import build_tiny_t5

peft = pytest.importorskip("peft")

R = 8


def _backbone(model_dir):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def p_init(tiny_model):
    bb = _backbone(tiny_model)
    return init_prompt(bb, R, "vocab", 0), backbone_fingerprint(bb.config)


def _meta(model_dir, fp, task="t", method="pt", **extra):
    return {"task": task, "method": method, "backbone": str(model_dir), "backbone_fingerprint": fp,
            "init_method": "vocab", "init_seed": 0, "steps": 3,
            "best_metric": {"name": "accuracy", "value": 50.0, "step": 3}, **extra}


@pytest.fixture(scope="module")
def artifact(tiny_model, p_init, tmp_path_factory):
    """A stage-1 artifact whose prompt is far from P_init (so the prompt visibly matters)."""
    init, fp = p_init
    g = torch.Generator().manual_seed(1)
    prompt = init + 0.5 * torch.randn(R, init.shape[1], generator=g)
    return save_artifact(tmp_path_factory.mktemp("art") / "a", prompt, init, _meta(tiny_model, fp))


def _batch():
    # ragged: right padding and a shorter second row exercise the extended attention mask
    ids = torch.tensor([[5, 6, 7, 8, 9, 1], [10, 11, 1, 0, 0, 0], [12, 13, 14, 1, 0, 0]])
    mask = (torch.arange(6)[None] < torch.tensor([[6], [3], [4]])).long()
    labels = torch.tensor([[20, 21, 22, 1], [23, 1, -100, -100], [24, 25, 1, -100]])
    return ids, mask, labels


def _ours(model_dir, prompt):
    return PromptedSeq2Seq(FixedPrompt(prompt), _backbone(model_dir)).eval()


def _peft(model_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(_backbone(model_dir), str(adapter_dir)).eval()


@torch.no_grad()
def _logits_and_generation(model, peft_model):
    ids, mask, labels = _batch()
    ours = model.run(model.prompter(), ids, mask, labels)
    theirs = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    g_ours = model.generate(ids, mask, max_new_tokens=8)
    g_theirs = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                   do_sample=False, num_beams=1)
    return ours, theirs, g_ours, g_theirs


def test_export_reproduces_our_model_under_peft(tiny_model, artifact, tmp_path):
    out = export_peft(artifact, tmp_path / "adapter", model_name_or_path=str(tiny_model))
    cfg = json.loads((out / PEFT_CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "SEQ_2_SEQ_LM"
    assert cfg["num_virtual_tokens"] == R and cfg["token_dim"] == 64
    assert cfg["num_transformer_submodules"] == 1
    art = load_artifact(artifact)
    model, pm = _ours(tiny_model, art.prompt), _peft(tiny_model, out)
    assert type(pm).__name__ == "PeftModelForSeq2SeqLM"
    # PEFT holds exactly our r x d prompt: one submodule, no decoder half
    torch.testing.assert_close(pm.prompt_encoder["default"].embedding.weight, art.prompt,
                               rtol=0, atol=0)
    ours, theirs, g_ours, g_theirs = _logits_and_generation(model, pm)
    # same shape at every decoder position: PEFT prefixed nothing to the decoder
    assert theirs.logits.shape == ours.logits.shape == (3, 4, model.backbone.config.vocab_size)
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.loss, ours.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(g_ours, g_theirs)
    # ... and the prompt is really applied: P_init alone gives other logits
    with torch.no_grad():
        other = model.run(art.init, *_batch()).logits
    assert (other - ours.logits).abs().max() > 1e-2


def test_peft_default_two_submodules_adapter_imports_to_the_prompt_peft_applies(
        tiny_model, p_init, tmp_path):
    """An adapter PEFT itself trained/saved (default num_transformer_submodules=2 for seq2seq:
    2r rows) imports as rows [:r], and our model with it equals PEFT's model with it."""
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(3)
    pm = get_peft_model(_backbone(tiny_model),
                        PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=R))
    assert pm.peft_config["default"].num_transformer_submodules == 2
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    pm.save_pretrained(str(tmp_path / "native"))
    assert not (tmp_path / "native" / "adapter_model.bin").exists()
    out = import_peft(tmp_path / "native", tmp_path / "imported", str(tiny_model), task="native")
    art = load_artifact(out)
    full = pm.prompt_encoder["default"].embedding.weight.detach()
    assert full.shape == (2 * R, 64)
    torch.testing.assert_close(art.prompt, full[:R], rtol=0, atol=0)
    init, fp = p_init
    assert torch.equal(art.init, init) and art.meta["backbone_fingerprint"] == fp
    assert art.meta["task"] == "native" and art.meta["extra"]["origin"] == "peft_import"
    ours, theirs, g_ours, g_theirs = _logits_and_generation(
        _ours(tiny_model, art.prompt), _peft(tiny_model, tmp_path / "native"))
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(g_ours, g_theirs)


def test_round_trip_export_import_is_lossless(tiny_model, artifact, tmp_path):
    src = load_artifact(artifact)
    adapter = export_peft(artifact, tmp_path / "adapter")  # backbone taken from the artifact
    # P_init recomputed from the backbone with the training defaults (vocab, seed 0)
    back = load_artifact(import_peft(adapter, tmp_path / "back", str(tiny_model), task="t"))
    for k in ("prompt", "init", "task_vector"):
        assert torch.equal(back.tensors[k], src.tensors[k]), k
    assert back.meta["init_fingerprint"] == src.meta["init_fingerprint"]
    assert back.meta["best_metric"] == {"name": "imported", "value": None, "step": 0}
    # --init_from: P_init and its settings copied from a family member
    via = load_artifact(import_peft(adapter, tmp_path / "via", str(tiny_model),
                                    init_from=artifact))
    assert torch.equal(via.init, src.init) and via.meta["extra"]["init_from"] == str(artifact)
    assert via.meta["task"] == "adapter"  # default: the adapter dir's name
    # a different init seed gives another P_init (and so another task vector), same prompt
    other = load_artifact(import_peft(adapter, tmp_path / "seed1", str(tiny_model),
                                      prompt_init_seed=1))
    assert torch.equal(other.prompt, src.prompt) and not torch.equal(other.init, src.init)


def test_mpt_source_exports_the_chosen_tasks_student_prompt(tiny_model, p_init, tmp_path):
    init, fp = p_init
    g = torch.Generator().manual_seed(2)
    u, v = 1 + 0.1 * torch.randn(2, R, generator=g), 1 + 0.1 * torch.randn(2, 64, generator=g)
    src = save_artifact(tmp_path / "mpt", init + 0.1, init,
                        _meta(tiny_model, fp, "a+b", "mpt_source", extra={"mpt_tasks": ["a", "b"]}),
                        {"u": u, "v": v})
    with pytest.raises(ExportError, match="--mpt_task"):
        export_peft(src, tmp_path / "x")
    with pytest.raises(ExportError, match="not a task"):
        export_peft(src, tmp_path / "x", mpt_task="zz")
    out = export_peft(src, tmp_path / "b", mpt_task="b")
    from safetensors.torch import load_file

    got = load_file(str(out / PEFT_WEIGHTS_FILE))[PEFT_PROMPT_KEY]
    torch.testing.assert_close(got, prompt_math.mpt_prompt(init + 0.1, u[1], v[1]), rtol=0, atol=0)


def test_bad_requests_are_refused(tiny_model, artifact, tmp_path, capsys):
    # another architecture: fingerprint mismatch, named
    other = build_tiny_t5(tmp_path / "other", d_model=32)
    with pytest.raises(ArtifactError, match="pass the --model_name_or_path it was trained on"):
        export_peft(artifact, tmp_path / "o", model_name_or_path=str(other))
    # a non-empty output dir needs --overwrite
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(ExportError, match="--overwrite"):
        export_peft(artifact, tmp_path / "busy")
    export_peft(artifact, tmp_path / "busy", overwrite=True)
    # --mpt_task on a non-MPT artifact
    with pytest.raises(ExportError, match="MPT source artifacts only"):
        export_peft(artifact, tmp_path / "m", mpt_task="a")
    # a pickle-only adapter is refused, never loaded
    adapter = export_peft(artifact, tmp_path / "ad")
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / PEFT_WEIGHTS_FILE).unlink()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04 not even read")
    with pytest.raises(ExportError, match="never loads"):
        import_peft(pickled, tmp_path / "i1", str(tiny_model))
    # another PEFT method
    lora = tmp_path / "lora"
    shutil.copytree(adapter, lora)
    cfg = json.loads((lora / PEFT_CONFIG_FILE).read_text())
    (lora / PEFT_CONFIG_FILE).write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(ExportError, match="only PROMPT_TUNING"):
        import_peft(lora, tmp_path / "i2", str(tiny_model))
    # shape that contradicts the config
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    (bad / PEFT_CONFIG_FILE).write_text(json.dumps({**cfg, "num_virtual_tokens": R + 1}))
    with pytest.raises(ExportError, match="do not belong together"):
        import_peft(bad, tmp_path / "i3", str(tiny_model))
    # the adapter on a backbone of another width
    with pytest.raises(ExportError, match="prompt width 64 != d_model 32"):
        import_peft(adapter, tmp_path / "i4", str(other))
    # CLI: one error line, exit 2, nothing written
    capsys.readouterr()
    assert main(["from-peft", str(lora), str(tmp_path / "cli"), "--model_name_or_path",
                 str(tiny_model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "cli").exists()


def test_cli_round_trip(tiny_model, artifact, tmp_path, capsys):
    assert main(["to-peft", str(artifact), str(tmp_path / "ad"), "--model_name_or_path",
                 str(tiny_model)]) == 0
    assert main(["from-peft", str(tmp_path / "ad"), str(tmp_path / "art"), "--task", "t",
                 "--init_from", str(artifact)]) == 0
    assert torch.equal(load_artifact(tmp_path / "art").prompt, load_artifact(artifact).prompt)
    assert "written to" in capsys.readouterr().out
