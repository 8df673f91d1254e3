"""Flan-T5-XL at its real size: per-rank peak memory per phase, plan vs measured, s/step.

    python bench/xl_scale.py                      # every case, 2 ranks (CPU here, GPUs if present)
    python bench/xl_scale.py --cases pt_stop pt_resume --ranks 4

Builds the XL-shaped backbone once (`bench.common.build_xl_t5`: the published flan-t5-xl
config, random bf16 weights, 5.4 GB in the git-ignored `.cache/xl_backbone`), then runs each
case as a real `deepspeed launchers/train.py ... --trace_memory` launch and reads every rank's
`memory.rank<R>.jsonl` (CPU: sampled RssAnon high-water; GPU: torch.cuda.max_memory_allocated)
and `metrics.jsonl`. Prints one markdown table (max over ranks per phase) next to the plan's
prediction for the same job, and writes everything to `bench/out/xl/results.json`.

Needs ~22 GiB free at XL on 2 CPU ranks: run nothing else beside it. On a GPU machine the same
command runs with NCCL (the Makefile/launcher pick the accelerator); pass --ranks 1..8.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import build_xl_t5  # noqa: E402

GIB = 1024 ** 3
MODEL = ROOT / ".cache/xl_backbone"
TASK = "senti_c"
SOURCE_TOKENS, TARGET_TOKENS = 18, 2  # the longest senti_c input / target batch here (tokens)

# case: (extra train.py flags, what it shows). All: bf16, zero3.json, r = 100, micro batch 2.
CASES: dict[str, tuple[list[str], str]] = {
    "pt_stop": (["--max_steps", "3", "--stop_at_step", "2"],
                "PT: load, initialize, 2 steps, checkpoint at --stop_at_step"),
    "pt_resume": (["--max_steps", "3", "--resume", "auto", "--eval_steps", "3"],
                  "PT: --resume auto, step 3, evaluation by generation, checkpoint, export"),
    "dtvg": (["--method", "dtvg", "--max_steps", "2", "--eval_steps", "2"],
             "DTVG: 6 source vectors (r 100, d 2048), 2 steps, evaluation"),
    "batch4": (["--per_device_train_batch_size", "4", "--max_steps", "2", "--stop_at_step", "1"],
               "PT, micro batch 4, 1 step: activations without checkpointing"),
    "batch4_gc": (["--per_device_train_batch_size", "4", "--max_steps", "2", "--stop_at_step", "1",
                   "--gradient_checkpointing"],
                  "PT, micro batch 4, 1 step, --gradient_checkpointing"),
    "nf4": (["--load_in_4bit", "--bnb_4bit_compute_dtype", "float32", "--max_steps", "3",
             "--stop_at_step", "2"],
            "PT on an NF4 backbone (ZeRO-3, storage bf16), 2 steps"),
    "live_1e8": (["--max_steps", "3", "--stop_at_step", "2"],
                 "PT, 2 steps, zero3.json with stage3_max_live_parameters and "
                 "stage3_max_reuse_distance 1e8 (speed for memory)"),
    "eval_synced": (["--max_steps", "1", "--eval_gather_backbone", "never"],
                    "PT, 1 step, evaluation with per-layer gathers (the fallback of auto)"),
}
ORDER = ["pt_stop", "pt_resume", "dtvg", "batch4", "batch4_gc", "live_1e8", "eval_synced", "nf4"]
ZERO_OVERRIDES = {"live_1e8": {"stage3_max_live_parameters": 100_000_000,
                               "stage3_max_reuse_distance": 100_000_000}}


def ds_config(case: str, base: Path) -> Path:
    """zero3.json, or a copy with the case's zero_optimization overrides."""
    path = ROOT / "ds_configs/zero3.json"
    if case not in ZERO_OVERRIDES:
        return path
    ds = json.loads(path.read_text())
    ds["zero_optimization"].update(ZERO_OVERRIDES[case])
    out = base / f"{case}.ds.json"
    out.write_text(json.dumps(ds, indent=1))
    return out


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # the venv's JIT op cache, as `make` and the tests use (else a first launch compiles ~60 s)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parent.parent / "torch_extensions"))
    if not on_gpu():
        e.setdefault("DS_ACCELERATOR", "cpu")
        e.setdefault("OMP_NUM_THREADS", "1")
    return e


