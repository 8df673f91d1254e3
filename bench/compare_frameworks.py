"""dtvg_ds against what users run today, side by side on the standard workload (issue 8).

    python bench/compare_frameworks.py [--reps 3] [--steps 40] [--only "name part;name part"]

Every variant is a real launch on this machine's CPU ranks, run one after the other, the whole
list repeated `--reps` times in the same order (so slow drift hits every variant alike):

- dtvg_ds stage 1 (PT) and stage 2 (DTVG, 6 sources) with the shipped `zero3.json` and
  `zero2.json` on 2 ranks and on 1 rank, and PT with `zero3.json` minus the leaf-module tuning
  (the shipped config before it) -- `bench/step_time.py`'s runner: the median of the logged
  10-step windows after the first.
- (a) a plain single-process PyTorch loop (both cores: `--threads 2`).
- (b) HF PEFT prompt tuning + HF Trainer + DeepSpeed ZeRO-3, with DeepSpeed's defaults
  (`bench/baselines/zero3_plain.json`) and with the shipped `ds_configs/zero3.json`.
- (c) a plain torch DDP loop, backbone replicated, 2 ranks.

Prints one JSON line per launch, then a Markdown table: median samples/s over the repetitions,
the spread (min-max), and ratios to (b) and (c).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import build_standard_t5  # noqa: E402
from bench.step_time import make_sources, run_one, write_long_task  # noqa: E402

BIN = Path(sys.executable).parent


def _ds_without_leaf(tmp: Path) -> str:
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"].pop("leaf_module", None)
    f = tmp / "zero3_noleaf.json"
    f.write_text(json.dumps(ds))
    return str(f)


def _baseline(cmd: list[str], port: int) -> float:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "MASTER_PORT": str(port)}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith('{"bench"')), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{cmd} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return float(json.loads(line)["samples_per_s"])


def variants(tmp: Path, data: Path, model: Path, tpvs: list[Path], steps: int) -> dict:
    """name -> (group, zero-arg callable returning samples/s)."""
    noleaf = _ds_without_leaf(tmp)
    z3, z2 = "ds_configs/zero3.json", "ds_configs/zero2.json"

    def ours(method: str, ds: str, ranks: int):
        def go() -> float:
            out = Path(tempfile.mkdtemp(dir=tmp)) / "run"
            return run_one(model, data, out, method, ds, steps, ranks, tpvs) * 8 * ranks
        return go

    def base(script: str, launcher: list[str], *extra: str):
        return lambda: _baseline([*launcher, str(ROOT / "bench" / "baselines" / script),
                                  "--steps", str(steps), "--data_dir", str(data), *extra], 29650)

    ds2 = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29651"]
    tr2 = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29652"]
    return {
        "dtvg_ds PT, zero3.json, 2 ranks": ("ours", ours("pt", z3, 2)),
        "dtvg_ds PT, zero3.json without leaf modules, 2 ranks": ("ours", ours("pt", noleaf, 2)),
        "dtvg_ds DTVG, zero3.json, 2 ranks": ("ours", ours("dtvg", z3, 2)),
        "dtvg_ds PT, zero2.json, 2 ranks": ("ours", ours("pt", z2, 2)),
        "dtvg_ds DTVG, zero2.json, 2 ranks": ("ours", ours("dtvg", z2, 2)),
        "dtvg_ds PT, zero3.json, 1 rank": ("ours", ours("pt", z3, 1)),
        "dtvg_ds PT, zero2.json, 1 rank": ("ours", ours("pt", z2, 1)),
        "dtvg_ds DTVG, zero3.json, 1 rank": ("ours", ours("dtvg", z3, 1)),
        "dtvg_ds DTVG, zero2.json, 1 rank": ("ours", ours("dtvg", z2, 1)),
        "(a) plain PyTorch loop, 1 process, 2 threads": (
            "a", lambda: _baseline([sys.executable, str(ROOT / "bench" / "baselines" /
                                                        "plain_loop.py"), "--steps", str(steps),
                                    "--data_dir", str(data), "--threads", "2"], 29650)),
        "(b) HF PEFT + Trainer + DeepSpeed, plain ZeRO-3 (defaults), 2 ranks": (
            "b", base("hf_trainer.py", ds2, "--ds_config",
                      str(ROOT / "bench" / "baselines" / "zero3_plain.json"))),
        "(b') HF PEFT + Trainer + DeepSpeed, shipped zero3.json, 2 ranks": (
            "b", base("hf_trainer.py", ds2, "--ds_config", str(ROOT / "ds_configs" /
                                                               "zero3.json"))),
        "(c) plain torch DDP loop, replicated backbone, 2 ranks": (
            "c", base("ddp_loop.py", tr2)),
    }


def table(results: dict[str, list[float]]) -> str:
    med = {k: statistics.median(v) for k, v in results.items() if v}
    b = med.get("(b) HF PEFT + Trainer + DeepSpeed, plain ZeRO-3 (defaults), 2 ranks")
    c = med.get("(c) plain torch DDP loop, replicated backbone, 2 ranks")
    rows = ["| variant | samples/s (median) | spread (min-max) | runs | vs (b) | vs (c) |",
            "|---|---|---|---|---|---|"]
    for k, v in results.items():
        if not v:
            continue
        rows.append(f"| {k} | {med[k]:.1f} | {min(v):.1f}-{max(v):.1f} | {len(v)} | "
                    f"{med[k] / b:.2f}x | {med[k] / c:.2f}x |" if b and c else
                    f"| {k} | {med[k]:.1f} | {min(v):.1f}-{max(v):.1f} | {len(v)} | | |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", default="", help="';'-separated substrings of variant names")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "compare_frameworks.jsonl"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cmpfw-"))
    model = build_standard_t5(ROOT / ".cache" / "bench_t5")
    data = write_long_task(tmp / "data")
    tpvs = make_sources(model, tmp / "tpvs")
    todo = variants(tmp, data, model, tpvs, a.steps)
    if a.only:
        keys = [s.strip() for s in a.only.split(";")]
        todo = {k: v for k, v in todo.items() if any(s in k for s in keys)}
    results: dict[str, list[float]] = {k: [] for k in todo}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    for rep in range(a.reps):
        for name, (_, go) in todo.items():
            try:
                sps = go()
            except (RuntimeError, SystemExit) as e:
                print(f"{name}: failed: {str(e)[-2000:]}", file=sys.stderr, flush=True)
                continue
            results[name].append(sps)
            row = {"variant": name, "rep": rep, "samples_per_s": round(sps, 2)}
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
