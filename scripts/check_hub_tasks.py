#!/usr/bin/env python
"""Check that every registered task loads, formats and scores (needs the HuggingFace Hub).

The one command to run on a machine with Hub access (not run in CI: no machine there reaches
the Hub):

    python scripts/check_hub_tasks.py                 # every non-demo task (MRQA/Yelp are large)
    python scripts/check_hub_tasks.py cola rte squad  # some tasks (names or aliases)
    python scripts/check_hub_tasks.py --group superglue --seed 42 --json report.json
    python scripts/check_hub_tasks.py web_nlg --data_dir DIR   # local files instead of the Hub

For each task it loads every split the task defines ("train", "validation", "test") through
`Task.load` exactly as training does (the whole split: the papers' split policies need it) and
checks: the split is non-empty; sources start with the task's input prefix and targets are
strings; classification targets are valid labels; multi-answer tasks carry their answers; the
first `--rows` records score with the task's metric when the prediction is the gold target (a
finite number; 100 for accuracy / SQuAD-style metrics, >= 99 BLEU for NLG); dev and test do not
overlap; the split sizes follow the split policy (halved validation, 1,000 held-out examples).
It prints a table (one row per task: status, split sizes, the gold score, seconds, the error)
and exits non-zero if any task failed, naming the failure (a renamed Hub id, a changed schema,
a missing parquet export, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtvg_ds.data import metrics, splits  # noqa: E402
from dtvg_ds.data.zoo import GROUPS, TASKS, Task, get_task  # noqa: E402

Record = dict[str, Any]
# Metric families whose primary score is exactly 100 when every prediction is the gold target.
EXACT_ON_GOLD = ("accuracy", "accuracy_f1", "accuracy_macro_f1", "squad")
CHECKED_RECORDS = 2000  # per split, for the per-record checks


class CheckError(AssertionError):
    """One check of one task failed; the message says which split and what."""


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise CheckError(msg)


def default_tasks() -> list[str]:
    """Every registered task except the generated demo tasks."""
    return [n for n, t in TASKS.items() if t.hub_id != "demo"]


def check_records(task: Task, split: str, recs: Sequence[Record]) -> None:
    """The per-record checks of one loaded split."""
    _require(len(recs) > 0, f"{split}: no records")
    prefix = task.input_prefix + " "
    for r in recs[:CHECKED_RECORDS]:
        _require(isinstance(r.get("source"), str) and isinstance(r.get("target"), str),
                 f"{split}: source/target are not strings in {str(r)[:120]}")
        _require(r["source"].startswith(prefix),
                 f"{split}: source {r['source'][:80]!r} does not start with {prefix!r}")
        if task.labels is not None:
            _require(r["target"] in task.labels,
                     f"{split}: target {r['target']!r} is not a label of {task.labels}")
        if task.metric in ("squad", "nlg") and split != "train":
            _require(bool(r.get("answers")), f"{split}: no answers for {r['source'][:80]!r}")


def score_gold(task: Task, split: str, recs: Sequence[Record]) -> float:
    """The task metric on `recs` when each prediction is the record's own target."""
    preds = [r["target"] for r in recs]
    refs = [list(r["answers"]) if r.get("answers") else r["target"] for r in recs]
    groups = [str(r.get("group", "")) for r in recs] if task.metric == "multirc" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn on a sample with a single class
        out = metrics.compute(task.metric, preds, refs, task.labels, groups)
    for k, v in out.items():
        _require(isinstance(v, float), f"{split}: metric value {k}={v!r} is not a float")
    score = out["score"]
    if math.isnan(score):
        # A sample with a single reference value has no correlation (STS-B); anything else is
        # a broken record.
        _require(task.metric == "pearson_spearman" and len(set(preds)) == 1,
                 f"{split}: {task.metric} score is NaN on gold predictions")
    elif task.metric in EXACT_ON_GOLD:
        _require(abs(score - 100.0) < 1e-6,
                 f"{split}: {task.metric} scores {score:.2f}, not 100, on gold predictions")
    elif task.metric == "nlg":
        _require(score >= 99.0, f"{split}: BLEU {score:.2f} < 99 on gold predictions")
    return score