def make_sources(target_dir: Path, out: Path, n: int = 6) -> list[str]:
    """n stage-1-like source artifacts on the XL backbone: the target's init + random vectors
    of the target vector's norm (DTVG's cost does not depend on the values)."""
    import torch

    from dtvg_ds import artifacts

    art = artifacts.load_artifact(target_dir)
    g = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(n):
        v = torch.randn(art.init.shape, generator=g)
        v = v / v.norm() * max(float(art.task_vector.norm()), 1.0)
        d = out / f"source{i}"
        meta = {k: art.meta[k] for k in artifacts.REQUIRED_META if k in art.meta}
        artifacts.save_artifact(d, art.init + v, art.init, {**meta, "task": f"source{i}",
                                                            "method": "pt"})
        dirs.append(str(d))
    return dirs


def launch(case: str, model: Path, out: Path, ranks: int, extra: list[str]) -> float:
    flags = ["--task", TASK, "--model_name_or_path", str(model), "--output_dir", str(out),
             "--deepspeed", str(ds_config(case, out.parent)), "--bf16", "--num_virtual_tokens", "100",
             "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
             "--max_eval_samples", "8", "--generation_max_length", "4", "--save_steps", "0",
             "--logging_steps", "1", "--report_to", "none", "--trace_memory", *extra]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
           "--master_port", str(29700 + ORDER.index(case)), "launchers/train.py", *flags]
    t0 = time.time()
    log = out.parent / f"{case}.log"
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"{case}: launch failed ({p.returncode}); see {log}")
    return time.time() - t0


