"""Task interface and registry: name -> (loader, text-to-text formatter, metric, splits).

A task yields records `{"source": str, "target": str}`. Built-in demo tasks are generated
(no download); Hub tasks load with `datasets.load_dataset` by their Hub id, or from local files
in the same schema with `--data_dir` (json/jsonl/csv/parquet, one file per split); any other
name with `--data_dir` reads files that already have `source`/`target` columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtvg_ds.data import demo

Record = dict[str, str]
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class TaskError(ValueError):
    """Unknown task, missing split or unusable data; the message names the fix."""


@dataclass(frozen=True)
class Task:
    """A text-to-text task."""

    name: str
    metric: str                          # key of data.metrics.METRICS
    hub_id: str                          # "demo" for generated tasks, else "path[/subset]"
    splits: tuple[str, ...] = ("train", "validation")
    labels: tuple[str, ...] | None = None   # valid target strings (classification)
    description: str = ""
    format: Callable[[dict[str, Any]], Record] | None = field(default=None, compare=False)

    def load(self, split: str, data_dir: str = "", limit: int = 0, seed: int = 0) -> list[Record]:
        """Records of `split` (all of them, or the first `limit`)."""
        if split not in self.splits:
            raise TaskError(f"task {self.name!r} has no split {split!r} (splits: {self.splits})")
        if self.hub_id == "demo":
            size = DEMO_SPLIT_SIZES[split] if not limit else limit
            recs = demo.generate(self.name, size, demo.split_seed(split, seed))
        else:
            rows = _load_rows(self, split, data_dir)
            fmt = self.format or _passthrough
            recs = [fmt(r) for r in rows]
        if limit:
            recs = recs[:limit]
        if not recs:
            raise TaskError(f"task {self.name!r}, split {split!r}: no examples; check --data_dir "
                            "or --max_train_samples/--max_eval_samples")
        return recs


DEMO_SPLIT_SIZES = {"train": 4000, "validation": 400, "test": 400}


def _passthrough(row: dict[str, Any]) -> Record:
    if "source" not in row or "target" not in row:
        raise TaskError(f"row has columns {sorted(row)}; local files of an unregistered task "
                        "need 'source' and 'target' columns")
    return {"source": str(row["source"]), "target": str(row["target"])}


def _local_file(data_dir: str, split: str) -> Path | None:
    for ext in FILE_FORMATS:
        p = Path(data_dir) / f"{split}{ext}"
        if p.is_file():
            return p
    return None


def _load_rows(task: Task, split: str, data_dir: str) -> list[dict[str, Any]]:
    import datasets

    if data_dir:
        f = _local_file(data_dir, split)
        if f is None:
            raise TaskError(f"--data_dir {data_dir}: no {split}.{{jsonl,json,csv,parquet}} for "
                            f"task {task.name!r}")
        ds = datasets.load_dataset(FILE_FORMATS[f.suffix], data_files={split: str(f)}, split=split)
    else:
        path, _, subset = task.hub_id.partition("/")
        try:
            ds = datasets.load_dataset(path, subset or None, split=split)
        except Exception as e:  # offline, unknown id, ...: one clear line
            raise TaskError(f"task {task.name!r}: could not load {task.hub_id!r} from the Hub "
                            f"({type(e).__name__}); pass --data_dir with local files") from None
    return [dict(r) for r in ds]


def _kv(prefix: str, keys: Sequence[str], label: str = "label") -> Callable[[dict], Record]:
    """The ATTEMPT/DTVG input format: "<task> key1: value1 key2: value2" -> label index."""
    def fmt(row: dict[str, Any]) -> Record:
        body = " ".join(f"{k}: {row[k]}" for k in keys)
        return {"source": f"{prefix} {body}", "target": str(row[label])}
    return fmt


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task to the registry (name must be new)."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    TASKS[task.name] = task
    return task


for _name, _spec in demo.DEMO_TASKS.items():
    register(Task(name=_name, metric="accuracy", hub_id="demo",
                  splits=("train", "validation", "test"), labels=demo.LABEL_WORDS,
                  description=_spec.description))

register(Task("sst2", "accuracy", "glue/sst2", labels=("0", "1"),
              description="GLUE SST-2 sentiment", format=_kv("sst2", ["sentence"])))
register(Task("rte", "accuracy", "glue/rte", labels=("0", "1"),
              description="GLUE RTE entailment", format=_kv("rte", ["sentence1", "sentence2"])))
register(Task("mrpc", "accuracy_f1", "glue/mrpc", labels=("0", "1"),
              description="GLUE MRPC paraphrase", format=_kv("mrpc", ["sentence1", "sentence2"])))
register(Task("cola", "matthews", "glue/cola", labels=("0", "1"),
              description="GLUE CoLA acceptability", format=_kv("cola", ["sentence"])))
register(Task("boolq", "accuracy", "super_glue/boolq", labels=("0", "1"),
              description="SuperGLUE BoolQ", format=_kv("boolq", ["question", "passage"])))


def get_task(name: str, data_dir: str = "") -> Task:
    """The registered task, or a generic source/target task over `--data_dir` files."""
    if name in TASKS:
        return TASKS[name]
    if data_dir:
        if not Path(data_dir).is_dir():
            raise TaskError(f"--data_dir {data_dir}: no such directory")
        return Task(name=name, metric="accuracy", hub_id=f"local:{data_dir}",
                    description="local source/target files")
    raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)} "
                    "(or pass --data_dir with source/target files)")