def check_sizes(task: Task, recs: dict[str, list[Record]]) -> None:
    """Cross-split checks: dev/test disjoint, sizes as the split policy makes them."""
    sizes = {s: len(r) for s, r in recs.items()}
    if "validation" in recs and "test" in recs:
        dev = {r["source"] for r in recs["validation"]}
        test = {r["source"] for r in recs["test"]}
        overlap = len(dev & test)
        # Identical inputs can occur twice in a Hub split (e.g. duplicated questions), so only
        # a large overlap means the split logic is wrong.
        _require(overlap <= 0.01 * max(1, len(dev)), f"dev and test share {overlap} inputs")
    if task.split_policy == splits.HOLDOUT and not task.train_all_answers and "train" in recs:
        # small (local) training files hold out half instead of 1,000 (with a warning)
        if sizes["train"] + sizes["validation"] > 2 * task.holdout_size:
            _require(sizes["validation"] == task.holdout_size,
                     f"holdout dev has {sizes['validation']} examples, not {task.holdout_size}")
    if task.split_policy == splits.HALVE and task.name != "multirc" and "test" in recs:
        _require(abs(sizes["validation"] - sizes["test"]) <= 1,
                 f"halved validation gives dev {sizes['validation']} / test {sizes['test']}")


def check_task(task: Task, seed: int = 0, data_dir: str = "", rows: int = 32) -> dict[str, Any]:
    """Load, format and score every split of one task; a report dict (raises on a failure)."""
    t0 = time.time()
    recs: dict[str, list[Record]] = {}
    scores: dict[str, float] = {}
    for split in task.splits:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small local files: "holding out half" is expected
            recs[split] = task.load(split, data_dir, seed=seed)
        check_records(task, split, recs[split])
        scores[split] = score_gold(task, split, recs[split][:max(1, rows)])
    check_sizes(task, recs)
    last = recs[task.splits[-1]][0]
    return {"task": task.name, "hub": task.hub, "ok": True,
            "sizes": {s: len(r) for s, r in recs.items()}, "gold_scores": scores,
            "metric": task.metric, "seconds": round(time.time() - t0, 1),
            "sample": {"source": last["source"][:200], "target": last["target"][:80]}}


def run(names: Sequence[str], seed: int = 0, data_dir: str = "", rows: int = 32,
        checker: Any = check_task) -> list[dict[str, Any]]:
    """Check `names` one by one (a failure never stops the others); the reports."""
    reports = []
    for name in names:
        task = TASKS[name]
        try:
            rep = checker(task, seed=seed, data_dir=data_dir, rows=rows)
        except Exception as e:  # report every task, then fail at the end
            msg = " ".join(str(e).split())
            rep = {"task": name, "hub": task.hub, "ok": False, "metric": task.metric,
                   "error": f"{type(e).__name__}: {msg}",
                   "traceback": traceback.format_exc(limit=3)}
        print(f"{'ok  ' if rep['ok'] else 'FAIL'}  {name}", file=sys.stderr, flush=True)
        reports.append(rep)
    return reports


def table(reports: Sequence[dict[str, Any]]) -> str:
    """The reports as aligned text: task, status, split sizes, gold score, seconds, error."""
    head = ("task", "status", "train/validation/test", "metric: gold score", "s", "hub / error")
    lines = [head]
    for r in reports:
        if r["ok"]:
            sizes = "/".join(str(r["sizes"].get(s, "-")) for s in splits_order(r["sizes"]))
            gold = ", ".join(f"{v:.1f}" for v in r["gold_scores"].values())
            lines.append((r["task"], "ok", sizes, f"{r['metric']}: {gold}", str(r["seconds"]),
                          r["hub"]))
        else:
            lines.append((r["task"], "FAIL", "-", r["metric"], "-", r["error"]))
    widths = [max(len(x[i]) for x in lines) for i in range(len(head) - 1)]
    out = ["  ".join(c.ljust(w) for c, w in zip(x[:-1], widths, strict=True)) + "  " + x[-1]
           for x in lines]
    return "\n".join([out[0], "-" * len(out[0])] + out[1:])


def splits_order(sizes: dict[str, int]) -> list[str]:
    return [s for s in ("train", "validation", "test") if s in sizes]


def main(argv: Sequence[str] | None = None) -> int:
    """Check the requested tasks, print the table; returns the exit code (1 if any failed)."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tasks", nargs="*", help="task names or aliases (default: all non-demo)")
    ap.add_argument("--group", choices=sorted(GROUPS), help="check one task group")
    ap.add_argument("--seed", type=int, default=0, help="split seed (--data_seed)")
    ap.add_argument("--data_dir", default="", help="read local files in the Hub schema instead")
    ap.add_argument("--rows", type=int, default=32, help="records scored per split")
    ap.add_argument("--json", help="also write the reports to this file")
    args = ap.parse_args(argv)
    if args.tasks:
        names = [get_task(n).name for n in args.tasks]
    elif args.group:
        names = list(GROUPS[args.group])
    else:
        names = default_tasks()
    reports = run(names, args.seed, args.data_dir, args.rows)
    print(table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    failed = [r["task"] for r in reports if not r["ok"]]
    print(f"\n{len(reports) - len(failed)}/{len(reports)} tasks ok" +
          (f"; failed: {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
