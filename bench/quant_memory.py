"""Backbone bytes per rank: bf16 vs LLM.int8 vs NF4, ZeRO-2 and ZeRO-3, measured in real runs
and predicted by `python -m dtvg_ds.plan`.

    python bench/quant_memory.py                    # drives every case (2 CPU ranks each)
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/quant_memory.py --case nf4-zero3   # one

Each case sets the real engine up on the standard workload T5 (vocab 32128, d 256, 4+4 layers,
gated-gelu, untied lm_head; `--bf16`), takes a few prompt-tuning steps (so ZeRO-3 has
materialised its persistent parameters), then reports per rank: the backbone bytes it holds
(`quant.local_bytes`: partitions, persistent parameters and bitsandbytes' constants), the plan
command's prediction for the same job, the median step time, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {  # name: (DeepSpeed JSON, quantization flags, plan --quantize)
    "bf16-zero2": ("ds_configs/zero2.json", [], "none"),
    "bf16-zero3": ("ds_configs/zero3.json", [], "none"),
    "int8-zero2": ("ds_configs/zero2_8bit.json", ["--load_in_8bit"], "int8"),
    "nf4-zero2": ("ds_configs/zero2.json", ["--load_in_4bit"], "4bit"),
    "nf4-zero3": ("ds_configs/zero3.json", ["--load_in_4bit"], "4bit"),
}


def run_case(name: str, steps: int) -> None:
    """Under a launcher: set up, train `steps` steps, print one JSON line per rank."""
    import torch

    from bench.common import standard_run
    from dtvg_ds import dist, quant
    from dtvg_ds import plan as P
    from dtvg_ds.data import batches

    ds, flags, q = CASES[name]
    run, _ = standard_run("qmem-", {
        "deepspeed": ROOT / ds, "bf16": True, **{f.lstrip("-"): True for f in flags},
        "max_steps": steps, "per_device_train_batch_size": 8, "max_train_samples": 256,
        "max_source_length": 128})
    cfg = run.cfg
    times = []
    for step in range(steps):
        idx = batches.micro_batch_indices(len(run.train), cfg.seed, step, 8, dist.rank(),
                                          dist.world_size())
        t0 = time.perf_counter()
        loss = run.engine(**batches.collate(run.train, idx, run.tokenizer.pad_token_id))
        run.engine.backward(loss)
        run.engine.step()
        times.append(time.perf_counter() - t0)
    config, _ = P.load_config(run.cfg.model_name_or_path)
    predicted = P.plan(config, dist.world_size(), run.ds, num_virtual_tokens=100, bf16=True,
                       quantize=q)["backbone"]["bytes_per_rank"]
    print(json.dumps({
        "case": name, "rank": dist.rank(), "world": dist.world_size(),
        "backbone_bytes": quant.local_bytes(run.model.backbone), "plan_bytes": predicted,
        "step_s_median": round(statistics.median(times[1:] or times), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }), flush=True)
    torch.distributed.destroy_process_group()


def drive(steps: int) -> None:
    """Launch every case on 2 CPU ranks, one after the other; print a Markdown table."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    rows = []
    for i, name in enumerate(CASES):
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
               "--master_port", str(29700 + i), __file__, "--case", name, "--steps", str(steps)]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        got = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith('{"case"')]
        if p.returncode or not got:
            print(f"{name}: failed\n{p.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(min(got, key=lambda r: r["rank"]))
    print("| case | backbone bytes / rank (measured) | plan | step (s, median) | peak RSS |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['backbone_bytes'] / 2**20:.1f} MiB | "
              f"{r['plan_bytes'] / 2**20:.1f} MiB | {r['step_s_median']} | "
              f"{r['peak_rss_mib']} MiB |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=sorted(CASES))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--local_rank", type=int, default=0)
    a = ap.parse_args()
    if a.case:
        run_case(a.case, a.steps)
    else:
        drive(a.steps)


if __name__ == "__main__":
    main()
