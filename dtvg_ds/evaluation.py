"""Evaluation by generation: every rank decodes its shard of the validation set, rank 0 scores.

Under ZeRO-3 the backbone is gathered once for the whole evaluation when it fits
(`dist.backbone_resident`), so ranks decode locally; otherwise generation runs with
`synced_gpus` and per-layer all-gathers at every decoding step (slower, same predictions).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from dtvg_ds import dist
from dtvg_ds.config import TrainConfig
from dtvg_ds.data import batches, metrics
from dtvg_ds.data.mixtures import MixtureTask
from dtvg_ds.data.zoo import Task
from dtvg_ds.logs import info
from dtvg_ds.model import PromptedSeq2Seq


def resident_ok(policy: str, model: torch.nn.Module) -> bool:
    """Whether to gather the whole backbone for this evaluation (the same answer on all ranks).

    `policy` is --eval_gather_backbone: `always`, `never`, or `auto`, which decides from the
    memory free now: on a GPU, this device's; on the CPU accelerator, the node's RAM, which every
    local rank fills with its own gathered copy. Resident only if every rank's copy fits in 80 %
    of what is free (the rest: generation's own tensors and fragmentation). The decision and its
    figures are logged.
    """
    if policy != "auto":
        return policy == "always"
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
    info(f"decoding: {how}"
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
def generate_all(engine: Any, model: PromptedSeq2Seq, enc: batches.Encoded, tokenizer: Any,
                 batch_size: int, max_new_tokens: int, zero_stage: int, gather_policy: str,
                 ex_tasks: list[str] | None = None, progress: bool = False,
                 ) -> tuple[list[str], bool, list[dict[str, Any]] | None]:
    """(the decoded prediction of every example of `enc`, in order, on every rank; whether the
    backbone was resident; the prompter's per-example records in the same order, e.g. ATTEMPT's
    attention weights, or None). Every rank decodes its shard (examples rank, rank + world, ...)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    rank, world, bs = dist.rank(), dist.world_size(), batch_size
    shard = list(range(rank, len(enc), world))
    # Same number of generate() calls on every rank: under synced ZeRO-3 generation a rank that
    # stopped early would leave the others waiting in an all-gather forever.
    n_calls = math.ceil(math.ceil(len(enc) / world) / bs)
    preds: list[tuple[int, str, dict[str, Any] | None]] = []
    dev = dist.device()
    resident = zero_stage == 3 and resident_ok(gather_policy, model)
    with dist.backbone_resident(engine, model, resident) as res, \
            tqdm(total=len(shard), desc="generating", unit="ex", mininterval=1.0,
                 disable=not (progress and dist.is_main())) as bar:
        synced = zero_stage == 3 and not res
        for i in range(n_calls):
            idx = shard[i * bs:(i + 1) * bs]
            real = len(idx)
            idx = idx or [0]  # a dummy batch keeps this rank in step; its output is dropped
            b = batches.collate(enc, idx, tokenizer.pad_token_id)
            extra = batches.to_device(model.prompter.batch_extras(idx, ex_tasks or []), dev)
            out = model.generate(b["input_ids"].to(dev), b["attention_mask"].to(dev),
                                 max_new_tokens=max_new_tokens, synced_gpus=synced, **extra)
            text = tokenizer.batch_decode(out, skip_special_tokens=True)
            logs = model.prompter.example_log() or [None] * len(idx)
            preds += list(zip(idx[:real], text[:real], logs[:real], strict=True))
            bar.update(real)
    everything = dist.gather_objects(preds)  # collective: every rank sends its predictions
    merged = {i: (text, log) for part in everything for i, text, log in part}
    model.train(was_training)
    logs = [merged[i][1] for i in range(len(enc))]
    return ([merged[i][0] for i in range(len(enc))], bool(res),
            None if all(x is None for x in logs) else logs)


@torch.no_grad()
def evaluate(engine: Any, model: PromptedSeq2Seq, enc: batches.Encoded, task: Task,
             tokenizer: Any, cfg: TrainConfig, zero_stage: int,
             valid_tasks: list[str] | None = None, step: int | None = None) -> dict[str, float]:
    """Generate on every rank's shard, gather predictions, score on rank 0, broadcast. A
    prompter with per-example records (ATTEMPT) gets them appended to
    `<output_dir>/EXAMPLE_LOG` (one line per evaluation, tagged with `step`) and their means
    into the result (`attention_mean/<candidate>`)."""
    t0 = time.time()
    preds, res, logs = generate_all(engine, model, enc, tokenizer, cfg.per_device_eval_batch_size,
                              cfg.generation_max_length, zero_stage, cfg.eval_gather_backbone,
                              valid_tasks)
    result: dict[str, float] = {}
    if dist.is_main():
        result = score(task, list(range(len(enc))), preds, enc, valid_tasks)
        result["eval_seconds"] = result["eval_runtime"] = time.time() - t0  # ours; HF's name
        result["eval_samples_per_second"] = len(preds) / max(result["eval_seconds"], 1e-9)
        result["eval_backbone_resident"] = float(res)
        if logs is not None:
            result |= log_examples(Path(cfg.output_dir) / EXAMPLE_LOG, step, logs, valid_tasks)
    return dist.broadcast_object(result)  # collective: every rank needs the score (best ckpt)


EXAMPLE_LOG = "eval_examples.jsonl"


def log_examples(path: Path, step: int | None, logs: list[dict[str, Any]],
                 ex_tasks: list[str] | None) -> dict[str, float]:
    """Rank 0: append one evaluation's per-example records (ATTEMPT: which candidate prompts
    each validation example attended to) as one JSON line `{"step", "examples": [...]}`;
    returns the mean weight of each candidate (`attention_mean/<name>`) for the metrics log."""
    import json

    rows = [{"example": i, **({"task": ex_tasks[i]} if ex_tasks else {}), **log}
            for i, log in enumerate(logs)]
    with path.open("a") as f:
        f.write(json.dumps({"step": step, "examples": rows}) + "\n")
    weights = [log["attention"] for log in logs if "attention" in log]
    if not weights:
        return {}
    return {f"attention_mean/{k}": sum(w[k] for w in weights) / len(weights) for k in weights[0]}


# ----------------------------------------------------------------------------------------------
# `python -m dtvg_ds.evaluation`: score a saved prompt on any split
# ----------------------------------------------------------------------------------------------

# Settings taken from the run that wrote the artifact (its run_config.json) unless given: the
# same dev/test partition (data_seed), lengths and decoding as during training.
INHERITED = ("data_dir", "data_seed", "metric", "max_source_length", "max_target_length",
             "generation_max_length", "per_device_eval_batch_size", "eval_gather_backbone",
             "cache_dir", "bf16", "deepspeed")
EVAL_DIR = "eval"


def write_scores(out_dir: Path, task: Task | MixtureTask, split: str, recs: list[dict[str, Any]],
                 preds: list[str], logs: list[dict[str, Any]] | None, result: dict[str, float],
                 extra: dict[str, Any]) -> Path:
    """Rank 0: `<out_dir>/<task>-<split>.json` (the scores and what they depend on) and
    `.predictions.jsonl` (source, target, prediction and the prompter's per-example record, if
    any, per example), each written atomically."""
    from dtvg_ds.artifacts import atomic_write_json, write_jsonl_atomic

    stem = f"{task.name}-{split}"
    path = out_dir / f"{stem}.json"
    atomic_write_json(path, {"task": task.name, "split": split, "examples": len(preds),
                             "metric": metric_name(task), "score": result["score"],
                             "metrics": result, **extra})
    rows = [{"source": r["source"], "target": r.get("target"), "prediction": p,
             **({"task": r["task"]} if "task" in r else {}), **(log or {})}
            for r, p, log in zip(recs, preds, logs or [None] * len(preds), strict=True)]
    write_jsonl_atomic(out_dir / f"{stem}.predictions.jsonl", rows)
    return path


def score_split(engine: Any, model: PromptedSeq2Seq, enc: batches.Encoded,
                recs: list[dict[str, Any]], ex_tasks: list[str], task: Task | MixtureTask,
                tokenizer: Any, cfg: TrainConfig, zero_stage: int, out_dir: Path, split: str,
                extra: dict[str, Any], progress: bool = False) -> tuple[dict[str, float], Path]:
    """Decode every example (all ranks), score and write `<out_dir>/<task>-<split>.*` on rank 0
    (`extra` joins the settings recorded); every rank returns (the metrics, the result file)."""
    t0 = time.time()
    preds, res, logs = generate_all(engine, model, enc, tokenizer, cfg.per_device_eval_batch_size,
                                    cfg.generation_max_length, zero_stage,
                                    cfg.eval_gather_backbone, ex_tasks, progress=progress)
    result: dict[str, float] = {}
    path = out_dir / f"{task.name}-{split}.json"
    if dist.is_main():
        result = score(task, list(range(len(enc))), preds, enc, ex_tasks)
        write_scores(out_dir, task, split, recs, preds, logs, result,
                     {**extra, "eval_runtime": round(time.time() - t0, 3),
                      "backbone_resident": res, "zero_stage": zero_stage,
                      **score_settings(cfg, extra.get("backbone", cfg.model_name_or_path))})
    return dist.broadcast_object(result), path  # collective: every rank gets the metrics


def score_settings(cfg: TrainConfig, backbone: str) -> dict[str, Any]:
    """What a score depends on besides the prompt: recorded next to every score."""
    return {"data_seed": cfg.data_seed, "max_source_length": cfg.max_source_length,
            "generation_max_length": cfg.generation_max_length,
            "world_size": dist.world_size(), "backbone": backbone}


def _parser() -> Any:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m dtvg_ds.evaluation",
        description="Score a prompt artifact on a task split (default: its own task's test "
                    "split) with the task's metrics. Sharded like training under a launcher "
                    "(deepspeed --module dtvg_ds.evaluation --deepspeed zero3 ...); a plain "
                    "`python -m` runs one rank. Writes <artifact>/eval/<task>-<split>.json and "
                    ".predictions.jsonl. Settings not given come from the artifact's "
                    "run_config.json (same dev/test partition, lengths, decoding).",
        epilog="exit codes: 0 scored, 2 user error (one 'error:' line each)")
    ap.add_argument("--artifact", required=True, help="prompt artifact dir")
    ap.add_argument("--task", default=None, help="default: the artifact's task")
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ap.add_argument("--model_name_or_path", default=None, help="default: the artifact's backbone")
    ap.add_argument("--mpt_task", default=None, help="MPT source artifacts: whose prompt to use")
    ap.add_argument("--max_eval_samples", type=int, default=0, help="0 = the whole split")
    ap.add_argument("--output_dir", default=None, help=f"default: <artifact>/{EVAL_DIR}")
    ap.add_argument("--allow_in_progress_artifacts", action="store_true",
                    help="score the best-so-far prompt of a run that has not ended (warns)")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    for name in INHERITED:
        kind = TrainConfig.__dataclass_fields__[name].type
        if kind in (bool, "bool"):
            ap.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            ap.add_argument(f"--{name}", type=int if kind in (int, "int") else str, default=None)
    return ap


