"""Examples-proportional mixtures with a cap, for multi-source training (generic SPoT, MPT).

T5's examples-proportional mixing samples task k with rate min(n_k, K) / sum_j min(n_j, K): big
tasks do not drown small ones beyond the cap K. As a finite, deterministic list that is: take
min(n_k, K) examples of each task (a seeded subsample when capped), tag each record with its
`task`, and shuffle the union with the seed. The batch stream (`batches.stream_indices`) then
visits tasks at exactly those rates, and resumes exactly, like any other training set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dtvg_ds.data import splits

Record = dict[str, Any]


def mixture_sizes(sizes: Mapping[str, int], cap: int = 0) -> dict[str, int]:
    """Examples each task contributes: min(n_k, cap) (cap 0 = no cap, all examples)."""
    if cap < 0:
        raise ValueError(f"cap must be >= 0, got {cap}")
    return {t: (min(n, cap) if cap else n) for t, n in sizes.items()}


def mixture_rates(sizes: Mapping[str, int], cap: int = 0) -> dict[str, float]:
    """The sampling rate of each task in the mixture (sums to 1)."""
    m = mixture_sizes(sizes, cap)
    total = sum(m.values())
    if total == 0:
        raise ValueError("empty mixture")
    return {t: n / total for t, n in m.items()}


def mix(task_records: Mapping[str, Sequence[Record]], cap: int = 0,
        seed: int = 0) -> list[Record]:
    """One shuffled list of every task's (capped) records, each with a `task` field.

    Deterministic in (`task_records`, `cap`, `seed`); the tasks' order in the mapping does not
    matter. Each task's subsample uses its own seed stream, so adding a task leaves the
    examples chosen from the others unchanged.
    """
    sizes = mixture_sizes({t: len(r) for t, r in task_records.items()}, cap)
    out: list[Record] = []
    for name in sorted(task_records):
        recs = task_records[name]
        chosen = splits.subsample(recs, sizes[name], _task_seed(seed, name))
        out.extend({**r, "task": name} for r in chosen)
    return [out[i] for i in splits.permutation(len(out), seed)]


def _task_seed(seed: int, name: str) -> int:
    # A stable per-task seed (hash() of a str changes with PYTHONHASHSEED; this does not).
    return (seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(name))) % (2**31)


def load_mixture(names: Sequence[str], split: str = "train", data_dir: str = "", cap: int = 0,
                 seed: int = 0, limit_per_task: int = 0, k_shot: int = 0) -> list[Record]:
    """Load `names` (registered tasks, aliases or group names such as "source") and `mix` them.

    `data_dir` holds one sub-folder per task (`<data_dir>/<task>/train.jsonl`, ...). Evaluation
    should stay per task (each has its own metric): load those splits with `Task.load`.
    """
    from dtvg_ds.data.zoo import GROUPS, get_task

    expanded: list[str] = []
    for n in names:
        for t in GROUPS.get(n, (n,)):
            if t not in expanded:
                expanded.append(t)
    recs = {}
    for n in expanded:
        task = get_task(n, data_dir)
        recs[task.name] = task.load(split, data_dir, limit_per_task, seed, k_shot=k_shot)
    return mix(recs, cap, seed)


MIX_SEPARATOR = "+"


class MixtureTask:
    """A multi-task "task" (`--task senti_a+senti_b+...`): trains on the capped mixture, and is
    evaluated per member task with the member's own metric (score = mean of member scores)."""

    metric = "mixture"
    labels = None

    def __init__(self, members: Sequence[str], data_dir: str = "", cap: int = 0):
        from dtvg_ds.data.zoo import get_task

        self.members = tuple(get_task(m, data_dir) for m in members)
        self.name = MIX_SEPARATOR.join(t.name for t in self.members)
        self.cap = cap

    def reads_hub(self, data_dir: str = "") -> bool:
        """True if loading any member goes to the Hub (or its cache)."""
        return any(t.reads_hub(data_dir) for t in self.members)

    def load(self, split: str, data_dir: str = "", limit: int = 0, seed: int = 0,
             k_shot: int = 0) -> list[Record]:
        """Training: the examples-proportional mixture; evaluation: every member's split."""
        if split == "train":
            recs = load_mixture([t.name for t in self.members], "train", data_dir, self.cap, seed,
                                k_shot=k_shot)
            return recs[:limit] if limit else recs
        return [{**r, "task": t.name} for t in self.members
                for r in t.load(split, data_dir, limit, seed)]


def is_mixture(name: str) -> bool:
    """True for `--task a+b+c`."""
    return MIX_SEPARATOR in name
