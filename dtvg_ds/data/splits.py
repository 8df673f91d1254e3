"""The papers' splits, few-shot sampling and sub-sampling, all deterministic in a seed.

Split policies (ATTEMPT/MPT/DTVG protocol; docs/algorithms.md, "Tasks, formats, splits and
metrics"):

- ``halve`` (datasets under ~10K examples, no labelled test set): the Hub validation split is
  shuffled with the seed and halved; the first half is our "validation" (dev, used for
  best-checkpoint selection), the second half our "test". Training data is the Hub train split.
- ``holdout`` (larger datasets): 1,000 training examples, chosen by the seeded shuffle, are held
  out as "validation"; the rest is "train"; the Hub validation (or test) split is our "test".
  Tasks whose training rows come in groups sharing one input (CommonGen: several target
  sentences per concept set) hold out 1,000 whole groups instead, so that no dev input is
  also a training input (:func:`holdout_group_indices`).
- ``hub``: the Hub's own splits (MNLI matched/mismatched, PAWS, E2E, WebNLG).

The shuffle is `torch.randperm(n)` under a `torch.Generator` seeded with the seed, as in the
published ATTEMPT code, so the same seed and the same Hub data give the same dev/test halves.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")

HALVE, HOLDOUT, HUB = "halve", "holdout", "hub"
POLICIES = (HALVE, HOLDOUT, HUB)
HOLDOUT_SIZE = 1000
FEW_SHOT_K = (4, 16, 32)  # the papers' few-shot settings; any k > 0 is accepted


def permutation(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) (ATTEMPT's `shuffled_indices`)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g).tolist()


def halve_indices(n: int, seed: int, part: str) -> list[int]:
    """Row indices of the dev ("validation") or "test" half of an n-row validation split.

    The dev half is the first n // 2 of the seeded permutation, as in ATTEMPT.
    """
    perm = permutation(n, seed)
    if part == "validation":
        return perm[:n // 2]
    if part == "test":
        return perm[n // 2:]
    raise ValueError(f"halve: part must be 'validation' or 'test', got {part!r}")


def holdout_indices(n: int, seed: int, part: str, size: int = HOLDOUT_SIZE,
                    unit: str = "rows") -> list[int]:
    """Row indices of the held-out dev set ("validation") or the remaining "train" rows.

    When the training file is too small to spare `size` rows (a small local sample), half of it
    is held out instead, with a warning, so that both parts stay non-empty.
    """
    if n <= 2 * size:
        warnings.warn(f"only {n} training {unit}: holding out {n // 2} (not {size}) as the dev "
                      "set", stacklevel=3)
        size = n // 2
    perm = permutation(n, seed)
    if part == "validation":
        return perm[:size]
    if part == "train":
        return perm[size:]
    raise ValueError(f"holdout: part must be 'validation' or 'train', got {part!r}")


def holdout_group_indices(keys: Sequence[Hashable], seed: int, part: str,
                          size: int = HOLDOUT_SIZE) -> list[int]:
    """Row indices of the held-out dev groups ("validation") or of the remaining "train" rows.

    `keys[i]` is the group of row i (CommonGen's `concept_set_idx`). The distinct groups, in
    order of first appearance, are shuffled with the seed exactly as rows are in
    :func:`holdout_indices`; the first `size` groups are the dev set, and every row of a group
    goes to the side of its group. Rows come out group by group in that shuffled order. With
    `2 * size` groups or fewer, half of the groups are held out, with a warning.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    order = list(groups)
    chosen = holdout_indices(len(order), seed, part, size, "groups")  # shuffled as rows are
    return [i for g in chosen for i in groups[order[g]]]


def subsample(items: Sequence[T], limit: int, seed: int, shuffled: bool = False) -> list[T]:
    """At most `limit` items (0 = all): a prefix of a seeded shuffle, so limits are nested.

    `shuffled=True` means `items` already come in a seeded random order (a split made by
    :func:`halve_indices` / :func:`holdout_indices`), and the prefix is taken as is, exactly as
    ATTEMPT's `subsample(dataset, n_obs, indices)`.
    """
    if not limit or limit >= len(items):
        return list(items)
    if shuffled:
        return list(items[:limit])
    return [items[i] for i in permutation(len(items), seed)[:limit]]


def few_shot(records: Sequence[dict[str, Any]], k: int, seed: int,
             labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """k training examples, seeded; label-balanced when `labels` is given.

    Balanced: the labels take turns (in `labels` order), each contributing its next example in
    seeded random order, until k are chosen; a label that runs out drops from the rotation, so
    CB with k = 4 gets 2/1/1. Records whose target is not a label are never chosen. Without
    labels (QA, NLG) it is a seeded random sample. k larger than the data returns everything.
    """
    if k <= 0:
        raise ValueError(f"k_shot must be positive, got {k}")
    # A seed stream of its own, so that k-shot samples do not coincide with the dev split.
    perm = permutation(len(records), seed + 104_729)
    if labels is None:
        return [records[i] for i in perm[:k]]
    buckets: dict[str, list[int]] = {lab: [] for lab in labels}
    for i in perm:
        t = records[i]["target"]
        if t in buckets:
            buckets[t].append(i)
    chosen: list[int] = []
    pos = dict.fromkeys(buckets, 0)
    while len(chosen) < k and any(pos[lab] < len(buckets[lab]) for lab in buckets):
        for lab in buckets:
            if len(chosen) == k:
                break
            if pos[lab] < len(buckets[lab]):
                chosen.append(buckets[lab][pos[lab]])
                pos[lab] += 1
    return [records[i] for i in chosen]