def read_case(out: Path) -> dict:
    """Per phase: max over ranks and steps of the peak; the last step's timings."""
    phases: dict[str, dict] = {}
    for f in sorted(out.glob("memory.rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            ph = phases.setdefault(r["phase"], {"peak": 0, "seconds": [], "heap_peak": 0})
            ph["peak"] = max(ph["peak"], r["peak_bytes"])
            ph["heap_peak"] = max(ph["heap_peak"], r.get("heap_peak_bytes", 0))
            ph["seconds"].append(r["seconds"])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    startup = next((m["startup_s_to_first_step"] for m in metrics
                    if "startup_s_to_first_step" in m), None)
    steps = [1 / m["steps_per_second"] for m in metrics if "steps_per_second" in m]
    return {"phases": {k: {"peak_gib": round(v["peak"] / GIB, 2),
                           "heap_peak_gib": round(v["heap_peak"] / GIB, 2),
                           "seconds_median": round(statistics.median(v["seconds"]), 1)}
                       for k, v in phases.items()},
            "startup_s": startup, "s_per_step": [round(s, 1) for s in steps]}


def predicted(ranks: int, batch: int, gc: bool, method: str, quantize: str,
              ds_path: Path, model: Path = MODEL) -> dict:
    from dtvg_ds import plan as P

    cfg, _ = P.load_config("google/flan-t5-xl")
    ds = json.loads(ds_path.read_text())
    shapes = P.param_shapes(cfg)
    index = model / "model.safetensors.index.json"
    if index.is_file() and "lm_head.weight" not in json.loads(index.read_text())["weight_map"]:
        # a backbone cached by an earlier builder has lm_head tied (2.78B): plan what was run
        shapes = [(n, x) for n, x in shapes if n != "lm_head.weight"]
    p = P.plan(cfg, ranks, ds, 100, True, method, 6, quantize=quantize, batch=batch, shapes=shapes,
               source_len=SOURCE_TOKENS, target_len=TARGET_TOKENS, gradient_checkpointing=gc,
               device="gpu" if on_gpu() else "cpu")
    t = p["transient"]
    return {"held_gib": round(p["accelerator_bytes_per_rank"] / GIB, 2),
            "train_peak_gib": round(t["peak_train_bytes_per_rank"] / GIB, 2),
            "eval_resident_peak_gib": round(t["peak_eval_resident_bytes_per_rank"] / GIB, 2),
            "activations_gib": round((p["activations"]["saved_bytes"]
                                      + p["activations"]["recompute_block_bytes"]) / GIB, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", choices=ORDER, default=ORDER)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--out", default=str(ROOT / "bench/out/xl"))
    ap.add_argument("--plan_only", action="store_true",
                    help="recompute the plan columns of the saved results, launch nothing")
    a = ap.parse_args()
    if a.plan_only:
        res_file = Path(a.out) / "results.json"
        results = json.loads(res_file.read_text())
        for case, r in results.items():
            extra = CASES[case][0]
            r["plan"] = predicted(a.ranks, 4 if case.startswith("batch4") else 2,
                                  "--gradient_checkpointing" in extra,
                                  "dtvg" if case == "dtvg" else "pt",
                                  "4bit" if case == "nf4" else "none", ds_config(case, Path(a.out)),
                                  Path(a.model))
        res_file.write_text(json.dumps(results, indent=1))
        print(table(results, a.ranks))
        return
    model = build_xl_t5(Path(a.model))
    base = Path(a.out)
    base.mkdir(parents=True, exist_ok=True)
    res_file = base / "results.json"
    results = json.loads(res_file.read_text()) if res_file.is_file() else {}
    for case in [c for c in ORDER if c in a.cases]:
        extra, what = CASES[case]
        out = base / ("pt" if case.startswith("pt_") else case)
        if case != "pt_resume" and out.exists():
            shutil.rmtree(out)
        if case == "dtvg":
            target = base / "pt"
            extra = [*extra, "--target_tpv", str(target), "--source_tpvs",
                     *make_sources(target, base / "sources")]
        print(f"== {case}: {what}", flush=True)
        wall = launch(case, model, out, a.ranks, extra)
        batch = 4 if case.startswith("batch4") else 2
        method = "dtvg" if case == "dtvg" else "pt"
        quant = "4bit" if case == "nf4" else "none"
        results[case] = {"what": what, "wall_s": round(wall, 1), **read_case(out),
                         "plan": predicted(a.ranks, batch, "--gradient_checkpointing" in extra,
                                           method, quant, ds_config(case, base), model)}
        for f in out.glob("memory.rank*.jsonl"):  # pt_resume appends to pt_stop's dir
            f.rename(out / f"{case}.{f.name}")
        res_file.write_text(json.dumps(results, indent=1))
        print(json.dumps(results[case]), flush=True)
    print(table(results, a.ranks))


def table(results: dict, ranks: int) -> str:
    """One markdown table: max over ranks of each phase's peak (GiB), and the plan."""
    cols = ["load", "deepspeed_initialize", "forward", "backward", "optimizer_step",
            "evaluation", "checkpoint_save", "resume"]
    dev = "GPU max_memory_allocated" if on_gpu() else "CPU RssAnon high-water"
    lines = [f"per-rank peak per phase, GiB ({dev}; max over {ranks} ranks and steps)", "",
             "| case | " + " | ".join(cols) + " | plan: step peak | plan: resident eval | s/step |",
             "|---" * (len(cols) + 4) + "|"]
    for case, r in results.items():
        ph = r["phases"]
        cells = [f"{ph[c]['peak_gib']:.2f}" if c in ph else "" for c in cols]
        sps = r["s_per_step"][-1] if r["s_per_step"] else ""
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {r['plan']['train_peak_gib']:.2f} | "
                     f"{r['plan']['eval_resident_peak_gib']:.2f} | {sps} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
