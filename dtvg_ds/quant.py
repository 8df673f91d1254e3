"""Quantized (bitsandbytes) backbones: which combinations run, and how they are loaded.

The prompt is never quantized: it stays an fp32 parameter (bf16 compute under --bf16) whole on
every rank; only the frozen backbone's linear layers are. The supported combinations were
decided by running them (tests/test_quant.py, README "8-bit and 4-bit backbones"):

- `--load_in_8bit` (LLM.int8) with ZeRO-0/1/2 (`ds_configs/zero2_8bit.json`). The int8 backbone
  is whole on every rank (ZeRO-1/2 partition only optimizer state and gradients, i.e. the
  prompt's), so the gain is the backbone's bytes, not sharding.
- `--load_in_8bit` with ZeRO-3 is refused. transformers loads quantized models outside
  `zero.Init` (whole on every rank), DeepSpeed then partitions the int8 `weight` parameter, but
  bitsandbytes keeps the whole int8 matrix as `weight.CB` / `state.CB` (and the scales as `SCB`)
  and multiplies with that. Measured here (bench/int8_zero3_probe.py, 2 ranks): the loss
  matches the unpartitioned 8-bit model's (within 1e-3 over 4 steps), but every rank holds the
  whole int8 backbone plus its ZeRO-3 partition (1.5x ZeRO-2's bytes) and pays ZeRO-3's gathers
  for nothing. Upstream reports wrong losses on GPU stacks (bitsandbytes #1451, axolotl #2068,
  accelerate #3730).
- `--load_in_4bit` (NF4/FP4) with any stage. Under ZeRO-3 the packed 4-bit weights must be
  stored in a float dtype equal to the model dtype (`bnb_4bit_quant_storage`, the QLoRA +
  DeepSpeed recipe in PEFT's docs; that is what the tests run). Other storage is refused under
  ZeRO-3 (not run here); without ZeRO-3, uint8 is fine (run by hand: same losses as bf16
  storage), but a float storage other than the model dtype is refused because DeepSpeed's bf16
  set-up casts float parameters and would corrupt the packed bits. The 4-bit quantization
  constants (`quant_state.absmax`) are not parameters: every rank keeps them whole.

T5 keeps `wo` (the FFN output projection) out of quantization through transformers'
`_keep_in_fp32_modules` (its activations overflow in low precision); `lm_head` is kept too.
`quantization_report` lists what was and was not quantized, and the engine logs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from typing import Any

import torch
from torch import nn

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STORAGE_DTYPES = {**FLOAT_DTYPES, "uint8": torch.uint8}
QUANT_TYPES = ("nf4", "fp4")
_4BIT_FLAGS = ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage",
               "bnb_4bit_use_double_quant")


def is_quantized(cfg: Any) -> bool:
    """Whether the run loads its backbone through bitsandbytes."""
    return bool(cfg.load_in_8bit or cfg.load_in_4bit)


def model_dtype_name(cfg: Any) -> str:
    """The dtype of the backbone's non-quantized parameters (and of DeepSpeed's compute)."""
    return "bfloat16" if cfg.bf16 else "float32"


def compute_dtype_name(cfg: Any) -> str:
    """4-bit: the dtype the dequantized weights are multiplied in ('auto' = model dtype)."""
    return _or_model_dtype(cfg, cfg.bnb_4bit_compute_dtype)


def storage_dtype_name(cfg: Any) -> str:
    """4-bit: the dtype the packed weights are stored in ('auto' = model dtype)."""
    return _or_model_dtype(cfg, cfg.bnb_4bit_quant_storage)


def _or_model_dtype(cfg: Any, value: str) -> str:
    return model_dtype_name(cfg) if value == "auto" else value


def validate_flags(cfg: Any) -> list[str]:
    """Problems with the quantization flags alone (the ZeRO stage is checked separately)."""
    probs: list[str] = []
    if cfg.load_in_8bit and cfg.load_in_4bit:
        probs.append("--load_in_8bit and --load_in_4bit contradict each other; pass one")
    if not cfg.load_in_4bit:
        given = [f"--{f}" for f in _4BIT_FLAGS if f in cfg.explicit]
        if given:
            probs.append(f"{', '.join(given)} only apply with --load_in_4bit; add it or drop them")
    if "llm_int8_threshold" in cfg.explicit and not cfg.load_in_8bit:
        probs.append("--llm_int8_threshold only applies with --load_in_8bit; add it or drop it")
    if is_quantized(cfg) and importlib.util.find_spec("bitsandbytes") is None:
        probs.append("--load_in_8bit/--load_in_4bit need bitsandbytes: pip install "
                     "'dtvg_ds[quant]'")
    if cfg.llm_int8_threshold < 0:
        probs.append(f"--llm_int8_threshold must be >= 0 (got {cfg.llm_int8_threshold})")
    if cfg.bnb_4bit_quant_type not in QUANT_TYPES:
        probs.append(f"--bnb_4bit_quant_type {cfg.bnb_4bit_quant_type!r}: choose nf4 or fp4")
    if cfg.bnb_4bit_compute_dtype not in ("auto", *FLOAT_DTYPES):
        probs.append(f"--bnb_4bit_compute_dtype {cfg.bnb_4bit_compute_dtype!r}: choose auto, "
                     "float32 or bfloat16 (float16 overflows in T5)")
    if cfg.bnb_4bit_quant_storage not in ("auto", *STORAGE_DTYPES):
        probs.append(f"--bnb_4bit_quant_storage {cfg.bnb_4bit_quant_storage!r}: choose auto, "
                     "uint8, float32 or bfloat16")
    return probs


def check_zero_combination(cfg: Any, stage: int, path: str) -> list[str]:
    """Problems of the quantization flags with the ZeRO stage of the DeepSpeed JSON `path`."""
    probs: list[str] = []
    if cfg.load_in_8bit and stage == 3:
        probs.append(
            f"--load_in_8bit with ZeRO-3 ({path}) is not supported: bitsandbytes keeps every "
            "int8 matrix whole beside its ZeRO-3 partition, so each rank holds 1.5x the int8 "
            "backbone and nothing is sharded (bench/int8_zero3_probe.py; upstream reports wrong losses, "
            "bitsandbytes #1451); use --deepspeed ds_configs/zero2_8bit.json for int8, or "
            "--load_in_4bit with ZeRO-3 to shard a quantized backbone")
    if cfg.load_in_4bit and cfg.bnb_4bit_quant_storage in STORAGE_DTYPES:
        want, have = model_dtype_name(cfg), cfg.bnb_4bit_quant_storage
        if have != want and (stage == 3 or have != "uint8"):
            why = ("ZeRO-3 partitions the packed 4-bit weights as parameters of the model dtype"
                   if stage == 3 else "DeepSpeed casts float parameters to the model dtype, "
                   "which would corrupt the packed weights")
            probs.append(f"--bnb_4bit_quant_storage {have} with a {want} model ({path}, ZeRO-"
                         f"{stage}): {why}; set --bnb_4bit_quant_storage {want} (or auto)")
    return probs


def bnb_config(cfg: Any) -> Any:
    """transformers' `BitsAndBytesConfig` for the run (None when not quantized)."""
    if not is_quantized(cfg):
        return None
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.llm_int8_threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=FLOAT_DTYPES[compute_dtype_name(cfg)],
        bnb_4bit_quant_storage=STORAGE_DTYPES[storage_dtype_name(cfg)],
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant)


