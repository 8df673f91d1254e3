"""The papers' tables from a protocol's runs: test-split scores of dev-selected prompts.

Every score is the `score` (the task's primary metric, x100) of `<run>/eval/<task>-test.json`,
written by --do_test with the prompt the dev split selected, counted only if the job is done and
verified (`state.verify`). Per task and method: mean ± sample std over seeds. A benchmark
average is computed per seed over the benchmark's tasks (seeds missing a task are left out and
the count says so), then mean ± std over seeds. Published numbers from the protocol file sit
beside ours with the difference.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtvg_ds.evaluation import EVAL_DIR
from dtvg_ds.protocol.graph import Job
from dtvg_ds.protocol.state import DONE, verify


@dataclass
class Cell:
    """The scores of one (cell, row, method): by seed."""

    scores: dict[int, float]
    expected: int  # seeds planned

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.scores.values()) if self.scores else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.scores.values()) if len(self.scores) > 1 else None

    def text(self) -> str:
        if not self.scores:
            return "—"
        s = f"{self.mean:.1f}"
        if self.std is not None:
            s += f" ± {self.std:.1f}"
        if len(self.scores) < self.expected:
            s += f" ({len(self.scores)}/{self.expected} seeds)"
        return s


def collect(jobs: list[Job]) -> dict[tuple[str, str, str], dict[int, float]]:
    """(cell, task, method) -> {seed: test score} of every done, verified, scored job."""
    out: dict[tuple[str, str, str], dict[int, float]] = {}
    for job in jobs:
        if not job.test or verify(job).state != DONE:
            continue
        res = json.loads((Path(job.output_dir) / EVAL_DIR / f"{job.task}-test.json").read_text())
        out.setdefault((job.cell, job.task, job.label), {})[job.seed] = float(res["score"])
    return out


def build(plan: dict[str, Any], jobs: list[Job]) -> list[dict[str, Any]]:
    """The table as rows: one per (cell, benchmark, task or average, method)."""
    scores = collect(jobs)
    seeds = plan["seeds"]
    rows = []
    for cell in plan["cells"]:
        published = plan["published"].get(cell, {})
        for bench, tasks in plan["benchmarks"].items():
            for method in plan["methods"]:
                pub = published.get(method, {})
                for task in tasks:
                    c = Cell(scores.get((cell, task, method), {}), len(seeds))
                    rows.append(_row(cell, bench, task, method, c, pub.get(task)))
                per_seed = {s: statistics.fmean(scores[(cell, t, method)][s] for t in tasks)
                            for s in seeds
                            if all(s in scores.get((cell, t, method), {}) for t in tasks)}
                rows.append(_row(cell, bench, f"{bench} avg", method,
                                 Cell(per_seed, len(seeds)), pub.get(bench)))
    return rows


def _row(cell: str, bench: str, task: str, method: str, c: Cell,
         published: float | None) -> dict[str, Any]:
    diff = None if c.mean is None or published is None else c.mean - float(published)
    return {"cell": cell, "benchmark": bench, "task": task, "method": method,
            "seeds": len(c.scores), "mean": c.mean, "std": c.std, "text": c.text(),
            "published": published, "diff": diff,
            "scores": " ".join(f"s{s}:{v:.2f}" for s, v in sorted(c.scores.items()))}


def markdown(plan: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Per cell: tasks x methods (mean ± std over seeds), then ours vs published."""
    methods = plan["methods"]
    out = [f"# {plan['protocol']}: test scores of dev-selected prompts (x100, mean ± std over "
           f"seeds {', '.join(map(str, plan['seeds']))})", ""]
    for cell in plan["cells"]:
        mine = [r for r in rows if r["cell"] == cell]
        out += [f"## {'full data' if cell == 'full' else cell.replace('k', 'k = ')}", "",
                "| benchmark | task | " + " | ".join(methods) + " |",
                "|---|---|" + "---:|" * len(methods)]
        keys = list(dict.fromkeys((r["benchmark"], r["task"]) for r in mine))
        for bench, task in keys:
            by = {r["method"]: r["text"] for r in mine if (r["benchmark"], r["task"]) ==
                  (bench, task)}
            name = f"**{task}**" if task.endswith(" avg") else task
            out.append(f"| {bench} | {name} | " + " | ".join(by[m] for m in methods) + " |")
        pub = [r for r in mine if r["published"] is not None]
        if pub:
            out += ["", "| method | row | ours | published | ours - published |",
                    "|---|---|---:|---:|---:|"]
            for r in pub:
                d = "—" if r["diff"] is None else f"{r['diff']:+.1f}"
                out.append(f"| {r['method']} | {r['task']} | {r['text']} | "
                           f"{float(r['published']):.1f} | {d} |")
        out.append("")
    return "\n".join(out)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    keys = ["cell", "benchmark", "task", "method", "seeds", "mean", "std", "published", "diff",
            "scores"]
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else (round(r[k], 4) if isinstance(r[k], float)
                                                 else r[k])) for k in keys})
    return buf.getvalue()
