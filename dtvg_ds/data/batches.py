"""Tokenisation and a deterministic, resumable batch stream.

The training data is an endless stream: epoch e is a permutation of the training set seeded by
(seed, e), and epochs are concatenated. The micro batch that rank k sees at global micro step j
is a pure function of (seed, j, k, world size), so a resumed run needs only the step counter to
continue exactly where it stopped: the data position *is* the step.

`encode_cached` is `encode` with an on-disk cache (safetensors + JSON, never pickle): rank 0
tokenises (with a progress bar) and writes, the other ranks wait at a barrier and read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtvg_ds.data.tasks import Record


@dataclass
class Encoded:
    """Token ids of a split (unpadded lists) and the raw target strings.

    `references[i]` holds every acceptable answer / reference of example i (the record's
    "answers", else its target) and `groups[i]` its MultiRC question ("" elsewhere): pass them
    to `metrics.compute(..., refs, labels, groups=...)`.
    """

    sources: list[list[int]]
    targets: list[list[int]]
    target_text: list[str]
    references: list[list[str]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sources)


def encode(records: Sequence[Record], tokenizer, max_source_length: int,
           max_target_length: int) -> Encoded:
    """Tokenise sources and targets (truncated, eos appended by the tokenizer)."""
    src = tokenizer([r["source"] for r in records], truncation=True,
                    max_length=max_source_length)["input_ids"]
    tgt = tokenizer([r["target"] for r in records], truncation=True,
                    max_length=max_target_length)["input_ids"]
    return Encoded(list(src), list(tgt), [r["target"] for r in records],
                   [_references(r) for r in records], [str(r.get("group", "")) for r in records])


def _references(r: Record) -> list[str]:
    ans = r.get("answers")
    return [str(a) for a in ans] if ans else [r["target"]]


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def to_device(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a batch on `dev`."""
    return {k: v.to(dev) for k, v in batch.items()}


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


# ----------------------------------------------------------------------------------------------
# tokenisation cache
# ----------------------------------------------------------------------------------------------

