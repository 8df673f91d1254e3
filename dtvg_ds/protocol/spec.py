"""A protocol file (YAML): the tasks, methods, seeds, budgets and hardware of a paper's tables.

Every key is documented in protocols/README.md; the shipped files under protocols/ are the
recipes. `load` reads one and collects every problem (each naming the key to change) before
anything is planned, like the training flags' validation does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).resolve().parents[1] / "protocols"  # package data -> ../protocols
TOP_KEYS = ("name", "description", "model_name_or_path", "deepspeed", "resources",
            "global_batch_size", "per_device_train_batch_size", "seeds", "stage1_seed",
            "k_shot", "flags", "tasks", "sources", "benchmarks", "stage1", "target_stage1",
            "mpt_source",
            "methods", "published", "test")
RESOURCE_KEYS = ("nodes", "gpus_per_node", "gpu_memory_gib", "sbatch_args")
TASK_KEYS = ("train_rows",)  # besides training flags (lengths, ...)
AUTO = "auto"


class ProtocolError(ValueError):
    """A protocol file with problems; `problems` lists each, naming the key to change."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Resources:
    """What one job runs on. `gpu_memory_gib` > 0 lets `deepspeed: auto` and
    `per_device_train_batch_size: auto` be chosen by the memory planner (dtvg_ds.plan)."""

    nodes: int = 1
    gpus_per_node: int = 1  # ranks per node (CPU processes with DS_ACCELERATOR=cpu)
    gpu_memory_gib: float = 0.0
    sbatch_args: tuple[str, ...] = ()  # e.g. --partition=gpu --time=24:00:00 (SLURM executor)

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Stage:
    """Training flags of one kind of job; `epochs` (if > 0) becomes --max_steps per task from
    the task's `train_rows` and the global batch."""

    flags: dict[str, Any] = field(default_factory=dict)
    epochs: float = 0.0
    global_batch_size: int = 0  # 0 = the protocol's


@dataclass(frozen=True)
class Protocol:
    """A parsed protocol file (see protocols/README.md for every key)."""

    name: str
    path: str
    model_name_or_path: str
    deepspeed: str
    resources: Resources
    global_batch_size: int
    per_device_train_batch_size: int | str
    seeds: tuple[int, ...]
    stage1_seed: int
    k_shot: tuple[int, ...]
    flags: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    sources: tuple[str, ...]
    benchmarks: dict[str, tuple[str, ...]]
    stage1: Stage
    target_stage1: Stage | None  # the targets' own stage 1 (k-shot budgets); default: stage1
    mpt_source: Stage | None
    methods: dict[str, Stage]
    published: dict[str, dict[str, dict[str, float]]]
    test: bool = True
    description: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)  # plan --set: beat every file value

    @property
    def targets(self) -> tuple[str, ...]:
        """Every benchmark task, in file order, each once."""
        return tuple(dict.fromkeys(t for ts in self.benchmarks.values() for t in ts))

    def task_flags(self, task: str) -> dict[str, Any]:
        """Per-task training flags (lengths, ...) without the protocol-only keys."""
        return {k: v for k, v in self.tasks.get(task, {}).items() if k not in TASK_KEYS}

    def train_rows(self, task: str) -> int:
        return int(self.tasks.get(task, {}).get("train_rows", 0))


def resolve_path(name_or_path: str) -> Path:
    """A protocol file as given, or a shipped one by name: `demo` -> protocols/demo.yaml."""
    p = Path(name_or_path)
    if p.is_file() or p.suffix or "/" in name_or_path:
        return p
    return SHIPPED / f"{name_or_path}.yaml"


def load(name_or_path: str, overrides: dict[str, Any] | None = None,
         flags: dict[str, Any] | None = None) -> Protocol:
    """Read and check a protocol file; `overrides` replace top-level or `resources` keys (the
    plan command's --gpus_per_node etc.), `flags` replace training flags of every job (plan
    --set, e.g. a smoke test with max_steps=20). Raises ProtocolError with every problem."""
    from dtvg_ds.config import yaml_mapping

    p = resolve_path(name_or_path)
    if not p.is_file():
        names = ", ".join(sorted(x.stem for x in SHIPPED.glob("*.yaml")))
        raise ProtocolError([f"{name_or_path}: no such protocol file (shipped: {names})"])
    raw = yaml_mapping(p, str(p), ProtocolError)
    for k, v in (overrides or {}).items():
        if k in RESOURCE_KEYS:
            raw.setdefault("resources", {})[k] = v
        else:
            raw[k] = v
    return _parse(raw, p, dict(flags or {}))


