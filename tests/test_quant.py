"""8-bit and 4-bit (bitsandbytes) backbones: flags, supported ZeRO combinations, and real
2-rank DeepSpeed runs whose loss equals a single-process run of the same quantized model while
the quantized weights never change. bitsandbytes 0.50 runs int8 and 4-bit on CPU (slowly)."""

from __future__ import annotations

import json

import pytest
import torch

from dtvg_ds import plan as P
from dtvg_ds import quant
from dtvg_ds.config import ConfigError, parse_config, resolve_ds_config
from tests.conftest import ROOT, assert_first_step_matches, launch, read_jsonl, train_args

ZERO2_8BIT = str(ROOT / "ds_configs/zero2_8bit.json")
ZERO3 = str(ROOT / "ds_configs" / "zero3.json")


def _cfg(*flags: str):
    return parse_config(["--task", "senti_a", "--output_dir", "/tmp/x", *flags])


def _problems(*flags: str) -> str:
    with pytest.raises(ConfigError) as e:
        _cfg(*flags)
    return str(e.value)


def _resolve(path: str, *flags: str):
    cfg = _cfg("--deepspeed", path, *flags)
    return resolve_ds_config(cfg, json.loads(open(path).read()), 2, path)


# ---------------------------------------------------------------------------------------------
# flags and combinations (start-up checks)
# ---------------------------------------------------------------------------------------------

def test_flag_problems_are_collected_and_name_the_flag():
    msg = _problems("--load_in_8bit", "--load_in_4bit")
    assert "--load_in_8bit and --load_in_4bit contradict" in msg
    msg = _problems("--bnb_4bit_quant_type", "nf3", "--load_in_4bit",
                    "--bnb_4bit_compute_dtype", "float16", "--bnb_4bit_quant_storage", "int4")
    assert "--bnb_4bit_quant_type 'nf3'" in msg and "float16 overflows" in msg
    assert "--bnb_4bit_quant_storage 'int4'" in msg
    msg = _problems("--bnb_4bit_use_double_quant", "--llm_int8_threshold", "3")
    assert "--bnb_4bit_use_double_quant only apply with --load_in_4bit" in msg
    assert "--llm_int8_threshold only applies with --load_in_8bit" in msg


def test_int8_with_zero3_is_refused_naming_the_config_to_use():
    with pytest.raises(ConfigError) as e:
        _resolve(ZERO3, "--load_in_8bit")
    msg = str(e.value)
    assert "--load_in_8bit with ZeRO-3" in msg and "ds_configs/zero2_8bit.json" in msg
    _resolve(ZERO2_8BIT, "--load_in_8bit")  # the supported one resolves


@pytest.mark.parametrize("bf16,storage,ok", [
    (False, "auto", True), (True, "auto", True), (True, "bfloat16", True),
    (False, "float32", True), (True, "uint8", False), (True, "float32", False),
    (False, "bfloat16", False)])
def test_4bit_with_zero3_needs_storage_equal_to_the_model_dtype(bf16, storage, ok):
    flags = ["--load_in_4bit", "--bnb_4bit_quant_storage", storage] + (["--bf16"] if bf16 else [])
    if ok:
        _resolve(ZERO3, *flags)
        return
    with pytest.raises(ConfigError) as e:
        _resolve(ZERO3, *flags)
    want = "bfloat16" if bf16 else "float32"
    assert f"set --bnb_4bit_quant_storage {want}" in str(e.value)


def test_4bit_uint8_storage_is_fine_without_zero3_but_not_another_float():
    _resolve(ZERO2_8BIT, "--load_in_4bit", "--bnb_4bit_quant_storage", "uint8", "--bf16")
    with pytest.raises(ConfigError, match="DeepSpeed casts float parameters"):
        _resolve(ZERO2_8BIT, "--load_in_4bit", "--bnb_4bit_quant_storage", "float32", "--bf16")


def test_bnb_config_follows_the_flags():
    c = quant.bnb_config(_cfg("--load_in_4bit", "--bf16", "--bnb_4bit_use_double_quant"))
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "nf4"
    assert c.bnb_4bit_compute_dtype == torch.bfloat16 and c.bnb_4bit_quant_storage == torch.bfloat16
    assert c.bnb_4bit_use_double_quant
    c8 = quant.bnb_config(_cfg("--load_in_8bit", "--llm_int8_threshold", "0"))
    assert c8.load_in_8bit and c8.llm_int8_threshold == 0
    assert quant.bnb_config(_cfg()) is None


# ---------------------------------------------------------------------------------------------
# the loaded quantized model, in one process
# ---------------------------------------------------------------------------------------------

def _load(tiny_model, *flags: str):
    from dtvg_ds.model import load_backbone

    cfg = _cfg(*flags)
    model = load_backbone(str(tiny_model), torch.bfloat16 if cfg.bf16 else torch.float32,
                          quant.bnb_config(cfg), torch.device("cpu"))
    quant.freeze_layout(model)
    return model


def _forward(model, train: bool) -> torch.Tensor:
    model.train(train)
    ids = torch.arange(2, 14).reshape(2, 6)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, labels=torch.tensor([[5, 1], [6, 1]]))
    out.loss.backward()
    return emb.grad


@pytest.mark.parametrize("flags,kind", [(("--load_in_8bit",), "Linear8bitLt"),
                                        (("--load_in_4bit",), "Linear4bit")])
def test_quantized_layers_and_t5_kept_modules(tiny_model, flags, kind):
    model = _load(tiny_model, *flags)
    rep = quant.quantization_report(model)
    assert rep["quantized_linear"] == {kind: 28}  # q, k, v, o, wi of 2+2 layers (+ cross-attn)
    assert rep["kept_float_linear"] == ["lm_head", "wo"]  # T5 keeps wo (and lm_head) in float
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("flags", [("--load_in_8bit",), ("--load_in_4bit",),
                                   ("--load_in_4bit", "--bnb_4bit_use_double_quant")])
