"""Size a job before submitting it: memory per rank from the model config alone.

    python -m dtvg_ds.plan --model google/flan-t5-xl --world_size 8 \
        --config ds_configs/zero3.json --num_virtual_tokens 100 --bf16 [--method dtvg --num_sources 6]

The parameter shapes come from `AutoConfig` + a model built on the meta device (no weights are
read or allocated). `--model` is a Hub id (needs the Hub for its config.json), a local model dir,
or one of the built-in presets in `PRESETS` (the published configs of t5-base / Flan-T5-XL / XXL,
used so these numbers can be produced offline; the output says when a preset was used).

What is modelled, per rank, the way `dtvg_ds.engine` sets DeepSpeed up:

- backbone (frozen): ZeRO-3 keeps a 1/N partition of every parameter (`ceil(numel/N)` elements:
  DeepSpeed pads each parameter to a multiple of N); parameters with numel <=
  `stage3_param_persistence_threshold` ('auto' = the largest trainable prompt tensor, as in
  `engine.set_prompt_persistence`) are additionally kept whole on every rank. ZeRO-0/1/2 keep the
  whole backbone on every rank. `offload_param` moves the partitions to host memory.
- prompt (trainable): whole on every rank, in the compute dtype; plus the fp32 `P_init` (and for
  DTVG the n fp32 source task vectors), which every rank holds.
- optimizer (AdamW): fp32 master + 2 fp32 moments = 12 bytes per trainable element, partitioned
  over ranks under ZeRO >= 1 (per parameter group, padded to a multiple of N).
- gradients: fp32, partitioned under ZeRO >= 2, whole under ZeRO-0/1.

- with a micro batch (`--per_device_train_batch_size`, lengths from `--max_source_length` /
  `--max_target_length`): the activations autograd saves (counted on the meta device), and
  the peaks of a training step (+ the live-parameter budget and the prefetch bucket) and of a
  resident evaluation (+ the whole backbone gathered beside the partition); `--device cpu` adds
  a CPU rank's own process memory. Within 3 % of the measured peaks at XL size on 2 CPU ranks
  (bench/RESULTS.md, "XL on this machine").

Not modelled: communication buffers, allocator fragmentation, the CUDA context.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

# Published configs (config.json on the Hub), as T5Config kwargs: enough to build exact shapes.
PRESETS: dict[str, dict[str, Any]] = {
    "t5-base": dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                    num_decoder_layers=12, num_heads=12, relative_attention_num_buckets=32,
                    feed_forward_proj="relu", tie_word_embeddings=True),
    "google/flan-t5-xl": dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                              num_decoder_layers=24, num_heads=32,
                              relative_attention_num_buckets=32,
                              relative_attention_max_distance=128,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "google/flan-t5-xxl": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                               num_decoder_layers=24, num_heads=64,
                               relative_attention_num_buckets=32,
                               relative_attention_max_distance=128,
                               feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}

GIB = 1024 ** 3
ADAM_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq
# A CPU rank's resident memory beyond the tensors modelled here (Python, torch, DeepSpeed,
# tokenizer, data): RssAnon after deepspeed.initialize minus the held backbone bytes, measured
# at XL size on 2 ranks: 3.12-3.14 GiB - 2.60 GiB (bench/RESULTS.md, "XL on this machine").
CPU_PROCESS_BYTES = int(0.5 * GIB)


class PlanError(ValueError):
    """Bad input to the planner; the message says what to change."""


def load_config(model: str, use_presets: bool = True) -> tuple[Any, bool]:
    """(config, is_preset): a local dir or Hub id through AutoConfig, else a built-in preset.

    A local directory always wins; a preset name is used without touching the Hub.
    """
    from transformers import AutoConfig, T5Config

    if Path(model).is_dir():
        return AutoConfig.from_pretrained(model), False
    if use_presets and model in PRESETS:
        return T5Config(**PRESETS[model]), True
    try:
        return AutoConfig.from_pretrained(model), False
    except (OSError, ValueError) as e:
        raise PlanError(f"--model {model}: could not read its config ({str(e).splitlines()[0][:200]})."
                        f" Pass a local model dir, a Hub id with Hub access, or one of the "
                        f"built-in presets: {', '.join(PRESETS)}") from None


def checkpoint_unties_lm_head(config: Any) -> bool:
    """Whether the checkpoint of `config` has its own lm_head (Flan-T5 / T5 v1.1 do).

    transformers 5 builds every T5 with lm_head tied to the shared embedding (the config's
    `tie_word_embeddings=False` only survives as `scale_decoder_outputs=False`), but
    `from_pretrained` unties them again when the checkpoint holds a different lm_head, as the
    published Flan-T5 files do. So the loaded model has one more vocab x d matrix than
    `from_config` builds.
    """
    return getattr(config, "scale_decoder_outputs", None) is False or \
        getattr(config, "tie_word_embeddings", True) is False


def meta_model(config: Any) -> Any:
    """The model `from_pretrained` would build for `config`, on the meta device (no weights),
    with lm_head untied when the checkpoint has its own (see `checkpoint_unties_lm_head`)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is inp.weight and checkpoint_unties_lm_head(config):
            out.weight = torch.nn.Parameter(torch.empty_like(out.weight))
    return model


