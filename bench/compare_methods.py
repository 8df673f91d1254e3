"""Target accuracy of PT, SPoT, the DTVG ablations and DTVG on the demo tasks, over seeds.

Every run is a real `deepspeed` launch of launchers/train.py (2 CPU ranks, ZeRO-3) made by
`dtvg_ds.demo._launch`, with the demo's settings (`dtvg_ds.demo._common`: r = 20, micro batch 16
per rank, 400 validation examples, warmup 10, evaluation every max_steps // 4 steps and at the
last step).

    .venv/bin/python bench/compare_methods.py [--targets senti_c [senti_c_flip]] \
        [--seeds 1 2 3] [--stage2_steps 200] [--max_minutes 0] [--report_only]

Fair budget (say it, then do it):
- Stage-1 artifacts (sources and target) come from `runs/demo/stage1/<task>` when complete,
  otherwise they are trained here with the demo's stage-1 settings (`dtvg_ds.demo._stage1`).
- Every stage-2 method (DTVG, fixed group, all sources, target only) continues from the target's
  stage-1 prompt for `--stage2_steps` steps with the same learning rates (prompt 0.1, scales
  0.01, as `make demo`).
- PT (from the shared init P_init) and SPoT (from the chosen source's stage-1 prompt) are plain
  prompt tuning on the target: they get the whole target budget, stage-1 steps + stage-2 steps,
  at the stage-1 learning rate 0.3.
- Same seed => same data order (the batch is a pure function of (seed, step)), so stage-2
  methods of one seed see the same batches; each run is scored by its best evaluation
  (every run gets the same number of looks at the validation set) and by its last evaluation.

Runs go under `--out` (default bench/out/methods, git-ignored); a run that finished is reused
(its dir holds tpv.json with steps == max_steps), a partial one is redone. The report is written
to `--results` (default bench/RESULTS_methods.md) and the raw numbers to `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtvg_ds.demo import SOURCES, _common, _launch, _stage1  # noqa: E402

METHODS = ("pt", "spot", "mpt", "all_sources", "target_only", "fixed_group", "dtvg")
LABELS = {"pt": "PT (from shared init)", "spot": "SPoT (init from most similar source)",
          "all_sources": "DTVG ablation: all sources", "target_only": "DTVG ablation: target only",
          "fixed_group": "DTVG ablation: fixed group", "dtvg": "DTVG",
          "mpt": "MPT (target adaptation of P* distilled from the sources)"}
NOTES_MARKER = "<!-- notes below this line are kept when the report is regenerated -->"
STAGE1_LR = "0.3"  # dtvg_ds.demo stage 1
STAGE2_LRS = ("0.1", "0.01", "0.01")  # dtvg_ds.demo stage 2: prompt, a_t, a_s
# How each source relates to each target (demo task rules, dtvg_ds/data/demo.py).
RELATION = {
    "senti_c": {"senti_a": "related (shares lexicon block 0)",
                "senti_b": "related (shares lexicon block 3)",
                "senti_a_flip": "conflicting (block 0, inverted)",
                "has_color": "unrelated", "has_number": "unrelated"},
    "senti_c_flip": {"senti_a": "conflicting (block 0, not inverted)",
                     "senti_b": "conflicting (block 3, not inverted)",
                     "senti_a_flip": "related (block 0, inverted)",
                     "has_color": "unrelated", "has_number": "unrelated"},
}


def rel(p: Path) -> str:
    """A path relative to the repo when possible (the launches run with cwd = repo)."""
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p.resolve())


def read_json(p: Path) -> dict[str, Any]:
    return json.loads(p.read_text())


def read_jsonl(p: Path) -> list[dict[str, Any]]:
    if not p.is_file():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def complete(run_dir: Path) -> bool:
    """The run finished: its final export (steps == max_steps) is there.

    tpv.json alone is not enough: the engine exports at every new best, so a run stopped
    half-way leaves a valid-looking artifact with fewer steps.
    """
    tpv, cfg = run_dir / "tpv.json", run_dir / "run_config.json"
    if not (tpv.is_file() and cfg.is_file()):
        return False
    try:
        return read_json(tpv)["steps"] == read_json(cfg)["config"]["max_steps"]
    except (KeyError, json.JSONDecodeError):
        return False


def stage1_dir(task: str, demo_root: Path, out: Path, steps: int, ranks: int,
               train: bool) -> Path:
    """The stage-1 artifact of `task`: the demo's when complete, else trained under `out`."""
    demo = demo_root / "stage1" / task
    if complete(demo):
        return demo
    own = out / "stage1" / task
    if complete(own):
        return own
    if not train:
        raise SystemExit(f"no complete stage-1 artifact for {task} ({demo} or {own})")
    print(f"  {task}: no complete stage-1 artifact in {rel(demo)}; training it into {rel(own)}")
    _stage1(out, task, steps, ranks, fresh=True)  # fresh: drops a partial run first
    return own


