"""ATTEMPT: the attention math on hand-made tensors, the prompt module on the tiny backbone
(distributions, gradients, pooling, multi-task), flag errors, and real DeepSpeed runs: 2 ranks
under ZeRO-3 equal 1 rank, with the artifact and the per-example attention logs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from dtvg_ds import prompt_math
from dtvg_ds.artifacts import load_artifact
from dtvg_ds.config import ConfigError, parse_config
from dtvg_ds.methods import validate as validate_method
from tests.conftest import ROOT, ds_env, launch, make_tpvs, read_jsonl, train_args

TRAIN = ROOT / "launchers" / "train.py"
SOURCES = ("src_a", "src_b", "src_c", "src_d")


@pytest.fixture(scope="module")
def tpvs(tiny_model, tmp_path_factory):
    return make_tpvs(tiny_model, tmp_path_factory.mktemp("tpvs"))


# -- pure math -------------------------------------------------------------------------------

def test_max_pool_masks_padding_and_joins_extra():
    x = torch.tensor([[[1.0, -5.0], [3.0, -1.0], [9.0, 9.0]]])  # B=1, L=3, d=2
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(prompt_math.max_pool_tokens(x), torch.tensor([[9.0, 9.0]]))
    torch.testing.assert_close(prompt_math.max_pool_tokens(x, mask), torch.tensor([[3.0, -1.0]]))
    extra = torch.tensor([[0.0, 0.0]])
    torch.testing.assert_close(prompt_math.max_pool_tokens(x, mask, extra),
                               torch.tensor([[3.0, 0.0]]))
    with pytest.raises(ValueError, match="mask shape"):
        prompt_math.max_pool_tokens(x, mask[:, :2])


def test_attention_weights_and_mixture_by_hand():
    g = torch.Generator().manual_seed(0)
    b, n, r, d, m = 3, 4, 5, 6, 7
    pooled = torch.randn(b, d, generator=g)
    w_down, w_up = torch.randn(m, d, generator=g), torch.randn(d, m, generator=g)
    h = prompt_math.attempt_query(pooled, w_down, w_up)
    pre = torch.nn.functional.silu(pooled @ w_down.T) @ w_up.T
    ref = (pre - pre.mean(1, keepdim=True)) / torch.sqrt(pre.var(1, unbiased=False, keepdim=True)
                                                         + 1e-5)
    torch.testing.assert_close(h, ref)
    keys = torch.randn(b, n + 1, d, generator=g)
    a = prompt_math.attempt_weights(h, keys, 2.5)
    assert a.shape == (b, n + 1)
    for i in range(b):
        s = torch.tensor([float(keys[i, j] @ h[i]) / 2.5 for j in range(n + 1)])
        torch.testing.assert_close(a[i], torch.softmax(s, 0))
    sources, target = torch.randn(n, r, d, generator=g), torch.randn(b, r, d, generator=g)
    mix = prompt_math.attempt_mixture(target, sources, a)
    for i in range(b):
        want = target[i] + sum(a[i, j] * sources[j] for j in range(n)) + a[i, n] * target[i]
        torch.testing.assert_close(mix[i], want)
    with pytest.raises(ValueError, match="temperature"):
        prompt_math.attempt_weights(h, keys, 0.0)
    with pytest.raises(ValueError, match="n sources"):
        prompt_math.attempt_mixture(target, sources, a[:, :n])


# -- the module on the tiny backbone ---------------------------------------------------------

def _module(model_dir, tpvs, **flags):
    """(Attempt over the 4 constructed sources, wrapped like training, tokenizer, a batch)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from dtvg_ds.data import batches
    from dtvg_ds.data.zoo import get_task
    from dtvg_ds.methods import build_method, load_inputs
    from dtvg_ds.model import PromptedSeq2Seq
    from tests.conftest import p_init_of

    paths, _ = tpvs
    argv = ["--method", "attempt", "--task", flags.pop("task", "senti_a"), "--output_dir", "o",
            "--source_tpvs", *(str(paths[s]) for s in SOURCES), "--attempt_temperature", "0"]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    cfg = parse_config(argv, checks=[validate_method])
    p_init, fp = p_init_of(model_dir)
    meta = {"backbone": str(model_dir), "backbone_fingerprint": fp,
            "init_fingerprint": load_artifact(paths["src_a"]).meta["init_fingerprint"]}
    method = build_method(cfg, p_init, meta, load_inputs(cfg))
    bb = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    bb.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = batches.encode(get_task("senti_a").load("train", limit=6), tok, cfg.max_source_length, 8)
    return method, PromptedSeq2Seq(method, bb), tok, enc


