"""Raw rows of one Hub split: from the HuggingFace Hub, or from local files in the same schema.

Local files (`--data_dir DIR`): one file per Hub split, named after the split, in
`DIR/<task>/` or directly in `DIR/`: `train.jsonl`, `validation.csv`, `test.parquet`, ...
(`.jsonl`, `.json` (JSON lines or one JSON array), `.csv`, `.parquet`, and WebNLG's benchmark
`.xml`). Split names are the Hub's (`validation_matched` for MNLI, `dev` for WebNLG; `dev` and
`validation` stand in for each other). A split may also be a folder of WebNLG `.xml` files
(searched recursively, as in the official release: `train/1triples/*.xml`, ...), so
`--data_dir <release>/webnlg_challenge_2017` reads the WebNLG 2017 release as it is. Local files
are read with the json module / pyarrow / xml.etree directly: no datasets cache is written, and
rows come out as the same plain dicts the Hub rows become.

Hub datasets whose repository still holds a loading script (which `datasets` >= 4 no longer
runs) are read from the Hub's automatic parquet export (`refs/convert/parquet`): directly for
the repositories in `SCRIPT_ONLY`, and as a fallback when loading any other repository fails.
A failure names every attempt (repository, revision, exception type and message) in one error.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FILE_EXTS = (".jsonl", ".json", ".csv", ".parquet", ".xml")
PARQUET_EXPORT = "refs/convert/parquet"
# Hub repositories known to hold only a loading script: read from the parquet export directly.
# (webnlg-challenge/web_nlg may have no export at all: ZOO.md shows how to read the release.)
SCRIPT_ONLY = frozenset({"tuetschek/e2e_nlg", "webnlg-challenge/web_nlg"})
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

    def column(self, name: str) -> list[Any] | None:
        """Every row's value of column `name`, or None if the rows have no such column."""
        if isinstance(self._data, list):
            if not self._data or name not in self._data[0]:
                return None
            return [r.get(name) for r in self._data]
        if name not in self._data.column_names:
            return None
        return list(self._data[name])


def local_file(data_dir: str, task: str, split: str) -> Path | None:
    """The local file (or WebNLG .xml folder) of `split`, in `data_dir/<task>/` then `data_dir/`."""
    names = (split,) + SPLIT_ALIASES.get(split, ())
    for folder in (Path(data_dir) / task, Path(data_dir)):
        for name in names:
            for ext in FILE_EXTS:
                p = folder / f"{name}{ext}"
                if p.is_file():
                    return p
            p = folder / name
            if p.is_dir() and next(p.rglob("*.xml"), None) is not None:
                return p
    return None


