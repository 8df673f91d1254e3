"""`python -m dtvg_ds.tasks`: list every registered task (name, Hub id, splits, metric).

Options: `--json` prints one JSON object per task instead of the table; `--group NAME` lists
only a task group of the papers (source, glue, superglue, mrqa, others, nlg).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from dtvg_ds.data import splits
from dtvg_ds.data.metrics import PRIMARY
from dtvg_ds.data.zoo import GROUPS, TASKS, Task

_POLICY = {
    splits.HALVE: "Hub validation halved by seed into dev/test",
    splits.HOLDOUT: "1K train held out as dev; Hub {test} = test",
    splits.HUB: "Hub splits",
}


def split_note(task: Task) -> str:
    """How the task's train/validation/test come about, in a few words."""
    if task.hub_id == "demo":
        return "generated"
    if task.hub_id.startswith("local:"):
        return "local files"
    if task.split_policy == splits.HUB:
        return ", ".join(f"{r}={h}" for r, h in task.hub_splits)
    test = dict(task.hub_splits).get("test", "validation")
    return _POLICY[task.split_policy].format(test=test)


def describe(task: Task) -> dict[str, Any]:
    """One task as a JSON-able dict (what the listing prints)."""
    return {"name": task.name, "hub": task.hub, "splits": list(task.splits),
            "split_policy": task.split_policy if task.hub_id != "demo" else "generated",
            "split_note": split_note(task), "metric": task.metric,
            "primary": PRIMARY.get(task.metric, ""), "labels": list(task.labels or []),
            "aliases": list(task.aliases), "description": task.description}


def table(tasks: Sequence[Task]) -> str:
    """The listing as aligned text columns."""
    rows = [("name", "hub id", "splits", "metric", "split policy")]
    for t in tasks:
        name = t.name + (f" ({', '.join(t.aliases)})" if t.aliases else "")
        rows.append((name, t.hub, "/".join(t.splits), f"{t.metric} [{PRIMARY.get(t.metric)}]",
                     split_note(t)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
             for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """Print the registry; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m dtvg_ds.tasks", description=__doc__)
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--group", choices=sorted(GROUPS), help="only this task group")
    args = ap.parse_args(argv)
    names = GROUPS[args.group] if args.group else list(TASKS)
    tasks = [TASKS[n] for n in names]
    if args.json:
        for t in tasks:
            print(json.dumps(describe(t)))
    else:
        print(table(tasks))
        print(f"\n{len(tasks)} tasks. Groups: " +
              "; ".join(f"{g}: {' '.join(ts)}" for g, ts in GROUPS.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