def _batch(enc, tok, idx):
    from dtvg_ds.data import batches

    return batches.collate(enc, idx, tok.pad_token_id)


def test_weights_are_a_distribution_per_example(tiny_model, tpvs):
    method, model, tok, enc = _module(tiny_model, tpvs)
    b = _batch(enc, tok, list(range(6)))
    prompt, _ = model.prompt_for(b["input_ids"], b["attention_mask"])
    assert prompt.shape == (6, 8, 64)
    logs = method.example_log()
    assert len(logs) == 6
    w = torch.tensor([list(x["attention"].values()) for x in logs])
    assert list(logs[0]["attention"]) == [*SOURCES, "target"]
    assert w.shape == (6, 5) and (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(6))
    # released default: the target starts as the first source's full prompt (P_init + T_a)
    torch.testing.assert_close(method.targets[0], load_artifact(tpvs[0]["src_a"]).prompt)
    assert method.cfg.temperature == pytest.approx(64 * math.e)  # --attempt_temperature 0


def test_gradients_reach_target_and_projections_only(tiny_model, tpvs):
    method, model, tok, enc = _module(tiny_model, tpvs)
    loss = model(**_batch(enc, tok, [0, 1, 2, 3]))
    loss.backward()
    assert method.targets.grad.abs().sum() > 0
    assert method.w_down.grad.abs().sum() > 0 and method.w_up.grad.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompter.targets", "prompter.w_down", "prompter.w_up"}
    # the LayerNorm has no parameters (weight 1 / bias 0, frozen); sources are plain tensors
    assert not method.sources.requires_grad and method.sources.grad is None
    assert all(p.grad is None for p in model.backbone.parameters())
    groups = {g["name"]: g for g in method.param_groups()}
    assert groups["attention"]["lr"] == groups["target_prompt"]["lr"] == 0.3  # released: one lr


def test_prompt_of_an_example_does_not_depend_on_its_batch(tiny_model, tpvs):
    for pool in ("released", "masked"):
        _, model, tok, enc = _module(tiny_model, tpvs, attempt_pool=pool)
        lens = [int(x) for x in _batch(enc, tok, list(range(6)))["attention_mask"].sum(1)]
        short = lens.index(min(lens))
        alone = _batch(enc, tok, [short])
        together = _batch(enc, tok, list(range(6)))
        assert together["input_ids"].shape[1] > alone["input_ids"].shape[1]  # padded here
        p1, _ = model.prompt_for(alone["input_ids"], alone["attention_mask"])
        p6, _ = model.prompt_for(together["input_ids"], together["attention_mask"])
        torch.testing.assert_close(p1[0], p6[short])


def test_released_pool_equals_unmasked_pool_at_max_source_length(tiny_model, tpvs):
    """The released code pads every input to max_source_length and pools without a mask."""
    method, model, tok, enc = _module(tiny_model, tpvs, max_source_length=40)
    b = _batch(enc, tok, list(range(6)))
    ids = b["input_ids"]
    assert ids.shape[1] < 40
    padded = torch.cat([ids, ids.new_full((6, 40 - ids.shape[1]), tok.pad_token_id)], 1)
    emb = model.backbone.get_input_embeddings()
    want = prompt_math.max_pool_tokens(emb(padded))
    from dtvg_ds.model import PromptInputs

    got = method._pooled_input(PromptInputs(ids, b["attention_mask"], emb(ids), emb,
                                            tok.pad_token_id))
    torch.testing.assert_close(got, want)
    masked, _, _, _ = _module(tiny_model, tpvs, max_source_length=40, attempt_pool="masked")
    got_m = masked._pooled_input(PromptInputs(ids, b["attention_mask"], emb(ids), emb,
                                              tok.pad_token_id))
    assert not torch.equal(got_m, want)  # the pad embedding changes the pool