def _parse(raw: dict[str, Any], path: Path, flags: dict[str, Any]) -> Protocol:
    probs: list[str] = [f"unknown key {k!r} (known: {', '.join(TOP_KEYS)})"
                        for k in raw if k not in TOP_KEYS]
    res = _mapping(raw, "resources", probs)
    probs += [f"resources.{k}: unknown key (known: {', '.join(RESOURCE_KEYS)})"
              for k in res if k not in RESOURCE_KEYS]
    resources = Resources(int(res.get("nodes", 1)), int(res.get("gpus_per_node", 1)),
                          float(res.get("gpu_memory_gib", 0)),
                          tuple(str(a) for a in res.get("sbatch_args", ()) or ()))
    tasks = {str(t): dict(v or {}) for t, v in _mapping(raw, "tasks", probs).items()}
    benchmarks = {str(b): tuple(str(t) for t in ts or ())
                  for b, ts in _mapping(raw, "benchmarks", probs).items()}
    methods = {str(m): _stage(v, f"methods.{m}", probs)
               for m, v in _mapping(raw, "methods", probs).items()}
    mpt = raw.get("mpt_source")
    micro = raw.get("per_device_train_batch_size", 8)
    proto = Protocol(
        name=str(raw.get("name", path.stem)), path=str(path),
        model_name_or_path=str(raw.get("model_name_or_path", "")),
        deepspeed=str(raw.get("deepspeed", "zero3")), resources=resources,
        global_batch_size=int(raw.get("global_batch_size", 0)),
        per_device_train_batch_size=micro if micro == AUTO else int(micro),
        seeds=tuple(int(s) for s in raw.get("seeds", [42])),
        stage1_seed=int(raw.get("stage1_seed", (raw.get("seeds") or [42])[0])),
        k_shot=tuple(int(k) for k in raw.get("k_shot", [0])),
        flags=dict(raw.get("flags") or {}), tasks=tasks,
        sources=tuple(str(s) for s in raw.get("sources", ())), benchmarks=benchmarks,
        stage1=_stage(raw.get("stage1"), "stage1", probs),
        target_stage1=None if raw.get("target_stage1") is None else
        _stage(raw["target_stage1"], "target_stage1", probs),
        mpt_source=None if mpt is None else _stage(mpt, "mpt_source", probs),
        methods=methods, published=dict(raw.get("published") or {}),
        test=bool(raw.get("test", True)), description=str(raw.get("description", "")),
        overrides=flags)
    probs += _check(proto)
    if probs:
        raise ProtocolError([f"{path}: {p}" for p in probs])
    return proto


def _mapping(raw: dict[str, Any], key: str, probs: list[str]) -> dict[str, Any]:
    v = raw.get(key) or {}
    if not isinstance(v, dict):
        probs.append(f"{key}: must be a mapping")
        return {}
    return v


def _stage(v: Any, where: str, probs: list[str]) -> Stage:
    v = dict(v or {})
    epochs = float(v.pop("epochs", 0) or 0)
    batch = int(v.pop("global_batch_size", 0) or 0)
    for key in ("output_dir", "task", "per_device_train_batch_size",
                "gradient_accumulation_steps"):
        if key in v:
            probs.append(f"{where}.{key}: set by the plan (from global_batch_size and the "
                         "resources), remove it")
    return Stage(v, epochs, batch)


def _check(p: Protocol) -> list[str]:
    """Problems that need the whole protocol (the methods' own checks run per job at plan)."""
    probs = []
    if not p.model_name_or_path:
        probs.append("model_name_or_path is required (a Hub id, a local dir, or 'demo')")
    if p.global_batch_size < 1:
        probs.append("global_batch_size is required (examples per optimizer step, over all GPUs)")
    if p.resources.nodes < 1 or p.resources.gpus_per_node < 1:
        probs.append("resources.nodes and resources.gpus_per_node must be >= 1")
    autos = [k for k, v in (("deepspeed", p.deepspeed),
                            ("per_device_train_batch_size", p.per_device_train_batch_size))
             if v == AUTO]
    if autos and p.resources.gpu_memory_gib <= 0:
        probs.append(f"{' and '.join(autos)}: auto needs resources.gpu_memory_gib (memory per "
                     "GPU; or pass --gpu_memory_gib to plan)")
    if not p.sources:
        probs.append("sources: list the source tasks (stage 1 trains each once)")
    if not p.benchmarks:
        probs.append("benchmarks: map each benchmark name to its target tasks")
    if not p.seeds:
        probs.append("seeds: give at least one seed")
    if any(k < 0 for k in p.k_shot):
        probs.append("k_shot: values are >= 0 (0 = the full training set)")
    for m, st in p.methods.items():
        if "method" not in st.flags:
            probs.append(f"methods.{m}: say which --method it runs (method: dtvg, ...)")
    needs_mpt = any(st.flags.get("method") == "mpt_target" for st in p.methods.values())
    if needs_mpt and p.mpt_source is None:
        probs.append("methods: mpt_target needs an mpt_source: section (the source training)")
    # which tasks each stage's epochs are counted over
    target_s1 = p.target_stage1 or p.stage1
    uses = [("stage1", p.stage1, p.sources), ("mpt_source", p.mpt_source, p.sources),
            ("target_stage1" if p.target_stage1 else "stage1", target_s1, p.targets),
            *((f"methods.{m}", s, p.targets) for m, s in p.methods.items())]
    for where, st, tasks in uses:
        if st is not None and st.epochs > 0:
            missing = [t for t in tasks if p.train_rows(t) < 1]
            if missing:
                probs.append(f"{where}.epochs needs tasks.<task>.train_rows for {missing} "
                             "(or give max_steps instead)")
            if any(k > 0 for k in p.k_shot) and tasks is p.targets:
                probs.append(f"{where}.epochs: k-shot targets have k examples, not "
                             "train_rows; give max_steps (and target_stage1 for their stage 1)")
    return probs
