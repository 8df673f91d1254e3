"""Tokenisation and a deterministic, resumable batch stream.

The training data is an endless stream: epoch e is a permutation of the training set seeded by
(seed, e), and epochs are concatenated. The micro batch that rank k sees at global micro step j
is a pure function of (seed, j, k, world size), so a resumed run needs only the step counter to
continue exactly where it stopped: the data position *is* the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dtvg_ds.data.tasks import Record


@dataclass
class Encoded:
    """Token ids of a split (unpadded lists) and the raw target strings."""

    sources: list[list[int]]
    targets: list[list[int]]
    target_text: list[str]

    def __len__(self) -> int:
        return len(self.sources)


def encode(records: Sequence[Record], tokenizer, max_source_length: int,
           max_target_length: int) -> Encoded:
    """Tokenise sources and targets (truncated, eos appended by the tokenizer)."""
    src = tokenizer([r["source"] for r in records], truncation=True,
                    max_length=max_source_length)["input_ids"]
    tgt = tokenizer([r["target"] for r in records], truncation=True,
                    max_length=max_target_length)["input_ids"]
    return Encoded(list(src), list(tgt), [r["target"] for r in records])


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def collate(enc: Encoded, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A padded batch: input_ids, attention_mask, labels (padding = -100, ignored by the loss)."""
    src = [enc.sources[i] for i in idx]
    ids = _pad(src, pad_id)
    mask = _pad([[1] * len(s) for s in src], 0)
    labels = _pad([enc.targets[i] for i in idx], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions [start, start + count) of the endless epoch-permutation stream over n items."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, off = divmod(pos, n)
        take = min(count - len(out), n - off)
        out += _epoch_perm(n, seed, epoch)[off:off + take].tolist()
        pos += take
    return out


def micro_batch_indices(n: int, seed: int, micro_step: int, micro_batch: int, rank: int,
                        world: int) -> list[int]:
    """Indices of the micro batch rank `rank` trains on at global micro step `micro_step`.

    The global micro batch (micro_batch x world) is one contiguous slice of the stream, so the
    union over ranks is exactly what a single process with the global batch would see.
    """
    start = micro_step * micro_batch * world + rank * micro_batch
    return stream_indices(n, seed, start, micro_batch)
