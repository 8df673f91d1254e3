"""Multi-source mixtures and the tokenisation cache (single process)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from dtvg_ds.data import batches, mixtures
from dtvg_ds.data.demo import build_tokenizer


def _recs(task: str, n: int) -> list[dict[str, Any]]:
    return [{"source": f"{task} sentence: s{i}", "target": str(i % 2)} for i in range(n)]


def test_examples_proportional_with_cap() -> None:
    sizes = {"mnli": 1000, "rte": 30, "qqp": 400}
    assert mixtures.mixture_sizes(sizes, cap=300) == {"mnli": 300, "rte": 30, "qqp": 300}
    assert mixtures.mixture_sizes(sizes) == sizes
    rates = mixtures.mixture_rates(sizes, cap=300)
    assert rates["rte"] == pytest.approx(30 / 630) and sum(rates.values()) == pytest.approx(1)
    data = {t: _recs(t, n) for t, n in sizes.items()}
    mixed = mixtures.mix(data, cap=300, seed=4)
    assert Counter(r["task"] for r in mixed) == {"mnli": 300, "rte": 30, "qqp": 300}
    assert all(r["source"].startswith(r["task"]) for r in mixed)
    assert mixed == mixtures.mix(dict(reversed(data.items())), cap=300, seed=4)  # order-free
    assert mixed != mixtures.mix(data, cap=300, seed=5)
    # shuffled: the first 100 are not all one task
    assert len({r["task"] for r in mixed[:100]}) == 3
    # adding a task leaves the examples drawn from the others unchanged
    more = mixtures.mix({**data, "cola": _recs("cola", 50)}, cap=300, seed=4)
    pick = {r["source"] for r in more if r["task"] == "mnli"}
    assert pick == {r["source"] for r in mixed if r["task"] == "mnli"}


def test_load_mixture_from_data_dir(tmp_path: Path) -> None:
    for task, n in (("boolq", 12), ("cb", 5)):
        (tmp_path / task).mkdir()
        rows = ([{"question": f"q{i}", "passage": "p", "label": i % 2, "idx": i}
                 for i in range(n)] if task == "boolq" else
                [{"premise": f"p{i}", "hypothesis": "h", "label": i % 3, "idx": i}
                 for i in range(n)])
        (tmp_path / task / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    mixed = mixtures.load_mixture(["superglue-boolq", "cb"], data_dir=str(tmp_path), cap=8)
    assert Counter(r["task"] for r in mixed) == {"boolq": 8, "cb": 5}
    # the SuperGLUE inputs start with the ATTEMPT code's task names (ZOO.md)
    assert {r["source"].split()[0] for r in mixed} == {"superglue-boolq", "superglue-cb"}


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer()


def _records() -> list[dict[str, Any]]:
    recs = [{"source": f"sentence : good dog {i}", "target": "yes"} for i in range(30)]
    recs[3] = {**recs[3], "answers": ["yes", "no"]}
    recs[4] = {**recs[4], "group": "q7"}
    return recs


def test_encode_keeps_references_and_groups(tok: Any) -> None:
    enc = batches.encode(_records(), tok, 16, 4)
    assert enc.references[3] == ["yes", "no"] and enc.references[0] == ["yes"]
    assert enc.groups[4] == "q7" and enc.groups[0] == ""


def test_encode_cached_equals_encode_and_hits(tok: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    recs = _records()
    ref = batches.encode(recs, tok, 16, 4)
    first = batches.encode_cached(recs, tok, 16, 4, tmp_path, key="wsc.fixed-train")
    assert first == ref
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 4 and files[0].startswith("wsc.fixed-train-")
    assert {Path(f).suffix for f in files} == {".json", ".safetensors", ".i32"}

    def boom(*a: Any, **kw: Any) -> None:
        raise AssertionError("tokenised again on a cache hit")

    monkeypatch.setattr(batches, "encode", boom)
    assert batches.encode_cached(recs, tok, 16, 4, tmp_path, key="wsc.fixed-train") == ref
    monkeypatch.undo()
    # anything that changes the ids makes a new entry, never a stale hit
    assert batches.encode_cached(recs, tok, 8, 4, tmp_path, key="wsc.fixed-train") == \
        batches.encode(recs, tok, 8, 4)
    changed = recs[:-1] + [{"source": "sentence : bad cat", "target": "no"}]
    assert batches.encode_cached(changed, tok, 16, 4, tmp_path, key="wsc.fixed-train") == \
        batches.encode(changed, tok, 16, 4)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert not list(tmp_path.glob("*.tmp*"))


def test_encode_cached_without_dir_and_across_chunks(tok: Any, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setattr(batches, "_CHUNK", 7)  # several progress-bar steps
    recs = _records()
    assert batches.encode_cached(recs, tok, 16, 4, None) == batches.encode(recs, tok, 16, 4)
    assert batches.encode_cached(recs, tok, 16, 4, tmp_path) == batches.encode(recs, tok, 16, 4)


def test_cache_digest_depends_on_tokenizer(tok: Any) -> None:
    other = build_tokenizer()
    other.add_tokens(["zzzword"])
    recs = _records()
    assert batches.cache_digest(recs, tok, 16, 4) == batches.cache_digest(recs, tok, 16, 4)
    assert batches.cache_digest(recs, tok, 16, 4) != batches.cache_digest(recs, other, 16, 4)


def test_token_table_is_flat_int32_and_equals_lists(tok: Any, tmp_path: Path) -> None:
    seqs = [[5, 6, 7], [], [1], [2, 3]]
    t = batches.TokenTable.from_lists(seqs)
    assert t.ids.dtype == torch.int32 and t.offsets.tolist() == [0, 3, 3, 4, 6]
    assert list(t) == seqs and t[3] == [2, 3] and t[-1] == [2, 3] and len(t) == 4
    assert t.nbytes == 6 * 4 + 5 * 8  # 4 bytes per token + 8 per row
    with pytest.raises(IndexError):
        t[4]
    both = batches.TokenTable.concat([t, batches.TokenTable.from_lists([[9]])])
    assert list(both) == [*seqs, [9]]
    # the cache maps the ids from disk (read-only file pages, shared by a node's ranks)
    recs = _records()
    batches.encode_cached(recs, tok, 16, 4, tmp_path, key="k")
    hit = batches.encode_cached(recs, tok, 16, 4, tmp_path, key="k")
    assert hit == batches.encode(recs, tok, 16, 4)
    assert hit.sources.ids.dtype == torch.int32
    (ids_file,) = tmp_path.glob("*.source.i32")
    assert ids_file.stat().st_size == 4 * hit.sources.ids.numel()


def test_torn_cache_entry_is_tokenised_again(tok: Any, tmp_path: Path) -> None:
    recs = _records()
    batches.encode_cached(recs, tok, 16, 4, tmp_path, key="k")
    (ids_file,) = tmp_path.glob("*.source.i32")
    ids_file.write_bytes(ids_file.read_bytes()[:-4])  # one token short
    assert batches.encode_cached(recs, tok, 16, 4, tmp_path, key="k") == batches.encode(recs, tok, 16, 4)
