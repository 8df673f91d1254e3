"""`python -m dtvg_ds.predict`: file in, file out, batched, in input order, equal to the model's
own generate(); raw fields formatted by a task's template; one-line errors for bad input; the
output written atomically and never overwritten by accident. In process, on the tiny T5."""

from __future__ import annotations

import json

import pytest
import torch

from dtvg_ds.artifacts import save_artifact
from dtvg_ds.backbone import fingerprint as backbone_fingerprint
from dtvg_ds.data.batches import collate, encode
from dtvg_ds.model import init_prompt
from dtvg_ds.predict import build_model, main
from tests.conftest import build_tiny_t5, read_jsonl

SOURCES = ["sentence : good day", "sentence : a very long and rather gloomy walk home today",
           "sentence : red", "sentence : one two three four five", "sentence : nice"]


@pytest.fixture(scope="module")
def artifact(tiny_model, tmp_path_factory):
    from transformers import AutoModelForSeq2SeqLM

    bb = AutoModelForSeq2SeqLM.from_pretrained(tiny_model)
    init = init_prompt(bb, 8, "vocab", 0)
    prompt = init + 0.5 * torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    return save_artifact(tmp_path_factory.mktemp("art") / "a", prompt, init, {
        "task": "senti_a", "method": "pt", "backbone": str(tiny_model),
        "backbone_fingerprint": backbone_fingerprint(bb.config), "init_method": "vocab",
        "init_seed": 0, "steps": 1, "best_metric": {"name": "accuracy", "value": 1.0, "step": 1}})


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(artifact, inp, out, *extra):
    return main(["--artifact", str(artifact), "--input", str(inp), "--output", str(out),
                 "--quiet", *extra])


def test_predictions_in_input_order_equal_to_the_model(tiny_model, artifact, tmp_path):
    rows = [{"id": i, "source": s} for i, s in enumerate(SOURCES)]
    inp = _jsonl(tmp_path / "in.jsonl", rows)
    # batch 2 over length-sorted inputs; the artifact's backbone is found from tpv.json
    assert _run(artifact, inp, tmp_path / "out.jsonl", "--batch_size", "2",
                "--max_new_tokens", "5") == 0
    got = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in got] == list(range(len(SOURCES)))
    assert [r["source"] for r in got] == SOURCES
    # reference: the model's generate() one example at a time, decoded like evaluation decodes
    from dtvg_ds.artifacts import load_artifact

    model, tok = build_model(load_artifact(artifact), str(tiny_model))
    enc = encode([{"source": s, "target": ""} for s in SOURCES], tok, 256, 16)
    for i, r in enumerate(got):
        b = collate(enc, [i], tok.pad_token_id)
        ids = model.generate(b["input_ids"], b["attention_mask"], max_new_tokens=5)
        assert r["prediction"] == tok.batch_decode(ids, skip_special_tokens=True)[0]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_task_formats_raw_fields(artifact, tmp_path):
    inp = _jsonl(tmp_path / "raw.jsonl", [{"sentence": "good day", "label": 1},
                                          {"sentence": "gloomy"},  # no label: fine
                                          {"source": "sentence : red"}])  # given as is
    assert _run(artifact, inp, tmp_path / "o.jsonl", "--task", "sst2") == 0
    got = read_jsonl(tmp_path / "o.jsonl")
    assert [r["source"] for r in got] == ["sst2 sentence: good day", "sst2 sentence: gloomy",
                                         "sentence : red"]
    assert got[0]["label"] == 1 and all(isinstance(r["prediction"], str) for r in got)


@pytest.mark.parametrize("rows_or_text, flags, message", [
    ('{"source": "a"}\n{"source": "b"}\n{"source": \n', [], "line 3: not valid JSON"),
    ('{"source": "a"}\n[1, 2]\n', [], "line 2: expected a JSON object"),
    ('{"source": 5}\n', [], "line 1: 'source' must be a string"),
    ('{"text": "a"}\n', [], "line 1: no 'source' field; give one, or pass --task"),
    ('{"text": "a", "label": 0}\n', ["--task", "sst2"], "needs field(s) ['sentence']"),
    ('{"text": "a"}\n', ["--task", "senti_a"], "has no template for raw fields"),
    ('{"sentence": "a"}\n', ["--task", "no_such_task"], "unknown task 'no_such_task'"),
    ("\n\n", [], "no input lines"),
])
def test_bad_input_is_one_line_naming_it(artifact, tmp_path, capsys, rows_or_text, flags, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text(rows_or_text)
    assert _run(artifact, inp, tmp_path / "out.jsonl", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_files_and_backbone_errors(artifact, tmp_path, capsys):
    assert _run(artifact, tmp_path / "missing.jsonl", tmp_path / "o.jsonl") == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    inp = _jsonl(tmp_path / "in.jsonl", [{"source": "sentence : good"}])
    out = tmp_path / "o.jsonl"
    out.write_text("keep me\n")
    assert _run(artifact, inp, out) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"
    assert _run(artifact, inp, out, "--overwrite") == 0
    assert read_jsonl(out)[0]["source"] == "sentence : good"
    assert _run(tmp_path / "no_artifact", inp, tmp_path / "o2.jsonl") == 2
    assert "no such artifact directory" in capsys.readouterr().err
    other = build_tiny_t5(tmp_path / "other", d_model=32)
    capsys.readouterr()
    assert _run(artifact, inp, tmp_path / "o3.jsonl", "--model_name_or_path", str(other)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass the --model_name_or_path it was trained on" in err
    assert not (tmp_path / "o3.jsonl").exists()