CACHE_VERSION = 1
_CHUNK = 2048  # records tokenised per progress-bar step


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    h = hashlib.sha256()
    parts = [type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")),
             str(len(tokenizer)), str(getattr(tokenizer, "all_special_ids", ""))]
    h.update("\x1f".join(parts).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: the whole vocabulary + rules as JSON
        h.update(backend.to_str().encode())
    return h.hexdigest()


def cache_digest(records: Sequence[Record], tokenizer: Any, max_source_length: int,
                 max_target_length: int) -> str:
    """Content hash of everything the encoded result depends on."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{max_source_length}|{max_target_length}|".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for r in records:
        h.update(json.dumps([r["source"], r["target"], r.get("answers"), r.get("group")],
                            ensure_ascii=False).encode())
        h.update(b"\x1e")
    return h.hexdigest()


def _flatten(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    return flat, torch.tensor(offsets, dtype=torch.int64)


def _unflatten(flat: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    ids, off = flat.tolist(), offsets.tolist()
    return [ids[off[i]:off[i + 1]] for i in range(len(off) - 1)]


def _sibling(base: Path, ext: str) -> Path:
    # Not with_suffix(): a key such as "wsc.fixed" already contains a dot.
    return base.with_name(base.name + ext)


def _write_cache(enc: Encoded, base: Path) -> None:
    from safetensors.torch import save_file

    base.parent.mkdir(parents=True, exist_ok=True)
    src, src_off = _flatten(enc.sources)
    tgt, tgt_off = _flatten(enc.targets)
    # Write to temporary names and rename: a reader never sees a half-written file, and the
    # .safetensors file (renamed last) marks a complete entry.
    meta = {"version": CACHE_VERSION, "n": len(enc), "target_text": enc.target_text,
            "references": enc.references, "groups": enc.groups}
    tmp_json = base.with_name(base.name + f".json.tmp{os.getpid()}")
    tmp_st = base.with_name(base.name + f".safetensors.tmp{os.getpid()}")
    tmp_json.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    save_file({"source_ids": src, "source_offsets": src_off, "target_ids": tgt,
               "target_offsets": tgt_off}, str(tmp_st))
    os.replace(tmp_json, _sibling(base, ".json"))
    os.replace(tmp_st, _sibling(base, ".safetensors"))


def _read_cache(base: Path) -> Encoded | None:
    from safetensors.torch import load_file

    st, js = _sibling(base, ".safetensors"), _sibling(base, ".json")
    if not (st.is_file() and js.is_file()):
        return None
    meta = json.loads(js.read_text(encoding="utf-8"))
    if meta.get("version") != CACHE_VERSION:
        return None
    t = load_file(str(st))
    enc = Encoded(_unflatten(t["source_ids"], t["source_offsets"]),
                  _unflatten(t["target_ids"], t["target_offsets"]), meta["target_text"],
                  meta["references"], meta["groups"])
    return enc if len(enc) == meta["n"] else None


def _encode_with_progress(records: Sequence[Record], tokenizer: Any, max_source_length: int,
                          max_target_length: int, desc: str, show: bool) -> Encoded:
    from tqdm.auto import tqdm

    parts: list[Encoded] = []
    with tqdm(total=len(records), desc=f"tokenising {desc}".strip(), unit="ex",
              disable=not show, mininterval=1.0) as bar:
        for i in range(0, len(records), _CHUNK):
            chunk = records[i:i + _CHUNK]
            parts.append(encode(chunk, tokenizer, max_source_length, max_target_length))
            bar.update(len(chunk))
    return Encoded([s for p in parts for s in p.sources], [t for p in parts for t in p.targets],
                   [x for p in parts for x in p.target_text],
                   [x for p in parts for x in p.references], [x for p in parts for x in p.groups])


def encode_cached(records: Sequence[Record], tokenizer: Any, max_source_length: int,
                  max_target_length: int, cache_dir: str | os.PathLike[str] | None,
                  key: str = "data", progress: bool = True) -> Encoded:
    """`encode` with an on-disk cache; every rank must call it (it contains one barrier).

    Rank 0 looks for `<cache_dir>/<key>-<digest>.{safetensors,json}`, where the digest hashes the
    records, the tokenizer and the length limits (a stale entry is never reused); on a miss it
    tokenises with a progress bar and writes the entry atomically. All ranks then meet at
    `dist.barrier()`, and the other ranks read the entry. A rank that cannot see the file
    (per-node disks) tokenises for itself. `cache_dir=None` or "" disables caching (no barrier).
    The result equals `encode(records, tokenizer, max_source_length, max_target_length)`.
    """
    from dtvg_ds import dist

    main = dist.is_main()
    if not cache_dir:
        return _encode_with_progress(records, tokenizer, max_source_length, max_target_length,
                                     key, progress and main)
    safe_key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key) or "data"
    digest = cache_digest(records, tokenizer, max_source_length, max_target_length)
    base = Path(cache_dir) / f"{safe_key}-{digest[:20]}"
    enc: Encoded | None = None
    if main:
        enc = _read_cache(base)
        if enc is None:
            enc = _encode_with_progress(records, tokenizer, max_source_length,
                                        max_target_length, key, progress)
            _write_cache(enc, base)
    dist.barrier()  # collective: every rank; rank 0 has written the entry
    if enc is None:
        enc = _read_cache(base)
        if enc is None:  # not on a shared filesystem: do the work here
            enc = _encode_with_progress(records, tokenizer, max_source_length,
                                        max_target_length, key, False)
    return enc


def k_task_micro_batch(by_task: Sequence[Sequence[int]], seed: int, micro_step: int,
                       micro_batch: int, rank: int, world: int, kappa: int) -> list[int]:
    """MPT's multi-task batch: draw K ~ U{2..kappa}, pick K tasks, split the global micro batch
    among them; rank `rank` takes its slice. A pure function of (seed, micro_step), identical
    on every rank, so it resumes exactly like `micro_batch_indices`.

    `by_task[t]` lists the example indices of task t. Examples are drawn with replacement.
    """
    g = torch.Generator().manual_seed(seed * 7919 + micro_step)
    n_tasks = len(by_task)
    hi = max(1, min(kappa, n_tasks))
    k = int(torch.randint(min(2, hi), hi + 1, (1,), generator=g)) if hi >= 2 else 1
    chosen = torch.randperm(n_tasks, generator=g)[:k].tolist()
    total = micro_batch * world
    sizes = [total // k + (1 if i < total % k else 0) for i in range(k)]
    out: list[int] = []
    for t, size in zip(chosen, sizes, strict=True):
        pool = by_task[t]
        out += [pool[i] for i in torch.randint(len(pool), (size,), generator=g).tolist()]
    return out[rank * micro_batch:(rank + 1) * micro_batch]