def _settings(args: Any, art_dir: str) -> TrainConfig:
    """TrainConfig holding the evaluation settings: flag > the run's run_config.json > default."""
    import dataclasses
    import json

    run_file = Path(art_dir) / "run_config.json"
    run = json.loads(run_file.read_text()).get("config", {}) if run_file.is_file() else {}
    vals = {k: run[k] for k in INHERITED if k in run}
    vals.update({k: getattr(args, k) for k in INHERITED if getattr(args, k) is not None})
    return dataclasses.replace(TrainConfig(), **vals)


def score_artifact(args: Any) -> dict[str, Any]:
    """Everything `main` does (all ranks); returns the result written on rank 0."""
    from dtvg_ds import artifacts, inference
    from dtvg_ds.data.mixtures import MIX_SEPARATOR, is_mixture
    from dtvg_ds.data.zoo import get_task
    from dtvg_ds.export import artifact_prompter
    from dtvg_ds.logs import configure_logging

    art = artifacts.load_artifact(args.artifact, args.allow_in_progress_artifacts)
    cfg = _settings(args, args.artifact)
    name = args.task or str(art.meta["task"])
    task = (MixtureTask(name.split(MIX_SEPARATOR), cfg.data_dir) if is_mixture(name)
            else get_task(name, cfg.data_dir, cfg.metric))
    prompter = artifact_prompter(art, args.mpt_task)
    recs = task.load(args.split, cfg.data_dir, args.max_eval_samples, cfg.data_seed)
    inference.start_process_group()
    configure_logging("info", False)  # now that ranks are known: rank 0 logs
    dec = inference.build_decoder(art, prompter, args.model_name_or_path or str(art.meta["backbone"]),
                                  cfg.deepspeed, cfg.bf16, cfg.cache_dir)
    enc = batches.encode(recs, dec.tokenizer, cfg.max_source_length, cfg.max_target_length)
    ex_tasks = [r.get("task", task.name) for r in recs]
    backbone = args.model_name_or_path or str(art.meta["backbone"])
    result, path = score_split(
        dec.engine, dec.model, enc, recs, ex_tasks, task, dec.tokenizer, cfg, dec.zero_stage,
        Path(args.output_dir or Path(args.artifact) / EVAL_DIR), args.split,
        {"artifact": str(Path(args.artifact).resolve()), "backbone": backbone,
         "best_step": art.meta.get("best_metric", {}).get("step")}, progress=True)
    info(f"{task.name} {args.split}: {metric_name(task)} = {result['score']:.4f} on "
         f"{len(enc)} examples -> {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI entry: user errors print one `error:` line and return 2 (`cli.run_tool`)."""
    import sys

    from dtvg_ds.cli import run_tool
    from dtvg_ds.export import ExportError

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_tool(lambda: score_artifact(args), (ExportError,))

if __name__ == "__main__":
    from dtvg_ds.cli import exit_process

    exit_process(main())