def param_shapes(config: Any, model: Any = None) -> list[tuple[str, int]]:
    """(name, numel) of every distinct parameter as `from_pretrained` would load it, in
    registration order (`model` defaults to `meta_model(config)`)."""
    model = meta_model(config) if model is None else model
    return [(n, p.numel()) for n, p in model.named_parameters()]  # tied weights counted once


def quantizable_linears(config: Any, model: Any = None) -> dict[str, int]:
    """{weight name: out_features} of the linear layers bitsandbytes would quantize, the way
    transformers decides it: every `nn.Linear` except the model's `_keep_in_fp32_modules` (T5:
    `wo`) and the output embedding (`lm_head`). `model` defaults to `meta_model(config)`."""
    import torch

    model = meta_model(config) if model is None else model
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    out_emb = model.get_output_embeddings()
    return {f"{name}.weight": mod.out_features for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and mod is not out_emb
            and not keep & set(name.split("."))}


_ACTS: dict[tuple[Any, ...], dict[str, int]] = {}


def activation_bytes(config: Any, batch: int, encoder_len: int, decoder_len: int,
                     bf16: bool, checkpointing: bool) -> dict[str, int]:
    """`_activation_bytes`, remembered per (config, batch, lengths, dtype, checkpointing): a
    protocol plans dozens of jobs with the same few shapes, and each count takes a second."""
    key = (config.to_json_string(), batch, encoder_len, decoder_len, bf16, checkpointing)
    if key not in _ACTS:
        _ACTS[key] = _activation_bytes(config, batch, encoder_len, decoder_len, bf16,
                                       checkpointing)
    return dict(_ACTS[key])


