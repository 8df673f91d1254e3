"""`deepspeed: auto` / `per_device_train_batch_size: auto`: the memory planner picks them per job.

For the job's GPU memory, ranks, lengths and prompt, `dtvg_ds.plan.plan` models each rank's
peak of a training step. The first ZeRO config (in the order below: less communication first)
with the largest micro batch that divides the per-rank share of the global batch and keeps the
modelled peak under `HEADROOM` of the GPU's memory wins; accumulation makes up the rest.
"""

from __future__ import annotations

import math
from typing import Any

from dtvg_ds.config import read_ds_config
from dtvg_ds.protocol.spec import AUTO, Protocol

CANDIDATES = ("zero2", "zero3", "zero3_offload")  # whole backbone first: no per-layer gathers
HEADROOM = 0.85  # the planner leaves out allocator fragmentation, the CUDA context, buffers
GIB = 2**30
_PEAKS: dict[tuple[Any, ...], float] = {}
_SHAPES: dict[str, list[tuple[str, int]]] = {}


def micro_batches(per_rank: int) -> list[int]:
    """Divisors of the per-rank batch share that are powers of two, largest first (and the
    share itself if it is not one)."""
    sizes = {per_rank} | {2**i for i in range(int(math.log2(max(per_rank, 1))) + 1)
                          if per_rank % 2**i == 0}
    return sorted(sizes, reverse=True)


def choose(p: Protocol, f: dict[str, Any], ranks: int, global_batch: int,
           method: str) -> dict[str, Any]:
    """{'deepspeed', 'per_device_train_batch_size', 'peak_train_gib', 'gpu_memory_gib',
    'planner'} for a job with training flags `f` on `ranks` ranks; raises ValueError when
    nothing fits (naming what to change)."""
    from dtvg_ds.plan import PlanError, load_config, meta_model, param_shapes, plan

    try:
        config, _ = load_config(p.model_name_or_path)
    except PlanError as e:
        raise ValueError(str(e)) from None
    if p.model_name_or_path not in _SHAPES:  # building the meta model costs seconds at XL
        _SHAPES[p.model_name_or_path] = param_shapes(config, meta_model(config))
    per_rank = max(global_batch // ranks, 1)
    configs = CANDIDATES if p.deepspeed == AUTO else (p.deepspeed,)
    micros = (micro_batches(per_rank) if p.per_device_train_batch_size == AUTO
              else [int(p.per_device_train_batch_size)])
    budget = p.resources.gpu_memory_gib * GIB * HEADROOM
    method = "dtvg" if method == "dtvg" else "pt"  # the planner models these two prompts
    n_src = len(f.get("source_tpvs", ())) or 1
    lens = (int(f.get("num_virtual_tokens", 100)), bool(f.get("bf16", False)),
            int(f.get("max_source_length", 256)), int(f.get("max_target_length", 16)),
            bool(f.get("gradient_checkpointing")))

    def peak(name: str, micro: int) -> float:
        key = (p.model_name_or_path, name, ranks, micro, method, n_src, *lens)
        if key not in _PEAKS:  # jobs of a protocol share most keys
            try:
                _PEAKS[key] = plan(config, ranks, read_ds_config(name), lens[0], lens[1],
                                   method, n_src, shapes=_SHAPES[p.model_name_or_path],
                                   batch=micro, source_len=lens[2], target_len=lens[3],
                                   gradient_checkpointing=lens[4],
                                   )["transient"]["peak_train_bytes_per_rank"]
            except PlanError:
                _PEAKS[key] = math.inf
        return _PEAKS[key]

    for name in configs:
        if peak(name, micros[-1]) > budget:  # not even the smallest micro batch fits
            continue
        micro = next(m for m in micros if peak(name, m) <= budget)
        return {"deepspeed": name, "per_device_train_batch_size": micro,
                "peak_train_gib": round(peak(name, micro) / GIB, 2),
                "gpu_memory_gib": p.resources.gpu_memory_gib,
                "planner": f"python -m dtvg_ds.plan --model_name_or_path "
                           f"{p.model_name_or_path} --world_size {ranks} --deepspeed {name} "
                           f"--per_device_train_batch_size {micro} --max_source_length {lens[2]} "
                           f"--max_target_length {lens[3]}" + " --bf16" * lens[1]}
    raise ValueError(f"no ZeRO config of {list(configs)} with a micro batch of "
                     f"{micros[-1]}..{micros[0]} fits {p.resources.gpu_memory_gib} GiB per GPU "
                     f"(x{HEADROOM} headroom); add GPUs (resources.gpus_per_node/nodes), set "
                     "gradient_checkpointing: true in flags, or shorten max_source_length")