def mpt_source_args(out: Path, source_tpvs: list[Path], sources: list[str], steps: int) -> list[str]:
    """MPT source training, once for all targets and seeds (like the stage-1 runs): shared P*
    and per-source factors distilled from the sources' stage-1 prompts, `steps` steps."""
    task = "+".join(sources)
    return ["--method", "mpt_source", "--source_tpvs", *[rel(p) for p in source_tpvs],
            "--learning_rate", STAGE1_LR, *_common(Path(rel(out)), task, steps),
            "--max_eval_samples", "100", "--eval_steps", str(steps)]


def run_args(method: str, target: str, seed: int | str, run_dir: Path, target_tpv: Path,
             source_tpvs: list[Path], s1: int, s2: int, mpt_source: Path | None = None) -> list[str]:
    """launchers/train.py flags of one benchmark run."""
    src = [rel(p) for p in source_tpvs]
    if method == "mpt":  # same budget and learning rate as PT and SPoT
        head = ["--method", "mpt_target", "--mpt_source", rel(mpt_source or Path("?")),
                "--learning_rate", STAGE1_LR]
        steps = s1 + s2
    elif method == "pt":
        head = ["--method", "pt", "--learning_rate", STAGE1_LR]
        steps = s1 + s2
    elif method == "spot":
        head = ["--method", "spot", "--target_tpv", rel(target_tpv), "--source_tpvs", *src,
                "--learning_rate", STAGE1_LR]
        steps = s1 + s2
    else:
        ablation = "none" if method == "dtvg" else method
        head = ["--method", "dtvg", "--target_tpv", rel(target_tpv), "--source_tpvs", *src,
                "--learning_rate", STAGE2_LRS[0],
                "--target_task_scale_learning_rate", STAGE2_LRS[1],
                "--source_task_scale_learning_rate", STAGE2_LRS[2], "--ablation", ablation]
        steps = s2
    return [*head, *_common(Path(rel(run_dir)), target, steps), "--seed", str(seed)]


def launch(args: list[str], run_dir: Path, ranks: int) -> dict[str, Any]:
    """One training run (reused when already complete); returns its wall time and load."""
    info = run_dir.with_name(run_dir.name + ".bench.json")
    if complete(run_dir) and info.is_file():
        print(f"  reusing {rel(run_dir)}")
        return {**read_json(info), "reused": True}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    load0, t0 = os.getloadavg()[0], time.time()
    error = None
    try:
        _launch(args, ranks, run_dir.with_name(run_dir.name + ".log"))
    except SystemExit as e:  # a failed run is reported, the benchmark goes on
        error = str(e)
        print(f"  FAILED: {error.splitlines()[0]}", flush=True)
    rec = {"args": args, "seconds": time.time() - t0, "loadavg_1min_before": load0,
           "loadavg_1min_after": os.getloadavg()[0], "error": error}
    info.write_text(json.dumps(rec, indent=1))
    return {**rec, "reused": False}


# ----------------------------------------------------------------------------------------------
# reading the runs
# ----------------------------------------------------------------------------------------------