def _activation_bytes(config: Any, batch: int, encoder_len: int, decoder_len: int,
                      bf16: bool, checkpointing: bool) -> dict[str, int]:
    """Bytes autograd keeps for backward in one training forward, counted, not estimated.

    The real model of `config` runs forward on the meta device (shapes and dtypes only, no
    memory, about a second at XL size) in training mode (dropout masks included), with its
    linear layers routed through `frozen_linear` exactly as in training and an input that
    requires grad (the prompt's path). Every tensor autograd saves is counted once (frozen
    parameters are not activations). With `checkpointing` only the block inputs are saved; the
    recomputation of one block in backward then holds that block's saved tensors again, so
    `recompute_block_bytes` (the largest block's) is added to the peak.
    """
    import torch

    from dtvg_ds import frozen_linear

    cfg = copy.deepcopy(config)
    for key in ("decoder_start_token_id", "pad_token_id"):  # labels -> decoder inputs
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, 0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = meta_model(cfg).to(dtype)
    model.requires_grad_(False)
    frozen_linear.install(model)
    model.train()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            saved[id(t)] = t.numel() * t.element_size()
        return t

    blocks = [m for m in model.modules() if type(m).__name__.endswith("Block")]
    per_block: list[int] = []
    marks: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda *_: marks.append(sum(saved.values())))
             for b in blocks]
    hooks += [b.register_forward_hook(lambda *_: per_block.append(sum(saved.values())
                                                                   - marks.pop()))
              for b in blocks]

    def run(gc: bool) -> int:
        saved.clear()
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with torch.device("meta"):
            embeds = torch.empty(batch, encoder_len, int(cfg.d_model), dtype=dtype,
                                 requires_grad=True)
            labels = torch.zeros(batch, decoder_len, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(inputs_embeds=embeds, labels=labels)  # no mask: every position attends
        return sum(saved.values())

    full = run(False)
    largest_block = max(per_block, default=0)
    out = {"saved_bytes": full, "recompute_block_bytes": 0, "no_checkpointing_bytes": full}
    if checkpointing:
        out.update(saved_bytes=run(True), recompute_block_bytes=largest_block)
    for h in hooks:
        h.remove()
    return out


def quantized_storage(numel: int, rows: int, bits: int, storage_bytes: int,
                      double_quant: bool = False, blocksize: int = 64) -> tuple[int, int]:
    """(stored elements of the weight tensor, bytes of its quantization constants) of one
    quantized weight. int8 (`bits` 8): one byte per element + an fp32 scale per row (`SCB`).
    4-bit: two elements per byte, packed into a tensor of `storage_bytes`-byte elements, + an
    fp32 absmax per block of 64 and the 16-entry fp32 codebook; double quantization stores the
    absmax as uint8 + an fp32 absmax per 256 blocks + a 256-entry fp32 codebook."""
    if bits == 8:
        return numel, 4 * rows
    packed = math.ceil(numel / 2)
    blocks = math.ceil(numel / blocksize)
    consts = 4 * blocks + 4 * 16
    if double_quant:
        consts = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16
    return math.ceil(packed / storage_bytes), consts


def prompt_tensors(method: str, r: int, d: int, n_sources: int) -> tuple[list[list[int]], int]:
    """Trainable parameter groups (numels per group) and the frozen fp32 prompt-side elements."""
    if method == "pt":
        return [[r * d]], r * d  # the prompt; P_init
    if method == "dtvg":
        if n_sources < 1:
            raise PlanError("--method dtvg needs --num_sources >= 1")
        # prompt, scale_target, scale_sources (three groups, see methods/dtvg.py); P_init and
        # the n source task vectors are fp32 tensors every rank holds.
        return [[r * d], [r], [n_sources * r]], r * d + n_sources * r * d
    if method == "attempt":
        if n_sources < 1:
            raise PlanError("--method attempt needs --num_sources >= 1")
        # target prompt; W_down, W_up (m = 100, the default --attempt_hidden; methods/attempt.py).
        # Frozen fp32: P_init, the n source prompts and their max-pooled keys. Its activations
        # beyond PT's (a few B x d tensors of the attention module) are not counted.
        m = 100
        return [[r * d], [m * d, d * m]], r * d + n_sources * (r * d + d)
    raise PlanError(f"--method {method}: the planner knows pt, dtvg and attempt")


def _zero(ds: dict[str, Any]) -> dict[str, Any]:
    return ds.get("zero_optimization") or {}


def _device(section: Any) -> str:
    if isinstance(section, dict) and section.get("device", "none") not in ("none", None):
        return str(section["device"])
    return "accelerator"


def _sharded_backbone(tensors: list[tuple[str, int, int]], shapes: list[tuple[str, int]],
                      zero: dict[str, Any], n: int, trainable: list[int], dtype_name: str,
                      pbytes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """ZeRO-3: (the backbone's partition and persistent tensors per rank, the transient
    gather bounds). `tensors` = (name, stored elements, bytes per element)."""
    total = sum(x for _, x in shapes)
    thr = zero.get("stage3_param_persistence_threshold", "auto")
    thr = max(trainable) if thr == "auto" else int(thr)
    if thr < max(trainable):
        raise PlanError(f"stage3_param_persistence_threshold = {thr} is below the prompt's "
                        f"{max(trainable)} elements (the engine refuses this config)")
    cap = zero.get("stage3_model_persistence_threshold", "auto")
    cap = sys.maxsize if cap == "auto" else int(cap)
    running = sum(trainable)  # the prompter is registered first and persists first
    persistent: list[tuple[str, int, int]] = []
    for name, x, size in tensors:
        if x + running > cap:
            continue
        if x <= thr:
            persistent.append((name, x, size))
            running += x
    part = sum(math.ceil(x / n) for _, x, _ in tensors)
    pers = sum(x for _, x, _ in persistent)
    part_dev = _device(zero.get("offload_param"))
    backbone = {
        "params": total, "tensors": len(shapes), "dtype": dtype_name,
        "partitioned": True, "partition_elements_per_rank": part,
        "partition_padding_elements": part * n - sum(x for _, x, _ in tensors),
        "persistence_threshold": thr, "persistent_tensors": len(persistent),
        "persistent_elements": pers,
        "elements_per_rank": part + pers,
        "partition_bytes_per_rank": sum(math.ceil(x / n) * sz for _, x, sz in tensors),
        "partition_device": part_dev, "partition_storage": dtype_name,
        "persistent_bytes_per_rank": sum(x * sz for _, x, sz in persistent),
    }
    max_live = int(zero.get("stage3_max_live_parameters", 1_000_000_000))
    largest = max(x for _, x in shapes)
    gather_bound = min(total, max(max_live, largest))
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 50_000_000))
    transient = {"zero3_gather_bound_elements": gather_bound,
                 "zero3_gather_bound_bytes": gather_bound * pbytes,
                 "zero3_prefetch_bytes": min(prefetch, total) * pbytes,
                 "largest_tensor_elements": largest}
    return backbone, transient


