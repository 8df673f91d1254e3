#!/usr/bin/env python
"""Download every registered Hub task and check it end to end (needs the HuggingFace Hub).

Not run in CI (no machine there reaches the Hub). For each task (default: all non-demo tasks)
it loads "train", "validation" and "test" through `Task.load` exactly as training does, and
checks: every split is non-empty; sources start with the task prefix and targets are strings;
classification targets are valid labels; multi-answer tasks carry their answers; dev and test do
not overlap; the split sizes follow the split policy (halved validation, 1,000 held-out
examples). It prints one line per task with the sizes and a sample, and exits non-zero if any
task failed, naming the failure (a renamed Hub id, a changed schema, ...).

    python scripts/check_hub_tasks.py                 # everything (MRQA/Yelp are large)
    python scripts/check_hub_tasks.py cola rte squad  # some tasks
    python scripts/check_hub_tasks.py --group superglue --seed 42 --json report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtvg_ds.data import splits  # noqa: E402
from dtvg_ds.data.tasks import GROUPS, TASKS, Task, get_task  # noqa: E402


def check_task(task: Task, seed: int) -> dict[str, Any]:
    """Load and check one task; returns a report dict (raises AssertionError on a problem)."""
    t0 = time.time()
    recs = {s: task.load(s, seed=seed) for s in ("train", "validation", "test")}
    sizes = {s: len(r) for s, r in recs.items()}
    for s, rs in recs.items():
        assert rs, f"{s} is empty"
        for r in rs[:2000]:
            assert isinstance(r["source"], str) and isinstance(r["target"], str), (s, r)
            assert r["source"].startswith(task.name + " "), f"{s}: source {r['source'][:80]!r}"
            if task.labels is not None:
                assert r["target"] in task.labels, f"{s}: target {r['target']!r} not a label"
            if task.metric in ("squad", "nlg") and s != "train":
                assert r.get("answers"), f"{s}: no answers in {r['source'][:80]!r}"
    dev = {r["source"] for r in recs["validation"]}
    test = {r["source"] for r in recs["test"]}
    overlap = len(dev & test)
    # Identical inputs can occur twice in a Hub split (e.g. duplicated questions), so only a
    # large overlap means the split logic is wrong.
    assert overlap <= 0.01 * max(1, len(dev)), f"dev/test share {overlap} inputs"
    if task.split_policy == splits.HOLDOUT and not task.train_all_answers:
        assert sizes["validation"] == task.holdout_size, sizes
    if task.split_policy == splits.HALVE and task.name != "multirc":
        assert abs(sizes["validation"] - sizes["test"]) <= 1, sizes
    sample = recs["test"][0]
    return {"task": task.name, "hub": task.hub, "ok": True, "sizes": sizes,
            "seconds": round(time.time() - t0, 1),
            "sample": {"source": sample["source"][:200], "target": sample["target"][:80]}}


def main(argv: list[str] | None = None) -> int:
    """Check the requested tasks; returns the exit code (1 if any failed)."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tasks", nargs="*", help="task names or aliases (default: all Hub tasks)")
    ap.add_argument("--group", choices=sorted(GROUPS), help="check one task group")
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args(argv)
    if args.tasks:
        names = [get_task(n).name for n in args.tasks]
    elif args.group:
        names = list(GROUPS[args.group])
    else:
        names = [n for n, t in TASKS.items() if t.hub_id != "demo"]
    reports = []
    for name in names:
        task = TASKS[name]
        try:
            rep = check_task(task, args.seed)
            print(f"ok    {name:15s} {task.hub:50s} {rep['sizes']} ({rep['seconds']}s)\n"
                  f"      {rep['sample']['source'][:110]!r} -> {rep['sample']['target']!r}",
                  flush=True)
        except Exception as e:  # report every task, then fail at the end
            rep = {"task": name, "hub": task.hub, "ok": False,
                   "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=3)}
            print(f"FAIL  {name:15s} {task.hub:50s} {rep['error']}", flush=True)
        reports.append(rep)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    failed = [r["task"] for r in reports if not r["ok"]]
    print(f"\n{len(reports) - len(failed)}/{len(reports)} tasks ok" +
          (f"; failed: {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