def test_aligned_source_gets_most_attention(tiny_model, tpvs):
    """Construct the case: source src_c's max-pooled key is the batch's query direction (all
    its rows equal to it, scaled); it must win each example's softmax."""
    method, model, tok, enc = _module(tiny_model, tpvs, attempt_temperature=1)
    b = _batch(enc, tok, list(range(6)))
    model.prompt_for(b["input_ids"], b["attention_mask"])
    emb = model.backbone.get_input_embeddings()
    from dtvg_ds.model import PromptInputs

    with torch.no_grad():
        h = prompt_math.attempt_query(method._pooled_input(PromptInputs(
            b["input_ids"], b["attention_mask"], emb(b["input_ids"]), emb, tok.pad_token_id)),
            method.w_down, method.w_up)
        method.sources[2] = 3.0 * h.mean(0)
        method.pooled_sources = prompt_math.max_pool_tokens(method.sources)
        method._resident.clear()
    model.prompt_for(b["input_ids"], b["attention_mask"])
    for row in method.example_log():
        assert max(row["attention"], key=row["attention"].get) == "src_c"
        assert row["attention"]["src_c"] > 0.9


def test_multi_task_targets_by_task_id(tiny_model, tpvs):
    method, model, tok, enc = _module(tiny_model, tpvs, task="senti_a+has_color",
                                      attempt_target_init="p_init")
    assert method.tasks == ["senti_a", "has_color"] and method.targets.shape == (2, 8, 64)
    with torch.no_grad():
        method.targets[1] += 1.0
    ex_tasks = ["senti_a", "has_color", "senti_a", "has_color"]
    extra = method.batch_extras([0, 1, 2, 3], ex_tasks)
    assert extra["task_ids"].tolist() == [0, 1, 0, 1]
    b = _batch(enc, tok, [0, 0, 0, 0])  # the same input four times
    p, _ = model.prompt_for(b["input_ids"], b["attention_mask"], **extra)
    torch.testing.assert_close(p[0], p[2])
    assert not torch.allclose(p[0], p[1])
    model(**b, **extra).backward()
    assert method.targets.grad[0].abs().sum() > 0 and method.targets.grad[1].abs().sum() > 0


def test_artifact_round_trip_rebuilds_the_same_prompts(tiny_model, tpvs, tmp_path):
    from dtvg_ds.artifacts import save_artifact
    from dtvg_ds.export import ExportError, artifact_prompt, artifact_prompter

    method, model, tok, enc = _module(tiny_model, tpvs, task="senti_a+has_color")
    with torch.no_grad():  # a trained state: everything away from its init
        method.targets.add_(0.1 * torch.randn_like(method.targets))
        method.w_down.mul_(50.0)
        method.w_up.mul_(-20.0)
    src = load_artifact(tpvs[0]["src_a"])
    save_artifact(tmp_path / "a", method.export_prompt(), method.p_init,
                  {**src.meta, "task": "senti_a+has_color", "method": "attempt",
                   "extra": method.artifact_meta()}, method.extra_tensors())
    art = load_artifact(tmp_path / "a")
    rebuilt = artifact_prompter(art)
    assert not any(p.requires_grad for p in rebuilt.parameters())
    ex_tasks = ["senti_a", "has_color", "has_color"]
    b = _batch(enc, tok, [0, 1, 2])
    extra = method.batch_extras([0, 1, 2], ex_tasks)
    want, _ = model.prompt_for(b["input_ids"], b["attention_mask"], **extra)
    from dtvg_ds.model import PromptedSeq2Seq

    got, _ = PromptedSeq2Seq(rebuilt, model.backbone).prompt_for(
        b["input_ids"], b["attention_mask"], **rebuilt.batch_extras([0, 1, 2], ex_tasks))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ExportError, match="cannot be exported as one static prompt"):
        artifact_prompt(art)
    from dtvg_ds.artifacts import ArtifactError

    with pytest.raises(ArtifactError, match="'senti_b' has no target prompt"):
        rebuilt.batch_extras([0], ["senti_b"])


