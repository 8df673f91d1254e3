"""`make demo`: stage 1 on the built-in demo tasks, then DTVG on a held-out target.

Everything runs for real with the `deepspeed` launcher on 2 CPU ranks under ZeRO-3, on a tiny
T5 that the project pretrains once on CPU and caches (`.cache/demo_backbone`). The runs land in
`runs/demo/` (git-ignored); a task whose artifact is already there is reused unless --fresh.

    python -m dtvg_ds.demo [--ranks 2] [--steps 300] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from dtvg_ds import launch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("senti_a", "senti_b", "senti_a_flip", "has_color", "has_number")
TARGET = "senti_c"


def _launch(args: list[str], ranks: int, log: Path) -> None:
    """One real `deepspeed` launch of dtvg_ds.train; its output goes to `log`."""
    print("  $ " + " ".join(["deepspeed", "--num_gpus", str(ranks), "--module", "dtvg_ds.train",
                             *args]), flush=True)
    if log.exists():
        log.unlink()
    rc = launch.run(args, ranks, log)
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"demo: run failed (exit {rc}); log {log}:\n{tail}")


def _common(out: Path, task: str, steps: int) -> list[str]:
    return ["--deepspeed", "ds_configs/zero3.json", "--task", task, "--model_name_or_path",
            "demo", "--output_dir", str(out), "--num_virtual_tokens", "20",
            "--max_steps", str(steps), "--eval_steps", str(max(-(-steps // 4), 1)),
            "--save_steps", str(steps), "--per_device_train_batch_size", "16",
            "--max_eval_samples", "400", "--logging_steps", "10", "--warmup_steps", "10"]


def _stage1(root: Path, task: str, steps: int, ranks: int, fresh: bool) -> dict:
    out = root / "stage1" / task
    # The artifact is rewritten at every new best, so only a run that reached its last step is
    # complete; anything else (an interrupted demo) is trained again.
    meta = json.loads((out / "tpv.json").read_text()) if (out / "tpv.json").is_file() else {}
    if meta.get("steps") == steps and meta.get("status", "complete") == "complete" and not fresh:
        print(f"  {task}: reusing {out}")
    else:
        if out.exists():
            shutil.rmtree(out)
        _launch(["--method", "pt", "--learning_rate", "0.3", *_common(out, task, steps)], ranks,
                root / f"stage1_{task}.log")
    return json.loads((out / "tpv.json").read_text())


def _group_timeline(groups_jsonl: Path) -> list[str]:
    """Consecutive steps with the same group, as readable lines."""
    recs = [json.loads(x) for x in groups_jsonl.read_text().splitlines() if x.strip()]
    lines, start = [], 0
    for i, r in enumerate(recs):
        last = i == len(recs) - 1
        if last or set(recs[i + 1]["group"]) != set(r["group"]):  # same members, any rank order
            ts = ", ".join(f"{k} {v * 1e3:+.1f}" for k, v in r["ts"].items())
            lines.append(f"  steps {recs[start]['step']:>4}-{r['step']:<4} group {r['group']}"
                         f"   (TS x1e3 at step {r['step']}: {ts})")
            start = i + 1
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="where the demo runs go")
    ap.add_argument("--ranks", type=int, default=min(launch.gpus(), 2) or 2,
                    help="DeepSpeed ranks (GPUs, or CPU processes without one)")
    ap.add_argument("--steps", type=int, default=300, help="stage-1 steps per task")
    ap.add_argument("--dtvg_steps", type=int, default=200, help="stage-2 steps")
    ap.add_argument("--fresh", action="store_true", help="re-run tasks that already have artifacts")
    args = ap.parse_args(argv)
    root = (ROOT / args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    from dtvg_ds.data.demo_backbone import ensure_demo_backbone

    print("== 0. the embedded backbone: a tiny T5 pretrained on CPU (cached after the first run)")
    ensure_demo_backbone(ROOT / ".cache" / "demo_backbone", log=lambda s: print("  " + s))

    print(f"\n== 1. stage 1: task prompt vectors ({args.ranks} ranks, ZeRO-3, "
          f"{args.steps} steps each)")
    metas = {t: _stage1(root, t, args.steps, args.ranks, args.fresh) for t in (*SOURCES, TARGET)}
    print(f"\n  {'task':<14}{'best val acc':>13}{'at step':>9}   artifact")
    for t, m in metas.items():
        bm = m["best_metric"]
        print(f"  {t:<14}{bm['value']:>13.1f}{bm['step']:>9}   {root / 'stage1' / t}")

    print(f"\n== 2. stage 2: DTVG on target {TARGET!r} with sources {list(SOURCES)}")
    out = root / "dtvg" / TARGET
    if out.exists():
        shutil.rmtree(out)
    _launch(["--method", "dtvg", "--target_tpv", str(root / "stage1" / TARGET),
             "--source_tpvs", *[str(root / "stage1" / s) for s in SOURCES],
             "--learning_rate", "0.1", "--target_task_scale_learning_rate", "0.01",
             "--source_task_scale_learning_rate", "0.01",
             *_common(out, TARGET, args.dtvg_steps)],
            args.ranks, root / "dtvg.log")
    print("\n  group chosen over time (rank 0 decides, all ranks apply):")
    print("\n".join(_group_timeline(out / "groups.jsonl")))
    m = json.loads((out / "tpv.json").read_text())
    print(f"\n  DTVG {TARGET}: best val acc {m['best_metric']['value']:.1f} at step "
          f"{m['best_metric']['step']} (stage-1 PT: {metas[TARGET]['best_metric']['value']:.1f}); "
          f"merged prompt artifact: {out}")
    print(f"\ndemo finished in {time.time() - t0:.0f}s; all runs under {root}")


if __name__ == "__main__":
    main()