def _whole_backbone(tensors: list[tuple[str, int, int]], shapes: list[tuple[str, int]],
                    dtype_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """ZeRO-0/1/2: the backbone whole on every rank; nothing gathered."""
    total = sum(x for _, x in shapes)
    whole = sum(x for _, x, _ in tensors)
    backbone = {
        "params": total, "tensors": len(shapes), "dtype": dtype_name,
        "partitioned": False, "partition_elements_per_rank": whole,
        "partition_padding_elements": 0, "persistence_threshold": None,
        "persistent_tensors": len(shapes), "persistent_elements": whole,
        "elements_per_rank": whole, "partition_bytes_per_rank": 0,
        "partition_device": "accelerator", "partition_storage": None,
        "persistent_bytes_per_rank": sum(x * sz for _, x, sz in tensors),
    }
    transient = {"zero3_gather_bound_elements": 0, "zero3_gather_bound_bytes": 0,
                 "zero3_prefetch_bytes": 0, "largest_tensor_elements": max(x for _, x in shapes)}
    return backbone, transient


def _trainable_state(groups: list[list[int]], frozen_prompt: int, pbytes: int, stage: int,
                     n: int, zero: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """(prompt, optimizer, gradients) per rank: the prompt replicated, AdamW state partitioned
    from ZeRO-1, gradients from ZeRO-2."""
    trainable = [x for g in groups for x in g]
    n_train = sum(trainable)
    prompt = {"trainable_elements": n_train, "trainable_tensors": trainable,
              "frozen_fp32_elements": frozen_prompt,
              "bytes_per_rank": n_train * pbytes + frozen_prompt * 4, "replicated": True}
    if stage >= 1:
        opt_elems = sum(math.ceil(sum(g) / n) for g in groups)
    else:
        opt_elems = n_train
    optimizer = {"type": "AdamW (fp32 master + 2 moments)", "partitioned": stage >= 1,
                 "elements_per_rank": opt_elems, "bytes_per_rank": opt_elems * ADAM_BYTES,
                 "device": _device(zero.get("offload_optimizer"))}
    grad_elems = opt_elems if stage >= 2 else n_train
    grads = {"partitioned": stage >= 2, "elements_per_rank": grad_elems,
             "bytes_per_rank": grad_elems * 4}
    return prompt, optimizer, grads


def _quantized_tensors(shapes: list[tuple[str, int]], qmap: dict[str, int], quantize: str,
                       store_b: int, double_quant: bool) -> dict[str, tuple[int, int, int]]:
    """Per quantized tensor: (stored elements, bytes per stored element, whole-on-every-rank
    constant bytes)."""
    stored: dict[str, tuple[int, int, int]] = {}
    for name, x in shapes:
        if name in qmap:
            el, consts = quantized_storage(x, qmap[name], 8 if quantize == "int8" else 4,
                                           1 if quantize == "int8" else store_b, double_quant)
            stored[name] = (el, 1 if quantize == "int8" else store_b, consts)
    return stored


def _placement(backbone: dict[str, Any], prompt: dict[str, Any], grads: dict[str, Any],
               optimizer: dict[str, Any]) -> tuple[int, int]:
    """(accelerator bytes, host bytes) per rank of what is held for the whole run."""
    dev = (prompt["bytes_per_rank"] + grads["bytes_per_rank"] + backbone["persistent_bytes_per_rank"]
           + backbone["quant_constant_bytes_per_rank"])
    host = 0
    if backbone["partition_device"] == "accelerator":
        dev += backbone["partition_bytes_per_rank"]
    else:
        host += backbone["partition_bytes_per_rank"]
    if optimizer["device"] == "accelerator":
        dev += optimizer["bytes_per_rank"]
    else:
        host += optimizer["bytes_per_rank"]
    return dev, host


def plan(config: Any, world_size: int, ds_config: dict[str, Any], num_virtual_tokens: int = 100,
         bf16: bool = False, method: str = "pt", num_sources: int = 6,
         shapes: list[tuple[str, int]] | None = None, quantize: str = "none",
         quant_storage: str = "auto", double_quant: bool = False,
         quantizable: dict[str, int] | None = None, batch: int = 0, source_len: int = 256,
         target_len: int = 16, gradient_checkpointing: bool = False,
         device: str = "gpu") -> dict[str, Any]:
    """Memory per rank of a job (pure computation; `shapes` defaults to `param_shapes(config)`).

    `quantize` 'int8' | '4bit' models a bitsandbytes backbone (`quantizable` defaults to
    `quantizable_linears(config)`): the quantized weights' stored elements and the quantization
    constants, which are not parameters and stay whole on every rank even under ZeRO-3.

    With `batch` > 0 (micro batch per rank; `source_len` input tokens before the prompt,
    `target_len` target tokens) the activations of a training step are counted
    (`activation_bytes`) and the peaks of a training step and of a resident evaluation are
    given: `peak_train_bytes_per_rank` = everything held + the ZeRO-3 live-parameter budget +
    the prefetch bucket + activations; `peak_eval_resident_bytes_per_rank` = everything held
    (the partitions stay) + the whole backbone gathered beside it. `device` 'cpu' (DeepSpeed's
    CPU accelerator, where the peak is the process's resident memory) adds the process itself
    (`CPU_PROCESS_BYTES`) and, in bf16, the fp32 copy of the largest weight that
    `frozen_linear` computes with on CPUs without native bf16; on 'gpu' the peak is what the
    CUDA allocator hands out (max_memory_allocated): the CUDA context (~0.3-0.6 GiB) comes on top.
    """
    n = int(world_size)
    if n < 1:
        raise PlanError("--world_size must be >= 1")
    r = int(num_virtual_tokens)
    d = int(config.d_model)
    meta = meta_model(config) if shapes is None or (quantize != "none" and quantizable is None) \
        else None
    shapes = param_shapes(config, meta) if shapes is None else shapes
    zero = _zero(ds_config)
    stage = int(zero.get("stage", 0))
    if zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights"):
        raise PlanError("ZeRO++ quantized weights are not modelled (and not tested: DeepSpeed's "
                        "quantizer op has no CPU implementation)")
    bf16_on = ds_config.get("bf16", {}).get("enabled", "auto")
    use_bf16 = bool(bf16) if bf16_on == "auto" else bool(bf16_on) or bool(bf16)
    pbytes = 2 if use_bf16 else 4
    if quantize not in ("none", "int8", "4bit"):
        raise PlanError(f"--quantize {quantize!r}: choose none, int8 or 4bit")
    if device not in ("gpu", "cpu"):
        raise PlanError(f"--device {device!r}: choose gpu or cpu")
    if quantize == "int8" and stage == 3:
        raise PlanError("int8 with ZeRO-3 is refused by the engine (see dtvg_ds/quant.py); "
                        "plan it with ds_configs/zero2_8bit.json, or --quantize 4bit")
    # per tensor: (stored elements, bytes per stored element, whole-on-every-rank constant bytes)
    store_b = {"auto": pbytes, "uint8": 1, "float32": 4, "bfloat16": 2}[quant_storage]
    if quantize != "none" and quantizable is None:
        quantizable = quantizable_linears(config, meta)
    stored = _quantized_tensors(shapes, quantizable if quantize != "none" else {}, quantize,
                                store_b, double_quant)

    groups, frozen_prompt = prompt_tensors(method, r, d, num_sources)
    trainable = [x for g in groups for x in g]

    # -- backbone --------------------------------------------------------------------------
    # (name, stored elements, bytes per stored element) of every tensor as it sits in memory
    tensors = [(name, *stored.get(name, (x, pbytes, 0))[:2]) for name, x in shapes]
    consts = sum(c for _, _, c in stored.values())  # whole on every rank, never partitioned
    dtype_name = "bf16" if use_bf16 else "fp32"
    if stage == 3:
        backbone, transient = _sharded_backbone(tensors, shapes, zero, n, trainable, dtype_name,
                                                pbytes)
    else:
        backbone, transient = _whole_backbone(tensors, shapes, dtype_name)
    # transformers loads a quantized model outside zero.Init: whole on every rank until
    # deepspeed.initialize partitions it (engine.setup)
    transient["load_whole_bytes"] = (sum(x * sz for _, x, sz in tensors) + consts
                                     if quantize != "none" and stage == 3 else 0)
    backbone["quantize"] = quantize
    backbone["quantized_tensors"] = len(stored)
    backbone["quant_constant_bytes_per_rank"] = consts
    backbone["bytes_per_rank"] = (backbone["partition_bytes_per_rank"]
                                  + backbone["persistent_bytes_per_rank"] + consts)

    # -- prompt, optimizer, gradients ----------------------------------------------------------
    prompt, optimizer, grads = _trainable_state(groups, frozen_prompt, pbytes, stage, n, zero)

    # -- totals --------------------------------------------------------------------------------
    dev, host = _placement(backbone, prompt, grads, optimizer)
    runtime = 0
    if device == "cpu":
        runtime = CPU_PROCESS_BYTES + (transient["largest_tensor_elements"] * 4 if use_bf16 else 0)
    transient["runtime_bytes"] = runtime
    acts = None
    if batch > 0:
        acts = {"batch": int(batch), "encoder_tokens": r + int(source_len),
                "decoder_tokens": int(target_len), "gradient_checkpointing": gradient_checkpointing,
                **activation_bytes(config, batch, r + int(source_len), int(target_len), use_bf16,
                                   gradient_checkpointing)}
        transient["peak_train_bytes_per_rank"] = (
            dev + transient["zero3_gather_bound_bytes"] + transient["zero3_prefetch_bytes"]
            + acts["saved_bytes"] + acts["recompute_block_bytes"] + runtime)
    whole = sum(x * sz for _, x, sz in tensors) + consts
    # Gathering keeps each partition and adds the full tensor beside it (measured at XL).
    transient["peak_eval_resident_bytes_per_rank"] = runtime + dev + (whole if stage == 3 else 0)
    return {
        "world_size": n, "zero_stage": stage, "bf16": use_bf16, "method": method,
        "device": device,
        "num_virtual_tokens": r, "num_sources": num_sources if method == "dtvg" else 0,
        "d_model": d,
        "backbone": backbone, "prompt": prompt, "optimizer": optimizer, "gradients": grads,
        "transient": transient, "activations": acts,
        "accelerator_bytes_per_rank": dev, "host_bytes_per_rank": host,
        "not_counted": ["activations (give --per_device_train_batch_size)"] * (acts is None) + [
                        "ZeRO-3 all-gather working set (bound in transient)",
                        "whole backbone gathered for resident generation at evaluation "
                        "(peak_eval_resident)",
                        "communication buffers, allocator fragmentation"
                        + (", the CUDA context (~0.3-0.6 GiB per GPU)" if device == "gpu" else "")],
    }


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def _b(x: int) -> str:
    if x >= GIB:
        return f"{x / GIB:8.2f} GiB"
    return f"{x / 1024 ** 2:8.2f} MiB"


def render(p: dict[str, Any]) -> str:
    """The human-readable report of `plan()` (plus `model`/`preset`/`config` keys if present)."""
    bb, pr, op, gr, tr = (p["backbone"], p["prompt"], p["optimizer"], p["gradients"],
                          p["transient"])
    n = p["world_size"]
    src = " [built-in preset: shapes from the published config, Hub not read]" if p.get(
        "preset") else ""
    meth = p["method"] + (f", {p['num_sources']} sources" if p["method"] == "dtvg" else "")
    lines = [
        f"model {p.get('model', '?')}{src}",
        f"  {bb['params']:,} backbone parameters in {bb['tensors']} tensors, d_model {p['d_model']}",
        f"job: world size {n}, ZeRO stage {p['zero_stage']} ({p.get('config', '?')}), "
        f"{'bf16' if p['bf16'] else 'fp32'}, method {meth}, r = {p['num_virtual_tokens']}"
        + ("" if bb["quantize"] == "none" else
           f", {bb['quantize']} backbone ({bb['quantized_tensors']} linear weights quantized)"),
        "memory per rank (computed from the config, not measured):",
    ]
    if bb["partitioned"]:
        where = "" if bb["partition_device"] == "accelerator" else \
            f"  -> on {bb['partition_device']} (offload_param)"
        lines += [
            f"  backbone partition  {bb['partition_elements_per_rank']:>15,} el "
            f"{_b(bb['partition_bytes_per_rank'])}"
            f"  (1/{n} of every tensor, {bb['partition_storage']}){where}",
            f"  backbone persistent {bb['persistent_elements']:>15,} el "
            f"{_b(bb['persistent_bytes_per_rank'])}  ({bb['persistent_tensors']} tensors <= "
            f"{bb['persistence_threshold']:,} el, whole on every rank)",
        ]
    else:
        lines.append(f"  backbone (whole)    {bb['elements_per_rank']:>15,} el "
                     f"{_b(bb['persistent_bytes_per_rank'])}  (ZeRO-{p['zero_stage']}: replicated)")
    if bb["quant_constant_bytes_per_rank"]:
        lines.append(f"  quant. constants    {'':>15}    {_b(bb['quant_constant_bytes_per_rank'])}"
                     "  (scales/absmax: not parameters, whole on every rank)")
    lines += [
        f"  prompt (replicated) {pr['trainable_elements']:>15,} el {_b(pr['bytes_per_rank'])}"
        f"  (+ {pr['frozen_fp32_elements']:,} fp32 el of P_init"
        + (" and source vectors" if p["method"] == "dtvg" else "") + ")",
        f"  optimizer state     {op['elements_per_rank']:>15,} el {_b(op['bytes_per_rank'])}"
        f"  (AdamW 12 B/el, {'partitioned' if op['partitioned'] else 'whole'}"
        + ("" if op["device"] == "accelerator" else f", on {op['device']}") + ")",
        f"  gradients           {gr['elements_per_rank']:>15,} el {_b(gr['bytes_per_rank'])}"
        f"  (fp32, {'partitioned' if gr['partitioned'] else 'whole'})",
        f"  total on accelerator                    {_b(p['accelerator_bytes_per_rank'])}"
        + (f"   + {_b(p['host_bytes_per_rank']).strip()} in host memory"
           if p["host_bytes_per_rank"] else ""),
    ]
    if tr["zero3_gather_bound_elements"]:
        lines.append(f"  + transient ZeRO-3 all-gathers up to {tr['zero3_gather_bound_elements']:,} el "
                     f"({_b(tr['zero3_gather_bound_bytes']).strip()}, stage3_max_live_parameters)")
    if tr.get("load_whole_bytes"):
        lines.append(f"  + at start-up the whole quantized backbone, {_b(tr['load_whole_bytes']).strip()}"
                     ", until deepspeed.initialize partitions it (quantized models load outside "
                     "zero.Init)")
    if tr.get("runtime_bytes"):
        lines.append(f"  + CPU rank's process   {'':>15}    {_b(tr['runtime_bytes'])}"
                     "  (Python/torch/DeepSpeed, measured; + the largest weight in fp32 for "
                     "CPU bf16 compute)")
    if tr.get("zero3_prefetch_bytes"):
        lines.append(f"  + ZeRO-3 prefetch bucket {_b(tr['zero3_prefetch_bytes']).strip()} "
                     "(stage3_prefetch_bucket_size)")
    ac = p.get("activations")
    if ac:
        gc = ac["gradient_checkpointing"]
        lines.append(
            f"  + activations         {'':>15}    {_b(ac['saved_bytes'] + ac['recompute_block_bytes'])}"
            f"  (micro batch {ac['batch']} x {ac['encoder_tokens']} encoder tokens incl. prompt "
            f"x {ac['decoder_tokens']} decoder tokens; "
            + (f"gradient checkpointing: block inputs + one block recomputed; "
               f"{_b(ac['no_checkpointing_bytes']).strip()} without)" if gc else
               "no gradient checkpointing)"))
        lines.append(f"  = peak of a training step            {_b(tr['peak_train_bytes_per_rank'])}"
                     "  (held + live-parameter budget + prefetch + activations)")
    if p["zero_stage"] == 3:
        lines.append(f"  peak of a resident evaluation       {_b(tr['peak_eval_resident_bytes_per_rank'])}"
                     "  (the whole backbone gathered; --eval_gather_backbone auto checks free "
                     "memory for it)")
    lines.append("  not counted: " + "; ".join(x for x in p["not_counted"]
                                             if not x.startswith(("ZeRO-3 all-gather", "whole"))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dtvg_ds.plan", description=__doc__.split("\n")[0])
    # The training flags' names; --model and --config are the older spellings.
    ap.add_argument("--model_name_or_path", "--model", dest="model", required=True,
                    help=f"Hub id, local model dir, or a preset: {', '.join(PRESETS)}")
    ap.add_argument("--world_size", type=int, required=True, help="total ranks (GPUs)")
    ap.add_argument("--deepspeed", "--config", dest="config", required=True,
                    help="DeepSpeed JSON (e.g. ds_configs/zero3.json) or a shipped one by name "
                         "(zero3)")
    ap.add_argument("--num_virtual_tokens", type=int, default=100)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--method", choices=["pt", "dtvg", "attempt"], default="pt")
    ap.add_argument("--num_sources", type=int, default=6)
    ap.add_argument("--quantize", choices=["none", "int8", "4bit"], default="none",
                    help="bitsandbytes backbone: int8 (--load_in_8bit) or 4bit (--load_in_4bit)")
    ap.add_argument("--bnb_4bit_quant_storage", choices=["auto", "uint8", "float32", "bfloat16"],
                    default="auto", help="4bit: storage dtype (auto = the model dtype)")
    ap.add_argument("--bnb_4bit_use_double_quant", action="store_true")
    ap.add_argument("--per_device_train_batch_size", type=int, default=8,
                    help="micro batch per rank, for the activations (0 = do not count them)")
    ap.add_argument("--max_source_length", type=int, default=256,
                    help="input tokens before the prompt (padded batch length)")
    ap.add_argument("--max_target_length", type=int, default=16, help="target tokens")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                    help="cpu: DeepSpeed's CPU accelerator (adds the process's own memory)")
    ap.add_argument("--no_presets", action="store_true",
                    help="always read the config (Hub/dir), never a built-in preset")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = ap.parse_args(argv)
    try:
        from dtvg_ds.config import ConfigError, read_ds_config

        try:
            ds = read_ds_config(a.config)
        except ConfigError as e:
            raise PlanError(e.problems[0]) from None
        cfg, preset = load_config(a.model, not a.no_presets)
        out = plan(cfg, a.world_size, ds, a.num_virtual_tokens, a.bf16, a.method, a.num_sources,
                   quantize=a.quantize, quant_storage=a.bnb_4bit_quant_storage,
                   double_quant=a.bnb_4bit_use_double_quant,
                   batch=a.per_device_train_batch_size, source_len=a.max_source_length,
                   target_len=a.max_target_length,
                   gradient_checkpointing=a.gradient_checkpointing, device=a.device)
    except (OSError, json.JSONDecodeError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {"model": a.model, "preset": preset, "config": a.config, **out}
    print(json.dumps(out, indent=2) if a.json else render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
