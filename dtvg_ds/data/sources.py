"""Raw rows of one Hub split: from the HuggingFace Hub, or from local files in the same schema.

Local files (`--data_dir DIR`): one file per Hub split, named after the split, in
`DIR/<task>/` or directly in `DIR/`: `train.jsonl`, `validation.csv`, `test.parquet`, ...
(`.jsonl`, `.json` (JSON lines or one JSON array), `.csv`, `.parquet`). Split names are the
Hub's (`validation_matched` for MNLI, `dev` for WebNLG; `dev` and `validation` stand in for each
other). Local files are read with the json module / pyarrow directly: no datasets cache is
written, and rows come out as the same plain dicts the Hub rows become.

Hub datasets whose repository still holds a loading script (which `datasets` >= 4 no longer
runs) are read from the Hub's automatic parquet export (`refs/convert/parquet`) instead.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FILE_EXTS = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_ALIASES = {"validation": ("dev", "val", "valid"), "dev": ("validation", "val", "valid")}


class SourceError(ValueError):
    """Data could not be read; the message names the files or the Hub id that failed."""


class Rows:
    """A random-access sequence of row dicts over a `datasets.Dataset` or a plain list."""

    def __init__(self, data: Any):
        self._data = data

    def __len__(self) -> int:
        return len(self._data)

    def take(self, indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Rows at `indices` (all rows if None) as dicts, in the order given."""
        if isinstance(self._data, list):
            if indices is None:
                return list(self._data)
            return [self._data[i] for i in indices]
        ds = self._data if indices is None else self._data.select(list(indices))
        return [dict(r) for r in ds]


def local_file(data_dir: str, task: str, split: str) -> Path | None:
    """The local file of `split`, looked up in `data_dir/<task>/` then `data_dir/`."""
    names = (split,) + SPLIT_ALIASES.get(split, ())
    for folder in (Path(data_dir) / task, Path(data_dir)):
        for name in names:
            for ext in FILE_EXTS:
                p = folder / f"{name}{ext}"
                if p.is_file():
                    return p
    return None


def read_file(path: Path) -> list[dict[str, Any]]:
    """All rows of a json/jsonl/csv/parquet file as dicts."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(r, dict) for r in rows):
        raise SourceError(f"{path}: expected one JSON object per row")
    return rows


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int) -> tuple[dict[str, Any], ...]:
    # Train and dev of a held-out split read the same file; read it once per process.
    del mtime_ns  # part of the cache key only: an edited file is read again
    return tuple(read_file(Path(path)))


def local_rows(data_dir: str, task: str, split: str,
               row_filter: tuple[str, str] | None = None) -> Rows:
    """Rows of `split` from local files (see the module docstring for names and formats)."""
    f = local_file(data_dir, task, split)
    if f is None:
        alts = "/".join((split,) + SPLIT_ALIASES.get(split, ()))
        raise SourceError(f"--data_dir {data_dir}: no {{{alts}}}.{{jsonl,json,csv,parquet}} in "
                          f"{data_dir}/{task}/ or {data_dir}/ for task {task!r}")
    rows = list(_read_cached(str(f), f.stat().st_mtime_ns))
    if row_filter and rows and row_filter[0] in rows[0]:
        col, val = row_filter
        rows = [r for r in rows if r[col] == val]
    return Rows(rows)


@functools.lru_cache(maxsize=8)
def _hub_split(hub_id: str, config: str | None, split: str) -> Any:
    import datasets

    errors: list[str] = []
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # script repo, offline, unknown id: try the parquet export next
        errors.append(f"{type(e).__name__}: {str(e)[:200]}")
        if isinstance(e, ConnectionError):  # offline: the export is unreachable as well
            raise SourceError(f"could not load {hub_id}" + (f" ({config})" if config else "") +
                              f" split {split!r} from the Hub: {errors[0]}") from None
    try:
        dd = datasets.load_dataset(hub_id, revision="refs/convert/parquet",
                                   data_dir=config or "default")
        for name in (split,) + SPLIT_ALIASES.get(split, ()):
            if name in dd:
                return dd[name]
        errors.append(f"parquet export has splits {sorted(dd)}, not {split!r}")
    except Exception as e:
        errors.append(f"parquet export: {type(e).__name__}: {str(e)[:200]}")
    raise SourceError(f"could not load {hub_id}" + (f" ({config})" if config else "") +
                      f" split {split!r} from the Hub: " + " | ".join(errors))


def hub_rows(hub_id: str, config: str | None, split: str,
             row_filter: tuple[str, str] | None = None,
             columns: Sequence[str] | None = None) -> Rows:
    """Rows of a Hub dataset split, optionally filtered (`column == value`) and column-pruned."""
    ds = _hub_split(hub_id, config, split)
    if columns:
        # MRQA rows carry token lists of the whole context; the formatter never reads them.
        ds = ds.select_columns([c for c in columns if c in ds.column_names])
    if row_filter:
        col, val = row_filter
        ds = ds.filter(lambda v: v == val, input_columns=col)
    return Rows(ds)