def read_file(path: Path) -> list[dict[str, Any]]:
    """All rows of a json/jsonl/csv/parquet/WebNLG-xml file as dicts."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path).to_pylist()
    if path.suffix == ".xml":
        return read_webnlg_xml(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(r, dict) for r in rows):
        raise SourceError(f"{path}: expected one JSON object per row")
    return rows


def read_webnlg_xml(path: Path) -> list[dict[str, Any]]:
    """The entries of a WebNLG benchmark XML file as rows in the Hub `web_nlg` schema.

    `<entry category eid size>` with `<modifiedtripleset><mtriple>` and `<lex>` children
    becomes {"category", "eid", "size", "modified_triple_sets": {"mtriple_set": [[...]]},
    "lex": {"comment", "lid", "text"}, "test_category"}. `test_category` is the file name for the
    release's `testdata*.xml` files (as the Hub loader sets it) and "" otherwise. Reads the 2017
    layout (text inside `<lex>`) and the later one (a `<text>` child).
    """
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise SourceError(f"{path}: not a WebNLG XML file ({e})") from None
    test_cat = path.stem if path.stem.startswith("testdata") else ""
    rows = []
    for entry in root.iter("entry"):
        lexes = entry.findall("lex")
        texts = [(x.findtext("text") if x.find("text") is not None else x.text) or ""
                 for x in lexes]
        rows.append({
            "category": entry.get("category", ""), "eid": entry.get("eid", ""),
            "size": int(entry.get("size") or 0),
            "modified_triple_sets": {"mtriple_set": [
                [(t.text or "").strip() for t in ts.findall("mtriple")]
                for ts in entry.findall("modifiedtripleset")]},
            "lex": {"comment": [x.get("comment", "") for x in lexes],
                    "lid": [x.get("lid", "") for x in lexes],
                    "text": [" ".join(t.split()) for t in texts]},
            "test_category": test_cat})
    if not rows:
        raise SourceError(f"{path}: no <entry> elements (not a WebNLG benchmark file)")
    return rows


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, mtime_ns: int) -> tuple[dict[str, Any], ...]:
    # Train and dev of a held-out split read the same file; read it once per process.
    del mtime_ns  # part of the cache key only: an edited file is read again
    return tuple(read_file(Path(path)))


def _read_path(path: Path) -> list[dict[str, Any]]:
    """Rows of a split file, or of every .xml file under a split folder (sorted by path)."""
    files = sorted(path.rglob("*.xml")) if path.is_dir() else [path]
    return [r for f in files for r in _read_cached(str(f), f.stat().st_mtime_ns)]


def local_rows(data_dir: str, task: str, split: str,
               row_filter: tuple[str, str] | None = None) -> Rows:
    """Rows of `split` from local files (see the module docstring for names and formats)."""
    f = local_file(data_dir, task, split)
    if f is None:
        alts = "/".join((split,) + SPLIT_ALIASES.get(split, ()))
        raise SourceError(f"--data_dir {data_dir}: no {{{alts}}}.{{jsonl,json,csv,parquet,xml}} "
                          f"in {data_dir}/{task}/ or {data_dir}/ for task {task!r}")
    rows = _read_path(f)
    if row_filter and rows and row_filter[0] in rows[0]:
        col, val = row_filter
        rows = [r for r in rows if r[col] == val]
    return Rows(rows)


def _call(hub_id: str, config: str | None, **kw: Any) -> str:
    args = [repr(hub_id)] + ([repr(config)] if config else [])
    return f"load_dataset({', '.join(args + [f'{k}={v!r}' for k, v in kw.items()])})"


def _err(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}" + ("..." if len(msg) > 300 else "")


def _export_split(hub_id: str, config: str | None, split: str) -> tuple[Any, str]:
    """(the split from the repo's parquet export or None, what went wrong otherwise)."""
    import datasets

    call = _call(hub_id, None, revision=PARQUET_EXPORT, data_dir=config or "default")
    try:
        dd = datasets.load_dataset(hub_id, revision=PARQUET_EXPORT, data_dir=config or "default")
    except Exception as e:
        return None, f"{call} -> {_err(e)}"
    for name in (split,) + SPLIT_ALIASES.get(split, ()):
        if name in dd:
            return dd[name], ""
    return None, f"{call} -> loaded, but its splits are {sorted(dd)}, not {split!r}"


@functools.lru_cache(maxsize=8)
def _hub_split(hub_id: str, config: str | None, split: str) -> Any:
    """The `datasets.Dataset` of one Hub split: the repository, then its parquet export.

    Repositories in `SCRIPT_ONLY` go to the export directly. With HF_HUB_OFFLINE only the cache
    is read (`datasets` does that by itself). On failure, one `SourceError` lists every attempt
    with its exception.
    """
    import datasets

    from dtvg_ds import hub

    what = hub_id + (f" ({config})" if config else "") + f" split {split!r}"
    where = "the cache (HF_HUB_OFFLINE is set)" if hub.offline() else "the Hub"
    note = ""
    attempts: list[str] = []
    if hub_id in SCRIPT_ONLY:
        note = " (a script-only repository: only its parquet export was tried)"
    else:
        try:
            return datasets.load_dataset(hub_id, config, split=split)
        except Exception as e:  # script repo, offline, unknown id: try the parquet export next
            attempts.append(f"{_call(hub_id, config, split=split)} -> {_err(e)}")
            if isinstance(e, ConnectionError) and not hub.offline():  # the export is unreachable too
                raise SourceError(f"could not load {what} from the Hub: [1] {attempts[0]} "
                                  "(no connection: the parquet export was not tried)") from None
    ds, problem = _export_split(hub_id, config, split)
    if ds is not None:
        return ds
    attempts.append(problem)
    raise SourceError(f"could not load {what} from {where}{note}: " +
                      "; ".join(f"[{i}] {a}" for i, a in enumerate(attempts, 1)))


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
