"""Evaluation by generation under ZeRO-3: naive (synced_gpus, per-layer all-gathers at every
decoding step) vs the project's path (backbone gathered once, hooks detached, local decoding).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/eval_generation.py [--samples 128] [--reps 3]
Prints one JSON line (rank 0) with samples/s of both paths and whether predictions agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import standard_run  # noqa: E402
from dtvg_ds import dist  # noqa: E402
from dtvg_ds.evaluation import evaluate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=8)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    run, _ = standard_run("evalbench-", {
        "max_eval_samples": args.samples, "per_device_eval_batch_size": 32,
        "generation_max_length": args.max_new_tokens, "max_steps": 1, "max_train_samples": 64})
    res: dict[str, list[float]] = {"naive": [], "resident": []}
    scores = {}
    for _ in range(args.reps):
        for mode, flag in (("naive", "never"), ("resident", "always")):
            cfg = dataclasses.replace(run.cfg, eval_gather_backbone=flag)
            t0 = time.perf_counter()
            r = evaluate(run.engine, run.model, run.valid, run.task, run.tokenizer, cfg, 3)
            res[mode].append(args.samples / (time.perf_counter() - t0))
            scores[mode] = r["score"]
    if dist.is_main():
        med = {k: statistics.median(v) for k, v in res.items()}
        print(json.dumps({"world_size": dist.world_size(), "samples": args.samples,
                          "max_new_tokens": args.max_new_tokens, "reps": args.reps,
                          "naive_samples_per_s": med["naive"],
                          "resident_samples_per_s": med["resident"],
                          "speedup": med["resident"] / med["naive"],
                          "all_runs": res, "same_score": scores["naive"] == scores["resident"]}),
              flush=True)
    import torch.distributed as tdist

    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