def quiet_known_warnings() -> None:
    """LLM.int8 multiplies through fp16 by design and bitsandbytes logs a warning about it at
    every layer's forward; the engine says it once instead (T5's overflow-prone `wo` is not
    int8). Only that message is dropped."""
    import logging

    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda rec: "inputs will be cast" not in rec.getMessage())


def freeze_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPU.

    At inference (eval mode, no grad) on a CPU with AVX512-BF16, `Linear4bit.forward` rewrites
    `weight.data` and its `quant_state` into a CPU-friendly layout. Under ZeRO-3 that rewrites a
    *gathered* copy while the partitions keep the old layout, so the next gather would pair old
    data with the new state (and the checkpoint's state_dict then fails). The frozen backbone
    must stay bit-identical, so the repacking is switched off (GPU kernels never repack).
    Returns the number of layers changed.
    """
    n = 0
    for mod in model.modules():
        if getattr(mod, "support_avx512bf16_for_cpu", False):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


def quant_state_tensors(p: torch.Tensor, owner: nn.Module | None = None) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside a quantized weight `p` of module `owner`: the int8
    row scales (on the weight until the first forward, then moved to `owner.state.SCB`), or the
    4-bit absmax, codebook and the nested constants of double quantization. Empty for a plain
    tensor."""
    out: list[torch.Tensor] = []
    scb = getattr(p, "SCB", None)
    if scb is None and owner is not None and getattr(p, "dtype", None) == torch.int8:
        scb = getattr(getattr(owner, "state", None), "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    qs = getattr(p, "quant_state", None)
    while qs is not None:
        out += [t for t in (getattr(qs, "absmax", None), getattr(qs, "code", None))
                if isinstance(t, torch.Tensor)]
        qs = getattr(qs, "state2", None)
    return out


def _params_with_constants(model: nn.Module):
    """(name, parameter, its quantization constants) for every distinct parameter of `model`
    (tied weights once)."""
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield f"{mname}.{pname}", p, quant_state_tensors(p, mod)


def quantization_report(model: nn.Module) -> dict[str, Any]:
    """Which linear layers are quantized (by bitsandbytes class) and which are kept in float."""
    quantized: dict[str, int] = {}
    kept: set[str] = set()
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        if kind in ("Linear8bitLt", "Linear4bit", "LinearNF4", "LinearFP4"):
            quantized[kind] = quantized.get(kind, 0) + 1
        elif isinstance(mod, nn.Linear):
            kept.add(name.rsplit(".", 1)[-1])
    return {"quantized_linear": quantized, "kept_float_linear": sorted(kept)}


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's storage of a parameter: its ZeRO-3 partition if it has one."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def local_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters held by this rank, including bitsandbytes' quantization
    constants. ZeRO-3: every parameter's partition, plus the whole data of the persistent ones
    (DeepSpeed keeps both); otherwise the whole parameters."""
    total = 0
    for _, p, consts in _params_with_constants(model):
        held = [p.ds_tensor] if hasattr(p, "ds_tensor") else [p.data]
        if hasattr(p, "ds_tensor") and getattr(p, "ds_persist", False):
            held.append(p.data)
        total += sum(t.numel() * t.element_size() for t in (*held, *consts))
    return total


def checksum(model: nn.Module) -> str:
    """sha256 of this rank's bytes of every parameter and quantization constant of `model`.

    Compared at the start and end of a run to show the frozen (possibly quantized) backbone
    never changed. Local only (no gather): each rank checks its own partition.
    """
    h = hashlib.sha256()
    for name, p, consts in _params_with_constants(model):
        for t in (_local(p), *consts):
            h.update(name.encode())
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
