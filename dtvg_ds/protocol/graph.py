"""From a protocol to its jobs: flags, output dirs, ranks and dependencies.

Jobs, in dependency order:
- `stage1-<source>`: prompt tuning of each source on its full data, once (seed `stage1_seed`);
- `pt-<target>-<cell>-s<seed>`: stage 1 of a target (k-shot in a few-shot cell) per seed. It is
  the target's task prompt vector *and* the vanilla-PT row of the table, so it is not run twice;
- `mpt_source`: MPT's source training on the mixture of the sources (if a method needs it);
- `<method>-<target>-<cell>-s<seed>`: every stage-2 method of the protocol. Its stage-1 inputs
  follow from the method's registry entry (`MethodSpec.inputs`): DTVG/SPoT read the target's
  and the sources' stage-1 artifacts, MPT the `mpt_source` run.

A cell is `full` or `k<k>`; the seed is both `--seed` and `--data_seed` (the k-shot sample).
The global batch is fixed by the protocol; each job's accumulation is derived from its ranks and
micro batch, so the same protocol trains the same thing on 2 or 64 GPUs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dtvg_ds.config import ConfigError, parse_config
from dtvg_ds.data.mixtures import MIX_SEPARATOR
from dtvg_ds.methods import REGISTRY
from dtvg_ds.methods import validate as validate_method
from dtvg_ds.protocol.spec import AUTO, Protocol, ProtocolError, Stage

PLAN_FILE = "plan.json"
PT_LABEL = "pt"  # the table's row for the targets' own stage-1 runs


@dataclass
class Job:
    """One training run of the protocol."""

    id: str
    kind: str  # "stage1" (a source), "target" (a target's stage 1 = PT), "mpt_source", "method"
    label: str  # the table row: pt, dtvg, spot, mpt, an ablation ... ("" for sources)
    task: str
    method: str  # --method
    cell: str  # "full" or "k<k>" ("" for jobs shared by all cells)
    seed: int
    flags: dict[str, Any]  # every training flag, as --name value
    deps: list[str] = field(default_factory=list)
    ranks: int = 1
    nodes: int = 1
    test: bool = False  # scores the test split at the end (--do_test)
    recipe: dict[str, Any] = field(default_factory=dict)  # what `auto` chose, and why
    global_batch: int = 0  # examples per optimizer step over all ranks

    @property
    def output_dir(self) -> str:
        return str(self.flags["output_dir"])

    def argv(self) -> list[str]:
        """The job's training flags as a command line for dtvg_ds.train."""
        return to_argv(self.flags)


def to_argv(flags: dict[str, Any]) -> list[str]:
    """{name: value} -> ['--name', 'value', ...]; True -> '--name', False -> '--name false'."""
    out: list[str] = []
    for k, v in flags.items():
        if isinstance(v, bool):
            out += [f"--{k}"] if v else [f"--{k}", "false"]
        elif isinstance(v, (list, tuple)):
            out += [f"--{k}", *(str(x) for x in v)]
        else:
            out += [f"--{k}", str(v)]
    return out


def cell_name(k: int) -> str:
    return "full" if k == 0 else f"k{k}"


def build(p: Protocol, out: Path) -> list[Job]:
    """Every job of the protocol, dependencies first. Each job's flags are checked with the
    training CLI's own validation (all problems at once, each with its job)."""
    runs = out / "runs"
    jobs: list[Job] = []

    def add(job_id: str, kind: str, label: str, task: str, stage: Stage, seed: int, k: int,
            lengths_of: list[str], extra: dict[str, Any], deps: list[str], test: bool) -> Job:
        flags: dict[str, Any] = {"model_name_or_path": p.model_name_or_path,
                                 "deepspeed": p.deepspeed, **p.flags}
        merged: dict[str, Any] = {}
        for t in lengths_of:  # per-task lengths; a mixture takes the largest of its tasks
            for key, v in p.task_flags(t).items():
                merged[key] = max(merged.get(key, v), v) if key.startswith("max_") else v
        flags.update(stage.flags)
        flags.update(merged)  # a task's own lengths win over the stage's
        flags.update(p.overrides)
        flags.update({"task": task, "output_dir": str(runs / job_id), "seed": seed,
                      "data_seed": seed, **extra})
        if k:
            flags["k_shot"] = k
        if test:
            flags["do_test"] = True
        batch = stage.global_batch_size or p.global_batch_size
        if stage.epochs > 0 and "max_steps" not in p.overrides:
            rows = sum(p.train_rows(t) for t in lengths_of)
            flags["max_steps"] = max(1, math.ceil(stage.epochs * rows / batch))
        job = Job(job_id, kind, label, task, str(flags.get("method", "pt")),
                  cell_name(k) if kind in ("target", "method") else "", seed, flags, deps,
                  p.resources.ranks, p.resources.nodes, test, global_batch=batch)
        jobs.append(job)
        return job

    s1 = p.stage1.flags.get("method", "pt")
    if s1 != "pt":
        raise ProtocolError([f"{p.path}: stage1.method must be pt (got {s1!r})"])
    sources = [add(f"stage1-{s}", "stage1", "", s, p.stage1, p.stage1_seed, 0, [s],
                   {"method": "pt"}, [], False) for s in p.sources]
    src_dirs = [j.output_dir for j in sources]
    mpt_job = None
    if p.mpt_source is not None:
        mix = MIX_SEPARATOR.join(p.sources)
        mpt_job = add("mpt_source", "mpt_source", "", mix, p.mpt_source, p.stage1_seed, 0,
                      list(p.sources), {"method": "mpt_source", "source_tpvs": src_dirs},
                      [j.id for j in sources], False)
    for k in p.k_shot:
        for t in p.targets:
            for seed in p.seeds:
                tag = f"{t}-{cell_name(k)}-s{seed}"
                target = add(f"{PT_LABEL}-{tag}", "target", PT_LABEL, t,
                             p.target_stage1 or p.stage1, seed, k, [t],
                             {"method": "pt"}, [], p.test)
                # a target that is also a source (GLUE's MNLI, ...) never transfers from itself
                others = [j for j in sources if j.task != t]
                for label, st in p.methods.items():
                    extra, deps = _inputs(st.flags["method"], target, others, mpt_job)
                    add(f"{label}-{tag}", "method", label, t, st, seed, k, [t], extra, deps,
                        p.test)
    _check_jobs(p, jobs)
    return jobs