def test_plan_counts_attempt_parameters():
    from dtvg_ds.plan import prompt_tensors

    groups, frozen = prompt_tensors("attempt", 100, 768, 6)  # t5-base, r = 100, 6 sources
    assert sum(sum(g) for g in groups) == 230_400  # the paper's "232K" trainable parameters
    assert max(max(g) for g in groups) == 76_800  # what ZeRO-3's persistence threshold must hold
    assert frozen == 100 * 768 + 6 * (100 * 768 + 768)


def test_bad_flags_one_line_each(tpvs):
    paths, _ = tpvs
    base = ["--method", "attempt", "--task", "senti_a", "--output_dir", "o"]
    cases = [
        ([], "--method attempt needs --source_tpvs"),
        (["--source_tpvs", str(paths["src_a"]), "--attempt_pool", "mean"],
         "--attempt_pool 'mean': choose released or masked"),
        (["--source_tpvs", str(paths["src_a"]), "--attempt_target_init", "target_tpv"],
         "--attempt_target_init target_tpv needs --target_tpv"),
        (["--source_tpvs", str(paths["src_a"]), "--attempt_temperature", "-1"],
         "--attempt_temperature must be > 0"),
        (["--source_tpvs", str(paths["src_a"]), "--attempt_attn_learning_rate", "-0.1"],
         "--attempt_attn_learning_rate must be >= 0"),
    ]
    for extra, needle in cases:
        with pytest.raises(ConfigError) as e:
            parse_config(base + extra, checks=[validate_method])
        assert len(e.value.problems) == 1 and needle in e.value.problems[0], e.value.problems
        assert "\n" not in e.value.problems[0]
    cfg = parse_config(base + ["--source_tpvs", str(paths["src_a"]),
                               "--attempt_attn_learning_rate", "0.1"], checks=[validate_method])
    assert cfg.attempt_attn_learning_rate == 0.1


# -- real DeepSpeed runs ---------------------------------------------------------------------

def _attempt_args(model, out, paths, per_device, **kw):
    return train_args(model, out, method="attempt", source_tpvs=[str(paths[s]) for s in SOURCES],
                      attempt_temperature=0, max_steps=4, per_device_train_batch_size=per_device,
                      learning_rate=0.3, max_eval_samples=12, **kw)


