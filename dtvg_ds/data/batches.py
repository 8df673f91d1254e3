"""Tokenisation and a deterministic, resumable batch stream.

The training data is an endless stream: epoch e is a permutation of the training set seeded by
(seed, e), and epochs are concatenated. The micro batch that rank k sees at global micro step j
is a pure function of (seed, j, k, world size), so a resumed run needs only the step counter to
continue exactly where it stopped: the data position *is* the step.

Token ids live in a `TokenTable`: one flat int32 array plus int64 offsets, 4 bytes per token
(+ 8 per row) instead of ~42 for Python lists of ints. `encode_cached` is `encode` with an
on-disk cache (raw int32 files + safetensors offsets + JSON, never pickle): rank 0 tokenises
(with a progress bar) and writes; every other rank memory-maps the same files, so the ranks of a
node share one copy of the ids in the page cache. A node that cannot see rank 0's files (per-node
disks) has its local rank 0 tokenise into its own cache; no other rank ever tokenises.
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

from dtvg_ds.data.zoo import Record


@dataclass(eq=False)
class TokenTable:
    """Variable-length token id sequences stored flat: sequence i is
    `ids[offsets[i]:offsets[i + 1]]`. Indexing returns a list of ints (what collate pads)."""

    ids: torch.Tensor  # int32, every sequence back to back (may be memory-mapped, read-only)
    offsets: torch.Tensor  # int64, n + 1 entries, offsets[0] == 0

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> TokenTable:
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
        if ids.numel() and int(ids.max()) > torch.iinfo(torch.int32).max:
            raise ValueError("token ids do not fit in int32")
        return cls(ids.to(torch.int32), offsets)

    @classmethod
    def concat(cls, parts: Sequence[TokenTable]) -> TokenTable:
        ids = torch.cat([p.ids for p in parts]) if parts else torch.zeros(0, dtype=torch.int32)
        offs, base = [torch.zeros(1, dtype=torch.int64)], 0
        for p in parts:
            offs.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return cls(ids, torch.cat(offs))

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, i: int) -> list[int]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.ids[int(self.offsets[i]):int(self.offsets[i + 1])].tolist()

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list):
            return list(self) == other
        return (isinstance(other, TokenTable) and torch.equal(self.offsets, other.offsets)
                and torch.equal(self.ids, other.ids))

    @property
    def nbytes(self) -> int:
        return self.ids.numel() * self.ids.element_size() + self.offsets.numel() * 8


@dataclass
class Encoded:
    """Token ids of a split (flat `TokenTable`s; lists are converted) and the raw target strings.

    `references[i]` holds every acceptable answer / reference of example i (the record's
    "answers", else its target) and `groups[i]` its MultiRC question ("" elsewhere): pass them
    to `metrics.compute(..., refs, labels, groups=...)`.
    """

    sources: TokenTable
    targets: TokenTable
    target_text: list[str]
    references: list[list[str]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.sources, TokenTable):
            self.sources = TokenTable.from_lists(self.sources)
        if not isinstance(self.targets, TokenTable):
            self.targets = TokenTable.from_lists(self.targets)

    def __len__(self) -> int:
        return len(self.sources)


def encode(records: Sequence[Record], tokenizer, max_source_length: int,
           max_target_length: int) -> Encoded:
    """Tokenise sources and targets (truncated, eos appended by the tokenizer)."""
    src = tokenizer([r["source"] for r in records], truncation=True,
                    max_length=max_source_length)["input_ids"]
    tgt = tokenizer([r["target"] for r in records], truncation=True,
                    max_length=max_target_length)["input_ids"]
    return Encoded(TokenTable.from_lists(src), TokenTable.from_lists(tgt),
                   [r["target"] for r in records],
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

CACHE_VERSION = 2  # 2: flat int32 id files, memory-mapped
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


def _sibling(base: Path, ext: str) -> Path:
    # Not with_suffix(): a key such as "wsc.fixed" already contains a dot.
    return base.with_name(base.name + ext)


def _write_cache(enc: Encoded, base: Path) -> None:
    """Raw int32 id files + JSON first, the safetensors offsets file (the completion marker)
    last; each written under a temporary name and renamed, so a reader never sees half a file."""
    from safetensors.torch import save_file

    base.parent.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "n": len(enc), "target_text": enc.target_text,
            "references": enc.references, "groups": enc.groups,
            "source_tokens": enc.sources.ids.numel(), "target_tokens": enc.targets.ids.numel()}
    pid = os.getpid()
    for name, table in (("source", enc.sources), ("target", enc.targets)):
        tmp = _sibling(base, f".{name}.i32.tmp{pid}")
        tmp.write_bytes(table.ids.contiguous().numpy().astype("<i4").tobytes())
        os.replace(tmp, _sibling(base, f".{name}.i32"))
    tmp_json = _sibling(base, f".json.tmp{pid}")
    tmp_json.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp_json, _sibling(base, ".json"))
    tmp_st = _sibling(base, f".safetensors.tmp{pid}")
    save_file({"source_offsets": enc.sources.offsets, "target_offsets": enc.targets.offsets},
              str(tmp_st))
    os.replace(tmp_st, _sibling(base, ".safetensors"))


def _map_ids(path: Path, count: int) -> torch.Tensor:
    """The int32 ids of `path`, memory-mapped (pages shared by every process of the node that
    maps the same file; copy-on-write, never written back)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int32)
    if path.stat().st_size != 4 * count:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, expected {4 * count}")
    return torch.from_file(str(path), shared=False, size=count, dtype=torch.int32)


def _read_cache(base: Path) -> Encoded | None:
    from safetensors.torch import load_file

    st, js = _sibling(base, ".safetensors"), _sibling(base, ".json")
    if not (st.is_file() and js.is_file()):
        return None
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION:
            return None
        t = load_file(str(st))
        src = TokenTable(_map_ids(_sibling(base, ".source.i32"), meta["source_tokens"]),
                         t["source_offsets"])
        tgt = TokenTable(_map_ids(_sibling(base, ".target.i32"), meta["target_tokens"]),
                         t["target_offsets"])
    except Exception:  # noqa: BLE001  -- torn/foreign entry (SafetensorError is no ValueError)
        return None  # tokenise again
    enc = Encoded(src, tgt, meta["target_text"], meta["references"], meta["groups"])
    ok = len(enc) == meta["n"] == len(tgt) and int(src.offsets[-1]) == src.ids.numel()
    return enc if ok else None


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
    return Encoded(TokenTable.concat([p.sources for p in parts]),
                   TokenTable.concat([p.targets for p in parts]),
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
            enc = _read_cache(base) or enc  # map the files like the other ranks do
    dist.barrier()  # collective: every rank; rank 0 has written the entry
    if enc is None:
        enc = _read_cache(base)
    # A node that cannot see rank 0's files (per-node disks): its local rank 0 tokenises into
    # its own cache; the node's other ranks map that. Every rank meets the barrier.
    if enc is None and dist.local_rank() == 0:
        enc = _encode_with_progress(records, tokenizer, max_source_length, max_target_length,
                                    key, False)
        _write_cache(enc, base)
    dist.barrier()  # collective: every node's local rank 0 has written its entry
    if enc is None:
        enc = _read_cache(base)
        if enc is None:  # the node's local rank 0 could not share either: last resort
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
