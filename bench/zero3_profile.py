"""Where does a ZeRO-3 step on a frozen backbone spend its time? (issue 8)

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/zero3_profile.py \
        [--config ds_configs/zero3.json] [--set zero_optimization.KEY=JSON ...] [--steps 20]

The real engine (`dtvg_ds.engine.setup`) on the standard workload (T5 vocab 32128, d 256,
4+4 layers, gated-gelu, fp32; r = 100; source 129 tokens, target 2; micro batch 8 per rank),
stage-1 PT. Per step, after `--warmup` steps: forward, backward and optimizer-step wall time,
and the collectives DeepSpeed issues (count and bytes of all-gathers / all-reduces /
broadcasts, counted by wrapping `torch.distributed`), split by phase. `--set` overrides a key
of the DeepSpeed JSON (e.g. `--set zero_optimization.stage3_prefetch_bucket_size=0`) so
settings can be compared without writing files. Prints one JSON line (rank 0).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from bench.common import standard_run  # noqa: E402
from bench.step_time import write_long_task  # noqa: E402
from dtvg_ds import dist  # noqa: E402
from dtvg_ds.data import batches  # noqa: E402

PHASE = ["setup"]
CALLS: Counter = Counter()
BYTES: Counter = Counter()


def _count(name: str, fn):
    def wrapped(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        CALLS[(PHASE[0], name)] += 1
        if t is not None:
            BYTES[(PHASE[0], name)] += t.numel() * t.element_size()
        return fn(*args, **kwargs)
    return wrapped


def instrument() -> None:
    """Count every collective by phase. ZeRO calls them through `deepspeed.comm` (looked up at
    call time), so the wrappers go there."""
    import deepspeed.comm as dcomm

    for name in ("all_gather_into_tensor", "allgather_fn", "all_gather", "all_reduce",
                 "inference_all_reduce", "broadcast", "reduce_scatter_fn",
                 "reduce_scatter_tensor", "all_to_all_single"):
        if hasattr(dcomm, name):
            setattr(dcomm, name, _count(name, getattr(dcomm, name)))


def apply_overrides(path: str, sets: list[str], out: Path) -> str:
    """Write `path` with `--set a.b=JSON` overrides applied; return the new file."""
    ds = json.loads(Path(path).read_text())
    for item in sets:
        key, val = item.split("=", 1)
        node = ds
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = json.loads(val)
    f = out / "ds.json"
    f.write_text(json.dumps(ds))
    return str(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="ds_configs/zero3.json")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--method", default="pt")
    ap.add_argument("--resident", action="store_true",
                    help="experiment: gather the backbone once per step, ZeRO module hooks off")
    ap.add_argument("--cprofile", action="store_true", help="print rank 0's top functions")
    ap.add_argument("--local_rank", type=int, default=0)
    a = ap.parse_args()
    def prepare(tmp: Path) -> None:
        write_long_task(tmp / "data")
        apply_overrides(a.config, a.set, tmp)

    run, tmp = standard_run("z3prof-", {
        "task": "long", "data_dir": "{tmp}/data", "deepspeed": "{tmp}/ds.json",
        "max_source_length": 129,
        "max_steps": a.steps, "per_device_train_batch_size": 8, "tokenized_cache": "false"},
        prepare)
    cfg = run.cfg
    instrument()
    eng = run.engine
    t_fwd, t_bwd, t_step = [], [], []
    prof = cProfile.Profile()
    losses = []
    hooks_off = contextlib.ExitStack()  # --resident: ZeRO module hooks off from step 1 on
    for step in range(a.steps):
        if a.resident and step == 1:  # after one hooked step: persistent params materialised
            hooks_off.enter_context(dist.zero_hooks_detached(eng))
        ctx = (dist.gathered(list(run.model.backbone.parameters())) if a.resident and step >= 1
               else contextlib.nullcontext())
        if a.cprofile and step == a.warmup:
            prof.enable()
        measured = step >= a.warmup
        idx = batches.micro_batch_indices(len(run.train), cfg.seed, step, 8, dist.rank(),
                                          dist.world_size())
        b = batches.collate(run.train, idx, run.tokenizer.pad_token_id)
        PHASE[0] = "forward" if measured else "warmup"
        t0 = time.perf_counter()
        with ctx:
            loss = eng(**b)
            t1 = time.perf_counter()
            PHASE[0] = "backward" if measured else "warmup"
            eng.backward(loss)
        t2 = time.perf_counter()
        losses.append(round(float(loss), 5))
        PHASE[0] = "step" if measured else "warmup"
        eng.step()
        t3 = time.perf_counter()
        if measured:
            t_fwd.append(t1 - t0)
            t_bwd.append(t2 - t1)
            t_step.append(t3 - t2)
    prof.disable()
    hooks_off.close()
    if a.cprofile and dist.is_main():
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    n = a.steps - a.warmup
    total = [f + b + s for f, b, s in zip(t_fwd, t_bwd, t_step, strict=True)]
    comm = {f"{ph}/{name}": {"calls_per_step": CALLS[(ph, name)] / n,
                             "MB_per_step": round(BYTES[(ph, name)] / n / 1e6, 2)}
            for (ph, name) in sorted(CALLS) if ph in ("forward", "backward", "step")}
    if dist.is_main():
        print(json.dumps({
            "config": a.config, "set": a.set, "world": dist.world_size(),
            "step_s_median": round(statistics.median(total), 4),
            "samples_per_s": round(8 * dist.world_size() / statistics.median(total), 2),
            "forward_s": round(statistics.median(t_fwd), 4),
            "backward_s": round(statistics.median(t_bwd), 4),
            "optimizer_s": round(statistics.median(t_step), 4),
            "collectives": comm, "losses": losses}), flush=True)
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
