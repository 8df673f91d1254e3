"""Evaluation by generation: every rank decodes its shard of the validation set, rank 0 scores.

Under ZeRO-3 the backbone is gathered once for the whole evaluation when it fits
(`dist.backbone_resident`), so ranks decode locally; otherwise generation runs with
`synced_gpus` and per-layer all-gathers at every decoding step (slower, same predictions).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from dtvg_ds import dist
from dtvg_ds.config import TrainConfig
from dtvg_ds.data import batches, metrics
from dtvg_ds.data.mixtures import MixtureTask
from dtvg_ds.data.tasks import Task
from dtvg_ds.logs import info
from dtvg_ds.model import PromptedSeq2Seq


def _resident_ok(cfg: TrainConfig, model: torch.nn.Module) -> bool:
    """Whether to gather the whole backbone for this evaluation (the same answer on all ranks).

    `auto` decides from the memory free now: on a GPU, this device's; on the CPU accelerator,
    the node's RAM, which every local rank fills with its own gathered copy. Resident only if
    every rank's copy fits in 80 % of what is free (the rest: generation's own tensors and
    fragmentation). The decision and its figures are logged.
    """
    if cfg.eval_gather_backbone != "auto":
        return cfg.eval_gather_backbone == "always"
    from deepspeed.accelerator import get_accelerator

    need = sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size()
               for p in model.parameters())
    free = get_accelerator().available_memory(dist.local_rank())
    sharers = dist.local_world_size() if dist.device().type == "cpu" else 1
    fits = need * sharers <= 0.8 * free
    ok = not dist.any_rank(not fits)  # collective: resident only if it fits on every rank
    gib = 1024 ** 3
    how = "gathering the backbone once (resident)" if ok else \
        "per-layer gathers with synced generation"
    info(f"evaluation: {how}"
         f" - the whole backbone is {need / gib:.2f} GiB per rank"
         + (f" x {sharers} ranks on this node" if sharers > 1 else "")
         + f", {free / gib:.2f} GiB free{' on rank 0' if dist.world_size() > 1 else ''}"
         + ("" if ok else " (needs <= 80 % of it on every rank); "
            "--eval_gather_backbone always/never overrides"))
    return ok


def metric_name(task: Task | MixtureTask) -> str:
    """The name of the number best checkpoints are chosen by."""
    return "mean_task_score" if isinstance(task, MixtureTask) else metrics.PRIMARY[task.metric]


def score(task: Task | MixtureTask, idx: list[int], preds: list[str], enc: batches.Encoded,
          ex_tasks: list[str] | None = None) -> dict[str, float]:
    """Task metric on decoded predictions (all references, MultiRC groups); for a mixture,
    every member's own metric and `score` = their mean."""
    def one(t: Task, sel: list[int]) -> dict[str, float]:
        pos = {i: k for k, i in enumerate(idx)}
        refs = [enc.references[i] if enc.references else enc.target_text[i] for i in sel]
        groups = [enc.groups[i] for i in sel] if enc.groups else None
        return metrics.compute(t.metric, [preds[pos[i]] for i in sel], refs, t.labels, groups)

    if not isinstance(task, MixtureTask):
        return one(task, idx)
    out: dict[str, float] = {}
    for member in task.members:
        sel = [i for i in idx if ex_tasks[i] == member.name]
        for k, v in one(member, sel).items():
            out[f"{member.name}/{k}"] = v
    out["score"] = sum(out[f"{m.name}/score"] for m in task.members) / len(task.members)
    return out


@torch.no_grad()
def evaluate(engine: Any, model: PromptedSeq2Seq, enc: batches.Encoded, task: Task,
             tokenizer: Any, cfg: TrainConfig, zero_stage: int,
             valid_tasks: list[str] | None = None) -> dict[str, float]:
    """Generate on every rank's shard, gather predictions, score on rank 0, broadcast."""
    model.eval()
    rank, world, bs = dist.rank(), dist.world_size(), cfg.per_device_eval_batch_size
    shard = list(range(rank, len(enc), world))
    # Same number of generate() calls on every rank: under synced ZeRO-3 generation a rank that
    # stopped early would leave the others waiting in an all-gather forever.
    n_calls = math.ceil(math.ceil(len(enc) / world) / bs)
    preds: list[tuple[int, str]] = []
    dev = dist.device()
    t0 = time.time()
    with dist.backbone_resident(engine, model, zero_stage == 3 and _resident_ok(cfg, model)) as res:
        synced = zero_stage == 3 and not res
        for i in range(n_calls):
            idx = shard[i * bs:(i + 1) * bs]
            real = len(idx)
            idx = idx or [0]  # a dummy batch keeps this rank in step; its output is dropped
            b = batches.collate(enc, idx, tokenizer.pad_token_id)
            extra = batches.to_device(model.prompter.batch_extras(idx, valid_tasks or []), dev)
            out = model.generate(b["input_ids"].to(dev), b["attention_mask"].to(dev),
                                 max_new_tokens=cfg.generation_max_length, synced_gpus=synced,
                                 **extra)
            text = tokenizer.batch_decode(out, skip_special_tokens=True)
            preds += list(zip(idx[:real], text[:real], strict=True))
    everything = dist.gather_objects(preds)  # collective: every rank sends its predictions
    result: dict[str, float] = {}
    if dist.is_main():
        merged = sorted(p for part in everything for p in part)
        result = score(task, [i for i, _ in merged], [t for _, t in merged], enc, valid_tasks)
        result["eval_seconds"] = result["eval_runtime"] = time.time() - t0  # ours; HF's name
        result["eval_samples_per_second"] = len(merged) / max(result["eval_seconds"], 1e-9)
        result["eval_backbone_resident"] = float(res)
    model.train()
    return dist.broadcast_object(result)  # collective: every rank needs the score (best ckpt)