def collect(run_dir: Path) -> dict[str, Any] | None:
    """best/final validation accuracy, the eval curve, speed, and method extras of one run."""
    if not complete(run_dir):
        return None
    tpv = read_json(run_dir / "tpv.json")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [(m["step"], m["eval_score"]) for m in metrics if "eval_score" in m]
    sps = [m["steps_per_second"] for m in metrics if "steps_per_second" in m]
    rec = {"best": tpv["best_metric"]["value"], "best_step": tpv["best_metric"]["step"],
           "final": evals[-1][1] if evals else None, "curve": evals, "steps": tpv["steps"],
           "steps_per_second_median": statistics.median(sps) if sps else None,
           "extra": {k: v for k, v in tpv.get("extra", {}).items() if k != "metrics"}}
    groups = read_jsonl(run_dir / "groups.jsonl")
    if groups:
        rec["groups"] = groups
        from safetensors.torch import load_file

        t = load_file(str(run_dir / "prompt.safetensors"))
        if "scale_sources" in t:  # DTVG family: the learned per-token scales (mean over tokens)
            rec["scales"] = {"target": float(t["scale_target"].mean()),
                             **{s: float(v) for s, v in zip(rec["extra"]["sources"],
                                                            t["scale_sources"].mean(dim=1),
                                                            strict=True)}}
    return rec


def stats(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "mean": statistics.fmean(xs) if xs else float("nan"),
            "std": statistics.stdev(xs) if len(xs) > 1 else float("nan"),
            "min": min(xs) if xs else float("nan"), "max": max(xs) if xs else float("nan")}


