"""Memory behaviour at the level that decides whether XL fits: the frozen linear layers, the
live-parameter budget of ZeRO-3 counted from ZeRO's own parameter status, activations counted
by the planner, gradient checkpointing, and the per-phase memory trace. (Sizes are measured in
bench/xl_scale.py; nothing here asserts a time or an RSS figure of the project's runs.)"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from dtvg_ds import frozen_linear, memtrace
from dtvg_ds import plan as P
from tests.conftest import ROOT, launch, train_args

ZERO3 = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())


# ---------------------------------------------------------------------------------------------
# the frozen linear layers
# ---------------------------------------------------------------------------------------------

def _pair(dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8, bias=False)).to(dtype)
    ref.requires_grad_(False)
    ours = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8, bias=False)).to(dtype)
    ours.load_state_dict(ref.state_dict())
    ours.requires_grad_(False)
    assert frozen_linear.install(ours) == 2
    return ref, ours


def _fwd_bwd(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    (y.float() ** 2).sum().backward()
    return y.detach(), x.grad


def test_frozen_linear_equals_nn_linear_and_only_the_input_gets_a_gradient():
    ref, ours = _pair(torch.float32)
    x = torch.randn(3, 5, 24)
    y0, g0 = _fwd_bwd(ref, x)
    y1, g1 = _fwd_bwd(ours, x)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-6)
    assert all(p.grad is None for p in ours.parameters())


def test_frozen_linear_bf16_matches_within_bf16_rounding():
    ref, ours = _pair(torch.bfloat16)
    x = torch.randn(2, 7, 24, dtype=torch.bfloat16)
    y0, g0 = _fwd_bwd(ref, x)
    y1, g1 = _fwd_bwd(ours, x)
    assert y1.dtype == g1.dtype == torch.bfloat16
    torch.testing.assert_close(y1.float(), y0.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g1.float(), g0.float(), rtol=2e-2, atol=2e-2)


def test_frozen_linear_saves_the_parameter_itself_not_a_view_of_it():
    _, ours = _pair(torch.float32)
    saved: list[torch.Tensor] = []
    x = torch.randn(4, 24, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours(x)
    weights = {id(ours[0].weight), id(ours[2].weight)}
    assert weights <= {id(t) for t in saved}
    assert not any(t._base is not None and id(t._base) in weights for t in saved)


def test_install_leaves_linear_subclasses_alone():
    class Quantized(nn.Linear):
        pass

    m = nn.Sequential(nn.Linear(4, 4), Quantized(4, 4))
    assert frozen_linear.install(m) == 1
    assert "forward" not in vars(m[1])


# ---------------------------------------------------------------------------------------------
# the planner's activations and peaks
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_t5():
    from transformers import T5Config

    return T5Config(vocab_size=512, d_model=64, d_ff=128, num_layers=3, num_decoder_layers=3,
                    num_heads=4, d_kv=16, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False)


def test_activations_grow_with_the_batch_and_checkpointing_cuts_them(small_t5):
    one = P.activation_bytes(small_t5, 2, 40, 4, bf16=False, checkpointing=False)
    two = P.activation_bytes(small_t5, 4, 40, 4, bf16=False, checkpointing=False)
    gc = P.activation_bytes(small_t5, 4, 40, 4, bf16=False, checkpointing=True)
    half = P.activation_bytes(small_t5, 4, 40, 4, bf16=True, checkpointing=False)
    assert one["saved_bytes"] > 0
    # per-example tensors double; the relative position bias (1 x heads x L x L) does not
    assert 1.8 < two["saved_bytes"] / one["saved_bytes"] <= 2.0
    assert gc["saved_bytes"] < two["saved_bytes"] / 3
    assert 0 < gc["recompute_block_bytes"] < two["saved_bytes"]
    assert gc["no_checkpointing_bytes"] == two["saved_bytes"]
    assert half["saved_bytes"] < two["saved_bytes"]


def test_plan_step_peak_is_held_plus_live_budget_plus_prefetch_plus_activations(small_t5):
    p = P.plan(small_t5, 2, ZERO3, num_virtual_tokens=8, bf16=True, batch=4, source_len=32,
               target_len=4)
    t, a = p["transient"], p["activations"]
    assert a["encoder_tokens"] == 40
    assert t["peak_train_bytes_per_rank"] == (p["accelerator_bytes_per_rank"]
                                             + t["zero3_gather_bound_bytes"]
                                             + t["zero3_prefetch_bytes"] + a["saved_bytes"])
    whole = p["backbone"]["params"] * 2
    assert t["peak_eval_resident_bytes_per_rank"] == p["accelerator_bytes_per_rank"] + whole
    text = P.render(p)
    assert "peak of a training step" in text and "activations" in text
    cpu = P.plan(small_t5, 2, ZERO3, num_virtual_tokens=8, bf16=True, batch=4, source_len=32,
                 target_len=4, device="cpu")["transient"]
    assert cpu["peak_train_bytes_per_rank"] - t["peak_train_bytes_per_rank"] == (
        P.CPU_PROCESS_BYTES + 4 * t["largest_tensor_elements"])


def test_plan_without_a_batch_says_activations_are_not_counted(small_t5):
    p = P.plan(small_t5, 2, ZERO3, num_virtual_tokens=8)
    assert p["activations"] is None and "peak_train_bytes_per_rank" not in p["transient"]
    assert "give --per_device_train_batch_size" in P.render(p)


# ---------------------------------------------------------------------------------------------
# the memory trace
# ---------------------------------------------------------------------------------------------

def test_memory_trace_records_a_phase_peak_and_appends_json(tmp_path):
    trace = memtrace.MemoryTrace(tmp_path / "memory.rank0.jsonl", rank=0, device="cpu")
    try:
        with trace.phase("idle"):
            time.sleep(0.05)
        with trace.phase("alloc", step=1):
            x = torch.ones(64 * 1024 * 1024)  # 256 MiB, pages touched
            time.sleep(0.2)  # the sampler runs every 20 ms
            del x
    finally:
        trace.close()
    recs = [json.loads(line) for line in (tmp_path / "memory.rank0.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs] == ["idle", "alloc"]
    assert recs[1]["step"] == 1 and recs[1]["device"] == "cpu"
    assert recs[1]["peak_bytes"] - recs[0]["end_bytes"] > 200 * 1024 ** 2
    # a new run starts the file over; a resumed one appends
    memtrace.MemoryTrace(tmp_path / "memory.rank0.jsonl", fresh=True).close()
    assert not (tmp_path / "memory.rank0.jsonl").exists()


def test_memory_trace_off_writes_nothing(tmp_path):
    trace = memtrace.MemoryTrace(None)
    with trace.phase("forward"):
        pass
    assert trace.records == [] and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# real 2-rank ZeRO-3 runs
# ---------------------------------------------------------------------------------------------

def _live_facts(tiny_model, tmp_path, ds: dict) -> list[dict]:
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(ds))
    out = tmp_path / "facts.json"
    args = train_args(tiny_model, tmp_path / "run", max_steps=2, deepspeed=str(cfg))
    launch(ROOT / "tests" / "live_params_probe.py", [str(out), *args])
    return [json.loads((tmp_path / f"facts.json.rank{r}").read_text()) for r in range(2)]


def _with_zero(**zero) -> dict:
    ds = json.loads(json.dumps(ZERO3))
    ds["zero_optimization"].update(zero)
    return ds


@pytest.mark.dist
@pytest.mark.parametrize("budget", [0, 20_000])
def test_zero3_step_keeps_at_most_the_live_budget_gathered(tiny_model, tmp_path, budget):
    """The most backbone elements ZeRO-3 holds gathered at any point of forward or backward is
    the fetch unit in use (the largest leaf block or module) + what it keeps for reuse: the
    parameters used again within the next `stage3_max_reuse_distance` elements of its trace,
    where the module crossing that distance counts whole (DeepSpeed's `__params_to_release`),
    so at most budget + one more unit (prefetch 0 here). Nothing released stays live: no saved
    tensor keeps a released weight's storage."""
    ds = _with_zero(stage3_max_live_parameters=budget, stage3_prefetch_bucket_size=0,
                    stage3_max_reuse_distance=budget)
    for f in _live_facts(tiny_model, tmp_path, ds):
        bound = f["largest_module"] + (budget and budget + f["largest_module"])
        assert f["total"] - f["persistent"] > 1.5 * bound  # never releasing would break it
        assert f["max_live_forward"] > 0 and f["max_live_backward"] > 0  # counted for real
        assert f["max_live_forward"] <= bound, f
        assert f["max_live_backward"] <= bound, f
        assert f["aliasing_views"] == 0


@pytest.mark.dist
def test_gradient_checkpointing_gives_the_same_first_step_under_zero3(tiny_model, tmp_path):
    facts = {}
    for gc in (False, True):
        out = tmp_path / f"gc{gc}" / "facts.json"
        out.parent.mkdir()
        args = train_args(tiny_model, out.parent / "run", max_steps=2,
                          deepspeed="ds_configs/zero3.json")
        launch(ROOT / "tests" / "dist_probe.py",
               [str(out), *args, *(["--gradient_checkpointing"] if gc else [])])
        facts[gc] = [json.loads((out.parent / f"facts.json.rank{r}").read_text())
                     for r in range(2)]
    for plain, ckpt in zip(facts[False], facts[True], strict=True):
        assert ckpt["loss0"] == pytest.approx(plain["loss0"], rel=1e-6)
        torch.testing.assert_close(torch.tensor(ckpt["grad0"]), torch.tensor(plain["grad0"]),
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(ckpt["prompt_final"]),
                                   torch.tensor(plain["prompt_final"]), rtol=1e-5, atol=1e-7)
        assert ckpt["backbone_trainable"] == 0 and ckpt["checksum_before"] == ckpt["checksum_after"]