@pytest.fixture(scope="module")
def runs(tiny_model, tpvs, tmp_path_factory):
    root = tmp_path_factory.mktemp("attempt_runs")
    for n in (1, 2):  # the 2-rank run also scores the test split with the exported artifact
        test = {"do_test": "true", "max_test_samples": 10} if n == 2 else {}
        launch(TRAIN, _attempt_args(tiny_model, root / f"r{n}", tpvs[0], 8 // n, **test),
               nproc=n)
    return root / "r1", root / "r2"


def _losses(out):
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.dist
def test_zero3_two_ranks_equal_one_rank(runs):
    one, two = runs
    assert len(_losses(one)) == 4
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    a, b = load_artifact(one), load_artifact(two)
    # Adam at lr 0.3 divides each gradient by its own running norm, so entries whose gradient
    # is ~0 turn all-reduce rounding (1 vs 2 ranks sum in another order) into steps of up to
    # ~1e-4; the weights move by up to 4 x 0.3 in these 4 steps.
    for key in ("attempt_targets", "attn_w_down", "attn_w_up", "prompt"):
        torch.testing.assert_close(b.tensors[key], a.tensors[key], rtol=1e-3, atol=5e-4)
    # the attention module trained: it moved from its seeded init (--seed 42, the default)
    g = torch.Generator().manual_seed(42)
    w0 = 0.01 * torch.randn(100, 64, generator=g)
    assert (a.tensors["attn_w_down"] - w0).abs().max() > 1e-4


@pytest.mark.dist
def test_cli_run_writes_artifact_and_attention_logs(runs, tpvs, tmp_path):
    _, out = runs
    art = load_artifact(out)
    assert art.meta["method"] == "attempt"
    extra = art.meta["extra"]
    assert extra["sources"] == list(SOURCES) and extra["attempt_tasks"] == ["senti_a"]
    assert extra["attempt_pool"] == "released" and extra["attempt_target_init"] == "first_source"
    t = art.tensors
    assert t["attempt_targets"].shape == (1, 8, 64) and t["attn_w_down"].shape == (100, 64)
    assert t["attn_w_up"].shape == (64, 100)
    torch.testing.assert_close(t["prompt"], t["attempt_targets"][0])
    want = torch.stack([load_artifact(tpvs[0][s]).prompt for s in SOURCES])
    torch.testing.assert_close(t["attempt_sources"], want, rtol=0, atol=0)
    assert not (out / "adapter").exists()  # a PEFT adapter cannot hold an instance prompt
    # per-example attention at evaluation: every validation example, a distribution
    evals = read_jsonl(out / "eval_examples.jsonl")
    assert [e["step"] for e in evals] == [4]
    rows = evals[0]["examples"]
    assert [r["example"] for r in rows] == list(range(12))
    for r in rows:
        assert list(r["attention"]) == [*SOURCES, "target"]
        assert sum(r["attention"].values()) == pytest.approx(1, abs=1e-5)
    m = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_score" in r][-1]
    mean_a = sum(r["attention"]["src_a"] for r in rows) / 12
    assert m["eval_attention_mean/src_a"] == pytest.approx(mean_a, rel=1e-6)
    # the report draws their distribution
    from dtvg_ds.report import write_report

    written = write_report(out, tmp_path / "report")
    assert tmp_path / "report" / "attempt_attention.png" in written
    # --do_test scored the exported artifact with its per-input prompts
    test_rows = read_jsonl(out / "eval" / "senti_a-test.predictions.jsonl")
    assert len(test_rows) == 10 and all(list(r["attention"]) == [*SOURCES, "target"]
                                        for r in test_rows)
    # the evaluation CLI rebuilds the module from the artifact: on the same 12 validation
    # examples it reproduces training's last evaluation, score and attention weights
    p = _tool("dtvg_ds.evaluation", "--artifact", str(out), "--split", "validation",
              "--max_eval_samples", "12", "--output_dir", str(tmp_path / "ev"))
    assert p.returncode == 0, p.stderr[-3000:]
    scored = json.loads((tmp_path / "ev" / "senti_a-validation.json").read_text())
    assert scored["score"] == m["eval_score"]
    cli_rows = read_jsonl(tmp_path / "ev" / "senti_a-validation.predictions.jsonl")
    for got, want in zip(cli_rows, rows, strict=True):
        assert got["attention"] == pytest.approx(want["attention"], abs=1e-6)
    # predict (one process, inputs sorted by length into its own batches) gives the same
    # predictions: the instance prompts do not depend on batching
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"source": r["source"]}) + "\n" for r in cli_rows))
    p = _tool("dtvg_ds.predict", "--artifact", str(out), "--input", str(inp), "--output",
              str(tmp_path / "pred.jsonl"), "--batch_size", "5", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["prediction"] for r in read_jsonl(tmp_path / "pred.jsonl")] == \
        [r["prediction"] for r in cli_rows]
    # a PEFT adapter holds one static prompt: export refuses in one line
    p = _tool("dtvg_ds.export", "to-peft", str(out), str(tmp_path / "peft"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.count("error: ") == 1 and "ATTEMPT artifact" in p.stderr


def _tool(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ds_env(),
                          capture_output=True, text=True, timeout=300)