def group_stats(groups: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """Fraction of regroupings each source was in the group, mean TS, and the group (set) changes."""
    n = len(groups)
    frac = {s: sum(s in g["group"] for g in groups) / n for s in sources}
    ts = {s: statistics.fmean(g["ts"][s] for g in groups) for s in sources}
    changes, timeline = 0, []  # the group as a set: the rank order inside it does not matter
    for i, g in enumerate(groups):
        if i == 0 or sorted(g["group"]) != sorted(groups[i - 1]["group"]):
            changes += i > 0
            timeline.append((g["step"], sorted(g["group"])))
    return {"records": n, "fraction": frac, "mean_ts": ts, "changes": changes,
            "mean_k": statistics.fmean(g["k"] for g in groups), "timeline": timeline}


def stage1_similarities(target: Path, sources: dict[str, Path]) -> dict[str, Any]:
    """What the selection rules see before any stage-2 training (from the stage-1 artifacts).

    DTVG's target similarity TS and its step-0 group (a_t = a_s = 1, released-code rule, i.e.
    exactly what `--ablation fixed_group` freezes), the cosine of the mean-pooled task vectors,
    and SPoT's average-token cosine of the prompts. Pure `dtvg_ds.prompt_math`, no launch.
    """
    import torch
    from safetensors.torch import load_file

    from dtvg_ds import prompt_math

    tgt = load_file(str(target / "prompt.safetensors"))
    src = {n: load_file(str(p / "prompt.safetensors")) for n, p in sources.items()}
    names = list(src)
    t_s = torch.stack([src[n]["task_vector"] for n in names]).double()
    t_t = tgt["task_vector"].double()
    res = prompt_math.select_group(t_t, t_s)
    pooled = torch.nn.functional.normalize(t_s.mean(dim=1), dim=1)
    cos = pooled @ torch.nn.functional.normalize(t_t.mean(dim=0), dim=0)
    spot = prompt_math.spot_similarity(tgt["prompt"], torch.stack([src[n]["prompt"] for n in names]))
    return {"ts": {n: float(v) for n, v in zip(names, res.ts, strict=True)},
            "tv_cosine": {n: float(v) for n, v in zip(names, cos, strict=True)},
            "spot_cosine": {n: float(v) for n, v in zip(names, spot, strict=True)},
            "kc": [float(x) for x in res.kc], "positive": [names[i] for i in res.positive],
            "group": [names[i] for i in res.group]}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception:
        ds_version = "?"
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": ds_version}


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------

def _f(x: float | None, nd: int = 2) -> str:
    return "—" if x is None or x != x else f"{x:.{nd}f}"


def _pm(s: dict[str, float]) -> str:
    return f"{_f(s['mean'])} ± {_f(s['std'])}"


def _cmd(args: list[str], ranks: int) -> str:
    env = "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONPATH=. TORCH_EXTENSIONS_DIR=.venv/torch_extensions"
    return f"{env} deepspeed --num_gpus {ranks} launchers/train.py " + " ".join(args)


def report(summary: dict[str, Any]) -> str:
    a = summary["settings"]
    m = summary["machine"]
    lines = [
        "# Target accuracy by method on the demo tasks (issue 3, \"Show that it works\")",
        "",
        f"Generated by `{summary['command']}` on {summary['finished']}; "
        f"raw numbers in `{a['out']}/summary.json`, runs under `{a['out']}/` (git-ignored).",
        "",
        "## Setup",
        "",
        f"- Machine: {m['cpus']}-core CPU ({m['cpu_model'] or 'unknown model'}), no GPU; "
        f"{m['platform']}, Python {m['python']}, torch {m['torch']}, DeepSpeed {m['deepspeed']}. "
        "**Shared with other engineers' jobs**: the 1-minute load average before/after each run "
        f"ranged {_f(summary['load_min'], 2)}-{_f(summary['load_max'], 2)} on 2 cores (2 ranks "
        "of ours alone make ~2), so wall times are indicative only; accuracies do not depend on it.",
        f"- Backbone: the embedded demo T5 (`--model_name_or_path demo`, cached in "
        f"`.cache/demo_backbone`); {a['ranks']} CPU ranks, `ds_configs/zero3.json`, fp32; "
        "r = 20 soft tokens, micro batch 16 per rank (32 per step), 400 validation examples, "
        "warmup 10 steps then linear decay, evaluation every max_steps // 4 steps and at the last "
        f"step, i.e. {'/'.join(map(str, summary['evals_per_run']))} evaluations per run "
        "(`dtvg_ds.demo._common`).",
        f"- Sources: {', '.join(a['sources'])}. Stage-1 artifacts: "
        + "; ".join(f"`{t}` <- `{p}` ({s} steps, seed {sd}, best val acc {_f(b)})"
                    for t, (p, s, b, sd) in summary["stage1"].items()) + ".",
        f"- Training seeds (`--seed`): {a['seeds']}. The stage-1 artifacts are one run each "
        "(the seeds above), so the spread below is over the data order of the compared runs only, "
        "not over stage-1 training.",
        "",
        "Fair budget: every DTVG-family run (DTVG, fixed group, all sources, target only) continues "
        f"from the target's stage-1 prompt for **{a['stage2_steps']} steps** with the same "
        f"learning rates (prompt {STAGE2_LRS[0]}, a_t {STAGE2_LRS[1]}, a_s {STAGE2_LRS[2]}; no "
        "weight decay). PT (from the shared init P_init) and SPoT (from the stage-1 prompt of the "
        "source most similar to the target's stage-1 prompt, average-token cosine) are plain prompt "
        "tuning of the target and get the whole target budget, **stage-1 steps + stage-2 steps**, "
        f"at the stage-1 learning rate {STAGE1_LR} (weight decay 1e-5). `target only` is the "
        "equal-budget control for DTVG: same start, same steps, no sources. Runs of one seed "
        "see the same batches (data order is a pure function of (seed, step)).",
        "",
        "Metric: validation accuracy (x100) of the generated yes/no answer on 400 validation "
        "examples. **best** = the run's `tpv.json` `best_metric` (best of its evaluations, "
        "selected on the same validation set, so optimistic by the same number of looks for "
        "every run); **last** = the run's final evaluation (`metrics.jsonl`). One validation "
        "example is 0.25 points.",
        "",
    ]
    for target, t in summary["targets"].items():
        s1 = summary["stage1"][target]
        ran = [m_ for m_ in a["methods"] if m_ in t["methods"]]
        seeds_seen = sorted({int(x) for e in t["methods"].values() for x in e["per_seed"]})
        partial = ([f"**Partial**: only {', '.join(LABELS[m_] for m_ in ran)} with seed(s) "
                    f"{seeds_seen} were run for this target (see Runtime for the invocations).", ""]
                   if len(ran) < len(METHODS) or seeds_seen != sorted(a["seeds"]) else [])
        lines += [f"## Target `{target}`", "", *partial,
                  f"Start of stage 2 (the target's stage-1 PT prompt, {s1[1]} steps): best val acc "
                  f"{_f(s1[2])}.", "",
                  "| method | steps trained on the target | n | best: mean ± std | best: min / max "
                  "| last: mean ± std | last: min / max | best at step (per seed) |",
                  "|---|---|---|---|---|---|---|---|"]
        for meth in a["methods"]:
            r = t["methods"].get(meth)
            if not r:
                continue
            b, la = r["best_stats"], r["last_stats"]
            budget = {"pt": f"{r['steps']} from P_init",
                      "spot": f"{r['steps']} from the source prompt"}.get(
                          meth, f"{s1[1]} (stage 1) + {r['steps']}")
            lines.append(f"| {LABELS[meth]} | {budget} | {b['n']} | {_pm(b)} | {_f(b['min'])} / "
                         f"{_f(b['max'])} | {_pm(la)} | {_f(la['min'])} / {_f(la['max'])} | "
                         f"{', '.join(str(x) for x in r['best_steps'])} |")
        lines += ["", "Per seed (best / last):", "",
                  "| method | " + " | ".join(f"seed {s}" for s in a["seeds"]) + " |",
                  "|---|" + "---|" * len(a["seeds"])]
        for meth in a["methods"]:
            r = t["methods"].get(meth)
            if not r:
                continue
            cells = [f"{_f(r['per_seed'][str(s)]['best'])} / {_f(r['per_seed'][str(s)]['final'])}"
                     if str(s) in r["per_seed"] else "—" for s in a["seeds"]]
            lines.append(f"| {LABELS[meth]} | " + " | ".join(cells) + " |")
        ref = t["methods"].get("dtvg")
        if ref and len(t["methods"]) > 1:
            lines += ["", "Paired difference DTVG minus method, same seed (best; last), "
                      "mean ± std over seeds:", ""]
            for meth in a["methods"]:
                r = t["methods"].get(meth)
                if not r or meth == "dtvg":
                    continue
                common = [s for s in r["per_seed"] if s in ref["per_seed"]]
                db = stats([ref["per_seed"][s]["best"] - r["per_seed"][s]["best"] for s in common])
                dl = stats([ref["per_seed"][s]["final"] - r["per_seed"][s]["final"]
                            for s in common])
                lines.append(f"- vs {LABELS[meth]}: {db['mean']:+.2f} ± {_f(db['std'], 2)}; "
                             f"{dl['mean']:+.2f} ± {_f(dl['std'], 2)} (n = {db['n']})")
        lines += ["", "Mean validation curve (step: accuracy, mean over seeds):", ""]
        for meth in a["methods"]:
            r = t["methods"].get(meth)
            if r:
                lines.append(f"- {LABELS[meth]}: "
                             + ", ".join(f"{st}: {_f(v)}" for st, v in r["mean_curve"]))
        sim = t["stage1_similarities"]
        lines += ["", "What the selection rules see at the start (stage-1 artifacts, computed "
                  "offline with `dtvg_ds.prompt_math`, no training):", "",
                  "| source | relation to target | DTVG TS x1e3 | cosine of mean-pooled task vectors "
                  "| SPoT cosine of mean-pooled prompts |", "|---|---|---|---|---|"]
        for src in a["sources"]:
            lines.append(f"| {src} | {RELATION.get(target, {}).get(src, '?')} | "
                         f"{1e3 * sim['ts'][src]:+.1f} | {sim['tv_cosine'][src]:+.2f} | "
                         f"{sim['spot_cosine'][src]:.3f} |")
        lines += ["", f"Step-0 DTVG decision (released-code rule, a = 1): ranked S+ = "
                  f"{sim['positive']}, KC x1e3 = {[round(1e3 * x, 1) for x in sim['kc']]}, "
                  f"group = {sim['group']}. SPoT would pick "
                  f"`{max(sim['spot_cosine'], key=sim['spot_cosine'].get)}`."]
        if "dtvg" in t["methods"] and t["methods"]["dtvg"].get("groups"):
            g = t["methods"]["dtvg"]["groups"]
            lines += ["", f"### Groups DTVG chose on `{target}` (rank 0 decides every step; "
                      "`groups.jsonl`)", "",
                      "| source | relation to target | fraction of steps in the group (mean; "
                      "per seed) | mean TS x1e3 (mean over steps and seeds) |", "|---|---|---|---|"]
            for src in a["sources"]:
                fr = [x["fraction"][src] for x in g.values()]
                ts = [x["mean_ts"][src] for x in g.values()]
                lines.append(f"| {src} | {RELATION.get(target, {}).get(src, '?')} | "
                             f"{statistics.fmean(fr):.2f}; "
                             + " / ".join(f"{x:.2f}" for x in fr)
                             + f" | {1e3 * statistics.fmean(ts):+.2f} |")
            lines += [""]
            lines += ["", "Learned scales at the best checkpoint (mean over the r tokens; init 1; "
                      "`prompt.safetensors`), mean over seeds, for the DTVG-family runs:", ""]
            for meth in ("dtvg", "fixed_group", "all_sources", "target_only"):
                runs = [r for r in t["methods"].get(meth, {}).get("per_seed", {}).values()
                        if "scales" in r]
                if runs:
                    keys = ["target", *a["sources"]]
                    lines.append(f"- {LABELS[meth]}: " + ", ".join(
                        f"{'a_t' if k == 'target' else 'a_' + k} "
                        f"{statistics.fmean(r['scales'][k] for r in runs):.3f}" for k in keys))
            lines += [""]
            for seed, x in g.items():
                tl = "; ".join(f"from step {st}: {grp}" for st, grp in x["timeline"][:8])
                more = " ..." if len(x["timeline"]) > 8 else ""
                lines.append(f"- seed {seed}: {x['records']} regroupings, {x['changes']} group "
                             f"changes, mean group size {x['mean_k']:.2f}; {tl}{more}")
        fixed = t["methods"].get("fixed_group", {}).get("groups")
        if fixed:
            lines += ["", "Fixed group (computed once at step 0 from the stage-1 vectors, then "
                      "frozen): " + "; ".join(f"seed {s}: {x['timeline'][0][1]}"
                                              for s, x in fixed.items())]
        spot = t["methods"].get("spot")
        if spot and spot.get("spot_choice"):
            c = spot["spot_choice"]
            lines += ["", f"SPoT chose `{c['source']}` (cosine similarities of the stage-1 "
                      "prompts: " + ", ".join(f"{k} {v:.3f}" for k, v in c["similarities"].items())
                      + ")."]
        lines.append("")
    lines += ["## Commands", "",
              "Each run (seed `S`); the demo launcher helper `dtvg_ds.demo._launch` "
              "runs them with cwd = repo:", "", "```"]
    for t in summary["targets"].values():
        for meth in a["methods"]:
            r = t["methods"].get(meth)
            if r:
                lines.append(_cmd(r["args"], a["ranks"]))
    lines += ["```", "", "## Runtime", "",
              "- Invocations of this script (wall time, runs launched / reused): "
              + "; ".join(f"`{i['command']}` at {i['started']}: {i['seconds'] / 60:.1f} min, "
                          f"{i['launched']} / {i['reused']}" for i in summary["invocations"])
              + ".",
              f"- Sum of the wall times of all {summary['n_runs_total']} benchmark runs (all "
              f"invocations): {summary['sum_run_seconds'] / 60:.1f} min.",
              "- Wall time per run including launch and start-up (mean over runs): "
              + ", ".join(f"{LABELS[k]} {v:.0f} s" for k, v in summary["seconds_by_method"].items())
              + ".",
              "- Median training speed (steps/s from `metrics.jsonl`): "
              + ", ".join(f"{LABELS[k]} {v:.1f}" for k, v in summary["speed_by_method"].items())
              + "."]
    if summary["failures"]:
        lines += ["", "## Failed runs", ""] + [f"- `{f}`" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", nargs="+", default=["senti_c"])
    ap.add_argument("--sources", nargs="+", default=list(SOURCES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--stage1_steps", type=int, default=300,
                    help="steps of a stage-1 run this script has to train itself (as make demo)")
    ap.add_argument("--stage2_steps", type=int, default=200)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--demo_root", default="runs/demo", help="reuse complete stage-1 runs here")
    ap.add_argument("--out", default="bench/out/methods")
    ap.add_argument("--results", default="bench/RESULTS_methods.md")
    ap.add_argument("--max_minutes", type=float, default=0,
                    help="launch no new run after this long (0 = no limit); the report says so")
    ap.add_argument("--report_only", action="store_true", help="only read existing runs")
    args = ap.parse_args(argv)
    t_start = time.time()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    out, demo_root = (ROOT / args.out).resolve(), (ROOT / args.demo_root).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        from dtvg_ds.data.demo_backbone import ensure_demo_backbone

        ensure_demo_backbone(ROOT / ".cache" / "demo_backbone", log=lambda s: print("  " + s))
    print("== stage-1 artifacts", flush=True)
    s1dirs = {t: stage1_dir(t, demo_root, out, args.stage1_steps, args.ranks,
                            not args.report_only)
              for t in (*args.sources, *args.targets)}
    stage1 = {}
    for t, p in s1dirs.items():
        meta = read_json(p / "tpv.json")
        seed = read_json(p / "run_config.json")["config"]["seed"]
        stage1[t] = (rel(p), meta["steps"], meta["best_metric"]["value"], seed)
        print(f"  {t:<14} {rel(p):<36} {meta['steps']} steps, best {meta['best_metric']['value']}")

    timings: list[tuple[str, dict[str, Any]]] = []
    failures: list[str] = []
    stopped = False
    mpt_dir = out / "mpt_source"
    if "mpt" in args.methods and not args.report_only:
        print("== MPT source training (once)", flush=True)
        rec = launch(mpt_source_args(mpt_dir, [s1dirs[s] for s in args.sources], args.sources,
                                     args.stage1_steps), mpt_dir, args.ranks)
        if rec.get("error"):
            failures.append(f"{rel(mpt_dir)}: {rec['error'].splitlines()[0]}")
    for target in args.targets:
        s1 = stage1[target][1]
        for seed in args.seeds:
            for meth in args.methods:
                run_dir = out / target / meth / f"seed{seed}"
                ra = run_args(meth, target, seed, run_dir, s1dirs[target],
                              [s1dirs[s] for s in args.sources], s1, args.stage2_steps, mpt_dir)
                if args.report_only:
                    continue
                if args.max_minutes and time.time() - t_start > 60 * args.max_minutes:
                    stopped = True
                    continue
                print(f"== {target} seed {seed} {meth}", flush=True)
                rec = launch(ra, run_dir, args.ranks)
                timings.append((meth, rec))
                if rec.get("error"):
                    failures.append(f"{rel(run_dir)}: {rec['error'].splitlines()[0]}")

    # -- collect ------------------------------------------------------------------------------
    targets: dict[str, Any] = {}
    all_bench = []
    for target in args.targets:
        s1 = stage1[target][1]
        per: dict[str, Any] = {}
        for meth in args.methods:
            seeds_done: dict[str, Any] = {}
            for seed in args.seeds:
                run_dir = out / target / meth / f"seed{seed}"
                info = run_dir.with_name(run_dir.name + ".bench.json")
                if info.is_file():
                    all_bench.append((meth, read_json(info)))
                r = collect(run_dir)
                if r is not None:
                    seeds_done[str(seed)] = r
            if not seeds_done:
                continue
            bests = [r["best"] for r in seeds_done.values()]
            lasts = [r["final"] for r in seeds_done.values() if r["final"] is not None]
            curve_steps = sorted({st for r in seeds_done.values() for st, _ in r["curve"]})
            mean_curve = [(st, statistics.fmean(v for r in seeds_done.values()
                                                for s, v in r["curve"] if s == st))
                          for st in curve_steps]
            entry: dict[str, Any] = {
                "per_seed": {s: {k: v for k, v in r.items() if k != "groups"}
                             for s, r in seeds_done.items()},
                "best_stats": stats(bests), "last_stats": stats(lasts),
                "best_steps": [r["best_step"] for r in seeds_done.values()],
                "steps": next(iter(seeds_done.values()))["steps"], "mean_curve": mean_curve,
                "args": run_args(meth, target, "S", out / target / meth / "seedS", s1dirs[target],
                                 [s1dirs[s] for s in args.sources], s1, args.stage2_steps,
                                 mpt_dir)}
            if any("groups" in r for r in seeds_done.values()):
                entry["groups"] = {s: group_stats(r["groups"], args.sources)
                                   for s, r in seeds_done.items() if "groups" in r}
            if meth == "spot":
                ex = next(iter(seeds_done.values()))["extra"]
                entry["spot_choice"] = {"source": ex.get("spot_source"),
                                        "similarities": ex.get("spot_similarities", {})}
            per[meth] = entry
        targets[target] = {"methods": per, "stage1_similarities": stage1_similarities(
            s1dirs[target], {s: s1dirs[s] for s in args.sources})}

    secs: dict[str, list[float]] = {}
    loads: list[float] = []
    for meth, rec in all_bench:
        secs.setdefault(meth, []).append(rec["seconds"])
        loads += [rec["loadavg_1min_before"], rec["loadavg_1min_after"]]
    speed = {}
    for t in targets.values():
        for meth, e in t["methods"].items():
            v = [r["steps_per_second_median"] for r in e["per_seed"].values()
                 if r["steps_per_second_median"]]
            speed.setdefault(meth, []).extend(v)
    command = "python bench/compare_methods.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:])
    inv_log = out / "invocations.jsonl"
    if not args.report_only:  # the training invocations, kept across report-only re-runs
        with inv_log.open("a") as f:
            f.write(json.dumps({
                "command": command, "seconds": time.time() - t_start,
                "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)),
                "launched": sum(not r["reused"] for _, r in timings),
                "reused": sum(r["reused"] for _, r in timings)}) + "\n")
    invocations = read_jsonl(inv_log)
    summary = {
        "command": command,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {**vars(args), "sources": args.sources}, "machine": machine(),
        "stage1": stage1, "targets": targets,
        "invocations": invocations,
        "evals_per_run": sorted({len(r["curve"]) for t in targets.values()
                                 for e in t["methods"].values() for r in e["per_seed"].values()}),
        "seconds_by_method": {k: statistics.fmean(v) for k, v in secs.items()},
        "sum_run_seconds": sum(r["seconds"] for _, r in all_bench), "n_runs_total": len(all_bench),
        "speed_by_method": {k: statistics.median(v) for k, v in speed.items() if v},
        "load_min": min(loads) if loads else None, "load_max": max(loads) if loads else None,
        "failures": failures + (["time limit (--max_minutes) reached: some runs not launched"]
                                if stopped else []),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = report(summary)
    results = ROOT / args.results
    old = results.read_text() if results.is_file() else ""
    if NOTES_MARKER in old:  # hand-written reading of the results survives a regeneration
        text += "\n" + old[old.index(NOTES_MARKER):]
    results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