def _inputs(method: str, target: Job, sources: list[Job],
            mpt_job: Job | None) -> tuple[dict[str, Any], list[str]]:
    """The stage-1 flags and dependencies of a stage-2 method, from its registry entry."""
    spec = REGISTRY.get(method)
    if spec is None or spec.inputs == "none":
        return {}, []
    if spec.inputs == "tpvs":
        return ({"target_tpv": target.output_dir,
                 "source_tpvs": [j.output_dir for j in sources]},
                [target.id, *(j.id for j in sources)])
    assert mpt_job is not None  # spec._check: mpt_target needs the mpt_source section
    return {"mpt_source": mpt_job.output_dir}, [mpt_job.id]


def _check_jobs(p: Protocol, jobs: list[Job]) -> None:
    """Batch arithmetic, the memory recipe, then each job's flags through the training CLI."""
    probs: list[str] = []
    for job in jobs:
        probs += _batch(p, job)
    if not probs:
        for job in jobs:
            try:
                parse_config(job.argv(), checks=[validate_method])
            except ConfigError as e:
                probs += [f"job {job.id}: {x}" for x in e.problems]
    if probs:
        raise ProtocolError([f"{p.path}: {x}" for x in dict.fromkeys(probs)])


def _batch(p: Protocol, job: Job) -> list[str]:
    """Set the job's micro batch and accumulation so that micro x accumulation x ranks is the
    protocol's global batch: the file's per_device_train_batch_size is the most a GPU takes at
    once (`auto`: sized by the memory planner)."""
    if p.deepspeed == AUTO or p.per_device_train_batch_size == AUTO:
        from dtvg_ds.protocol.recipe import choose

        try:
            job.recipe = choose(p, job.flags, job.ranks, job.global_batch, job.method)
        except ValueError as e:
            return [f"job {job.id}: {e}"]
        job.flags["deepspeed"] = job.recipe["deepspeed"]
        micro = job.recipe["per_device_train_batch_size"]
    else:  # the largest micro batch up to the file's that splits the rank's share evenly
        share = job.global_batch // job.ranks
        micro = max([m for m in range(1, int(p.per_device_train_batch_size) + 1)
                     if share % m == 0] or [1])
    if job.global_batch % (micro * job.ranks):
        return [f"global_batch_size {job.global_batch} cannot be split over {job.ranks} ranks "
                f"(resources.nodes x resources.gpus_per_node) with a micro batch of at most "
                f"{p.per_device_train_batch_size}; make it a multiple of the ranks"]
    job.flags["per_device_train_batch_size"] = micro
    job.flags["gradient_accumulation_steps"] = job.global_batch // (micro * job.ranks)
    return []


def write(out: Path, p: Protocol, jobs: list[Job]) -> Path:
    """plan.json: the protocol's resolved settings and every job (atomic)."""
    from dtvg_ds.artifacts import atomic_write_json

    path = out / PLAN_FILE
    atomic_write_json(path, {"protocol": p.name, "protocol_file": p.path,
                             "benchmarks": {b: list(ts) for b, ts in p.benchmarks.items()},
                             "published": p.published, "seeds": list(p.seeds),
                             "cells": [cell_name(k) for k in p.k_shot],
                             "methods": [PT_LABEL, *p.methods],
                             "jobs": [asdict(j) for j in jobs]})
    return path


def read(out: Path) -> tuple[dict[str, Any], list[Job]]:
    """(plan.json without the jobs, the jobs) of a planned protocol dir."""
    import json

    path = out / PLAN_FILE
    if not path.is_file():
        raise ProtocolError([f"{out}: no {PLAN_FILE}; plan it first: python -m dtvg_ds.protocol "
                             f"plan <protocol.yaml> --out {out}"])
    plan = json.loads(path.read_text())
    return plan, [Job(**j) for j in plan.pop("jobs")]
