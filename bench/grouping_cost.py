"""DTVG per-step overhead at real shapes: grouping (rank 0) + broadcast + merge fwd/bwd.

Runs the real `DTVG` module (the code path of training) on 2 ranks over gloo:
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 bench/grouping_cost.py [--reps 50]
6 sources, r = 100, d in {2048 (Flan-T5-XL), 4096 (XXL)}. Prints one JSON line per d (rank 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dtvg_ds import dist  # noqa: E402
from dtvg_ds.artifacts import PromptArtifact  # noqa: E402
from dtvg_ds.config import TrainConfig  # noqa: E402
from dtvg_ds.methods.dtvg import DTVG, DTVGSettings  # noqa: E402
from dtvg_ds.methods.inputs import MethodInputs  # noqa: E402


def _art(name: str, init: torch.Tensor, vec: torch.Tensor) -> PromptArtifact:
    p = init + vec
    return PromptArtifact({"prompt": p, "init": init, "task_vector": vec}, {"task": name})


def measure(d: int, r: int, n: int, reps: int, out_dir: str) -> dict:
    g = torch.Generator().manual_seed(d)
    init = torch.randn(r, d, generator=g)
    target = _art("target", init, 0.1 * torch.randn(r, d, generator=g))
    sources = [_art(f"s{i}", init, 0.1 * torch.randn(r, d, generator=g)) for i in range(n)]
    cfg = TrainConfig(method="dtvg", task="t", output_dir=out_dir)
    m = DTVG(init, MethodInputs(target, sources), DTVGSettings.of(cfg))
    group_ms, merge_ms = [], []
    for step in range(reps + 5):
        dist.barrier()
        t0 = time.perf_counter()
        m.on_step_start(step)  # rank 0 decides, broadcast, every rank applies
        t1 = time.perf_counter()
        m().sum().backward()  # merge forward + backward through P_mix
        t2 = time.perf_counter()
        if step >= 5:
            group_ms.append(1e3 * (t1 - t0))
            merge_ms.append(1e3 * (t2 - t1))
    both = [a + b for a, b in zip(group_ms, merge_ms, strict=True)]
    return {"d": d, "r": r, "sources": n, "reps": reps, "world_size": dist.world_size(),
            "group_plus_broadcast_ms_median": statistics.median(group_ms),
            "merge_fwd_bwd_ms_median": statistics.median(merge_ms),
            "total_ms_median": statistics.median(both),
            "total_ms_p90": sorted(both)[int(0.9 * len(both)) - 1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init()
    with tempfile.TemporaryDirectory() as tmp:
        for d in (2048, 4096):
            res = measure(d, 100, 6, args.reps, f"{tmp}/rank{dist.rank()}")
            if dist.is_main():
                print(json.dumps(res), flush=True)
    import torch.distributed as tdist

    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
