"""Bytes per token of the tokenised training data, and tokenisation time at real row counts.

    .venv/bin/python bench/token_storage.py [--scale 1.0] [--tasks searchqa record ...]

For each task: synthetic text with the task's real train row count and mean source length in
words (MRQA paper, Table 1; dataset cards), tokenised by `batches.encode_cached` with the demo
word-level tokenizer (no Hub here; a SentencePiece tokenizer makes ~1.3 tokens per word, the
storage per token is the same). Reported:
- bytes per token held by one rank: Python lists of ints (the previous storage, measured with
  tracemalloc on a 20k-row sample) vs `TokenTable` (int32 + offsets);
- bytes per token per *node* when 2 ranks map the same cache entry: the sum of both processes'
  proportional set size (Pss) of the mapped id file, from /proc/<pid>/smaps;
- the wall time of tokenising and writing the entry (one process; the other ranks only map it).
Results go to bench/out/token_storage.json and are pasted into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtvg_ds.data import batches  # noqa: E402
from dtvg_ds.data.demo import FILLER, build_tokenizer  # noqa: E402

# (train rows, mean source words): MRQA Table 1 (context tokens + question), cards otherwise.
TASKS = {"searchqa": (117_384, 760), "newsqa": (74_160, 610), "hotpotqa": (72_928, 250),
         "nq": (104_071, 165), "record": (100_730, 230), "squad": (87_599, 150),
         "mnli": (392_702, 35)}
MAX_SOURCE_LENGTH = 100_000  # measure storage of the whole text (no truncation)


def records(n: int, words: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    vocab = list(FILLER)
    return [{"source": " ".join(rng.choices(vocab, k=max(1, int(rng.gauss(words, words / 4))))),
             "target": rng.choice(vocab)} for _ in range(n)]


def list_bytes_per_token(recs: list[dict[str, str]], tok) -> float:
    """Bytes of the old storage (Python lists of ints) per token, tracemalloc-measured."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ids = [list(x) for x in tok([r["source"] for r in recs], truncation=True,
                                max_length=MAX_SOURCE_LENGTH)["input_ids"]]
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / sum(len(x) for x in ids)


def _pss_of(path: str, q: mp.Queue, ready, done) -> None:
    """Child: map the cached ids, touch every page, and (once every child has) report the Pss
    of the mapping: Pss splits a shared page among the processes mapping it at that moment."""
    from dtvg_ds.data.batches import _read_cache

    enc = _read_cache(Path(path))
    assert enc is not None
    total = int(enc.sources.ids.sum())  # touch every page
    ready.wait()
    pss = 0
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.endswith(".source.i32")
        elif inside and line.startswith("Pss:"):
            pss += int(line.split()[1]) * 1024
    q.put((pss, total))
    done.wait()  # keep the mapping until every child has measured


def node_bytes(base: Path, ranks: int = 2) -> int:
    ctx = mp.get_context("spawn")  # a forked child of a torch process can deadlock in OpenMP
    q: mp.Queue = ctx.Queue()
    ready, done = ctx.Barrier(ranks), ctx.Barrier(ranks)
    ev = [ctx.Process(target=_pss_of, args=(str(base), q, ready, done)) for _ in range(ranks)]
    for p in ev:
        p.start()
    out = [q.get() for _ in ev]
    for p in ev:
        p.join()
    return sum(pss for pss, _ in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the real row counts")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    a = ap.parse_args()
    tok = build_tokenizer()
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for name in a.tasks:
            n, words = TASKS[name]
            n = max(100, int(n * a.scale))
            recs = records(n, words, seed=0)
            lists = list_bytes_per_token(recs[:20_000], tok)
            t0 = time.time()
            enc = batches.encode_cached(recs, tok, MAX_SOURCE_LENGTH, 8, d, key=name,
                                        progress=False)
            secs = time.time() - t0
            ntok = enc.sources.ids.numel()
            (base,) = {p.with_name(p.name[:-len(".safetensors")])
                       for p in Path(d).glob(f"{name}-*.safetensors")}
            node = node_bytes(base)
            rows[name] = {"rows": n, "mean_words": words, "tokens": ntok,
                          "text_mb": sum(len(r["source"]) for r in recs) / 2**20,
                          "tokenise_and_write_s": secs, "list_bytes_per_token": lists,
                          "table_bytes_per_token_per_rank": enc.sources.nbytes / ntok,
                          "node_bytes_per_token_2_ranks": node / ntok}
            print(json.dumps({name: rows[name]}), flush=True)
            del enc, recs
    out = ROOT / "bench" / "out" / "token_storage.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print("| task | rows | tokens | text MB | tokenise + write (s) | lists B/token/rank | "
          "TokenTable B/token/rank | node B/token (2 ranks mapping) |")
    print("|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['rows']:,} | {r['tokens']:,} | {r['text_mb']:.0f} | "
              f"{r['tokenise_and_write_s']:.1f} | {r['list_bytes_per_token']:.1f} | "
              f"{r['table_bytes_per_token_per_rank']:.2f} | {r['node_bytes_per_token_2_ranks']:.2f} |")


if __name__ == "__main__":
    main()