def test_checksum_is_stable_through_training_and_sees_every_quantized_byte(tiny_model, flags):
    model = _load(tiny_model, *flags)
    before = quant.checksum(model)
    for train in (True, False, True):  # eval mode: where bitsandbytes would repack on CPU
        assert _forward(model, train).abs().sum() > 0  # the prompt side gets a gradient
    assert quant.checksum(model) == before
    q = model.encoder.block[0].layer[0].SelfAttention.q
    consts = quant.quant_state_tensors(q.weight, q)
    assert consts, "int8 scales / 4-bit absmax must be found (SCB moves to state after forward)"
    consts[0].view(torch.uint8).view(-1)[0] ^= 1  # flip one bit of a constant
    assert quant.checksum(model) != before
    consts[0].view(torch.uint8).view(-1)[0] ^= 1
    assert quant.checksum(model) == before
    q.weight.data.view(torch.uint8).view(-1)[0] ^= 1  # and one bit of a quantized weight
    assert quant.checksum(model) != before


def test_plan_quantized_bytes_equal_a_loaded_model(tiny_model):
    cfg, _ = P.load_config(str(tiny_model))
    ds2 = json.loads(open(ZERO2_8BIT).read())
    for flags, q, double in ((("--load_in_8bit",), "int8", False),
                             (("--load_in_4bit",), "4bit", False),
                             (("--load_in_4bit", "--bnb_4bit_use_double_quant"), "4bit", True)):
        model = _load(tiny_model, *flags)
        p = P.plan(cfg, 1, ds2, num_virtual_tokens=8, quantize=q, double_quant=double)
        assert p["backbone"]["bytes_per_rank"] == quant.local_bytes(model), flags
        assert p["backbone"]["quantized_tensors"] == 28


# ---------------------------------------------------------------------------------------------
# real 2-rank DeepSpeed runs
# ---------------------------------------------------------------------------------------------

CASES = {
    "int8-zero2": (ZERO2_8BIT, ("--load_in_8bit",)),
    "nf4-zero3": (ZERO3, ("--load_in_4bit",)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def probe(request, tiny_model, tmp_path_factory):
    ds, flags = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    out = tmp / "facts.json"
    args = train_args(tiny_model, tmp / "run", max_steps=3, deepspeed=ds) + list(flags)
    launch(ROOT / "tests" / "dist_probe.py", [str(out), *args])
    return request.param, [json.loads((tmp / f"facts.json.rank{r}").read_text())
                           for r in range(2)]


@pytest.mark.dist
def test_quantized_2rank_first_step_matches_single_process_and_weights_never_change(
        probe, tiny_model):
    name, facts = probe
    ds, flags = CASES[name]
    backbone = _load(tiny_model, *flags)
    assert_first_step_matches(backbone, tiny_model, facts)
    for f in facts:
        assert f["checksum_after"] == f["checksum_before"]  # quantized bytes untouched
        assert f["backbone_trainable"] == 0
    assert facts[0]["prompt_final"] == facts[1]["prompt_final"]  # replicas bitwise equal

    # memory: what the plan command predicts is what each rank holds
    cfg, _ = P.load_config(str(tiny_model))
    p = P.plan(cfg, 2, json.loads(open(ds).read()), num_virtual_tokens=8,
               quantize="int8" if "--load_in_8bit" in flags else "4bit")
    for f in facts:
        assert f["backbone_bytes"] == p["backbone"]["bytes_per_rank"]
    if ds == ZERO3:  # sharded (the tiny model's small packed weights persist whole: r x d = 512)
        assert facts[0]["backbone_bytes"] < 0.75 * quant.local_bytes(backbone)


def _losses(out) -> list[float]:
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.dist
@pytest.mark.parametrize("ds,flags", [(ZERO2_8BIT, ("--load_in_8bit",)),
                                      (ZERO3, ("--load_in_4bit", "--bf16"))],
                         ids=["int8-zero2", "nf4-bf16-zero3"])
def test_quantized_training_2_ranks_equals_1_rank(tiny_model, tmp_path, ds, flags):
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"r{n}"
        p = launch(ROOT / "launchers" / "train.py",
                   train_args(tiny_model, out, max_steps=6, deepspeed=ds,
                              per_device_train_batch_size=8 // n) + list(flags), nproc=n)
        assert "frozen backbone unchanged on every rank" in p.stdout
        runs[n] = _losses(out)
        assert (out / "prompt.safetensors").is_file()
    assert len(runs[1]) == 6
    assert runs[2] == pytest.approx(runs[1], rel=1e-5 if "--bf16" not in flags else 1e-2)
    assert runs[2][-1] < runs[2][0]


@pytest.mark.dist
def test_quantized_zero3_stop_and_resume_equals_uninterrupted(tiny_model, tmp_path):
    """The checkpoint of a run with a partitioned 4-bit backbone (prompt + optimizer state only;
    frozen weights excluded) resumes to the uninterrupted run's losses."""
    args = dict(max_steps=6, save_steps=3, deepspeed=ZERO3)
    full, split = tmp_path / "full", tmp_path / "split"
    train = ROOT / "launchers" / "train.py"
    launch(train, train_args(tiny_model, full, **args) + ["--load_in_4bit"])
    launch(train, train_args(tiny_model, split, stop_at_step=3, **args) + ["--load_in_4bit"])
    p = launch(train, train_args(tiny_model, split, resume="auto", **args) + ["--load_in_4bit"])
    assert "resumed from" in p.stdout and "frozen backbone unchanged" in p.stdout
    assert _losses(split) == pytest.approx(_losses(full), rel=1e-6)
