"""Run under torchrun as one "node" of a multi-node job (tests/test_hub.py).

Usage: node_probe.py OUT_DIR CACHE_DIR FAIL_NODE

Each rank: (1) `dist.local_first` with a function that records when it ran; (2)
`batches.encode_cached` into CACHE_DIR (a per-node directory stands for a per-node disk),
counting whether this rank tokenised; (3) `dist.local_first` with a function that fails on the
local rank 0 of node FAIL_NODE, recording what each rank raised. Facts go to OUT_DIR/rank<k>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtvg_ds import dist  # noqa: E402
from dtvg_ds.data import batches  # noqa: E402
from dtvg_ds.data.demo import build_tokenizer  # noqa: E402


def main() -> None:
    out, cache, fail_node = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    dist.init(2)
    node = int(os.environ["GROUP_RANK"])  # torchrun's node rank
    facts: dict = {"rank": dist.rank(), "local_rank": dist.local_rank(), "node": node}

    def timed() -> tuple[float, float]:
        t0 = time.time()
        time.sleep(0.5 if dist.local_rank() == 0 else 0.0)  # a "download" only the first makes
        return t0, time.time()

    facts["first"] = dist.local_first(timed)

    calls = []
    real = batches._encode_with_progress

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    batches._encode_with_progress = counting
    recs = [{"source": f"red blue {i}", "target": "green"} for i in range(50)]
    enc = batches.encode_cached(recs, build_tokenizer(), 16, 4, cache, key="probe", progress=False)
    facts["tokenised"] = len(calls)
    facts["n"] = len(enc)

    def fails() -> None:
        if node == fail_node and dist.local_rank() == 0:
            raise ValueError(f"node {node} has no such file")

    try:
        dist.local_first(fails)
        facts["error"] = None
    except Exception as e:  # noqa: BLE001  -- recorded for the test
        facts["error"] = f"{type(e).__name__}: {e}"
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(facts))
    dist.barrier()


if __name__ == "__main__":
    main()
