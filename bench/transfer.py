"""Few-shot transfer on the demo world: PT, SPoT, MPT, ATTEMPT, DTVG, its ablations and extensions.

The regime the DTVG and MPT papers make their claims in: the target has k labelled examples
(k-shot, label-balanced, `--k_shot`), the sources are data-rich. Every run is a real
`deepspeed` launch of launchers/train.py (1 CPU rank, `ds_configs/zero2.json`; two runs at a time
on the 2 cores). The accuracy of a method does not depend on the ZeRO stage or the number of
ranks (tests/test_train_dist.py, test_dtvg_dist.py check 2-rank runs against 1-rank runs).

    .venv/bin/python bench/transfer.py [--targets ...] [--ks 16 64 256] [--seeds 1 2 3] \
        [--jobs 2] [--report_only]

Per (target, k, seed) cell; the seed picks the k examples (`--data_seed`) and the data order
(`--seed`), so the spread is over few-shot samples as well as training order:
- stage 1 of the target: PT from P_init on the k examples, `--target_stage1_steps` steps;
- PT, SPoT, MPT, ATTEMPT (target adaptation): tuning on the target from their start, the whole
  target budget (stage-1 steps + stage-2 steps) at the stage-1 learning rate 0.3; ATTEMPT
  attends over the 5 source prompts with its released defaults (target from the first source,
  attention lr = prompt lr, released pooling) and T = d*e (`--attempt_temperature 0`: the
  released 2087 is 768*e, T5-base's width; the demo backbone is narrower);
- DTVG and the four ablations (no_kc, target_only, all_sources, fixed_group): from the target's
  stage-1 prompt, `--stage2_steps` steps with the published coupling (the released scripts:
  prompt lr = a_t lr = lr_1, a_s lr = lr_2; here lr_1 = 0.1, the demo's stage-2 prompt rate, and
  lr_2 = lr_1 in the main grid), no weight decay; `--eval_on_start` logs the step-0 merge;
- the lr_2 sweep of the published NLG script (lr_2 = lr_1 x {0.1, 1, 10}) and the two
  extensions (`--source_scale_init 1/(n+1)`, `--merge_norm target`) as extra DTVG rows.
Sources (full data, `--source_stage1_steps`) and the MPT source prompt are trained once.

Runs go under `--out` (git-ignored); a finished run is reused. The report goes to the
"Few-shot transfer" section of `--results` (bench/RESULTS_methods.md), raw numbers to
`<out>/summary.json`, the figure to bench/transfer_accuracy_vs_k.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compare_methods import (  # noqa: E402
    collect,
    complete,
    group_stats,
    launch,
    machine,
    read_jsonl,
    rel,
    stage1_similarities,
    stats,
)
from dtvg_ds.demo import SOURCES  # noqa: E402

TARGETS = ("senti_c", "senti_c_flip", "has_color_or_number")
STAGE1_LR = 0.3
LR_1 = 0.1
MAIN = ("pt", "spot", "mpt", "attempt", "dtvg", "no_kc", "target_only", "all_sources", "fixed_group")
LABELS = {"pt": "PT", "spot": "SPoT", "mpt": "MPT", "attempt": "ATTEMPT", "dtvg": "DTVG",
          "no_kc": "DTVG w/o KC (S' = S+)", "target_only": "DTVG target only",
          "all_sources": "DTVG all sources", "fixed_group": "DTVG fixed group",
          "dtvg_lr2_lo": "DTVG lr_2 = lr_1/10", "dtvg_lr2_hi": "DTVG lr_2 = 10 lr_1",
          "dtvg_init_inv": "DTVG + a_s init 1/(n+1) (ext.)",
          "dtvg_norm": "DTVG + norm-matched merge (ext.)"}
EXTRAS = ("dtvg_lr2_lo", "dtvg_lr2_hi", "dtvg_init_inv", "dtvg_norm")
RELATION = {
    "senti_c": {"senti_a": "useful (block 0)", "senti_b": "useful (block 3)",
                "senti_a_flip": "conflicting (block 0 inverted)", "has_color": "unrelated",
                "has_number": "unrelated"},
    "senti_c_flip": {"senti_a": "conflicting (block 0 not inverted)",
                     "senti_b": "conflicting (block 3 not inverted)",
                     "senti_a_flip": "useful (block 0 inverted)", "has_color": "unrelated",
                     "has_number": "unrelated"},
    "has_color_or_number": {"senti_a": "unrelated", "senti_b": "unrelated",
                            "senti_a_flip": "unrelated", "has_color": "useful (half the yes)",
                            "has_number": "useful (half the yes)"},
}
SECTION = "<!-- transfer benchmark (bench/transfer.py) -->"
PLOT = ROOT / "bench" / "transfer_accuracy_vs_k.png"


def common(out: Path, task: str, steps: int, k: int = 0, seed: int = 0) -> list[str]:
    """Flags every run shares (the demo's settings, 1 rank, ZeRO-2, no extra loggers)."""
    args = ["--deepspeed", "ds_configs/zero2.json", "--task", task, "--model_name_or_path", "demo",
            "--output_dir", rel(out), "--num_virtual_tokens", "20", "--max_steps", str(steps),
            "--eval_steps", str(max(-(-steps // 4), 1)), "--save_steps", "0",
            "--per_device_train_batch_size", "16", "--max_eval_samples", "400",
            "--logging_steps", "10", "--warmup_steps", "10", "--report_to", "none"]
    if k:
        args += ["--k_shot", str(k), "--data_seed", str(seed), "--seed", str(seed)]
    return args


def cell_dir(out: Path, target: str, k: int, seed: int) -> Path:
    return out / target / f"k{k}" / f"seed{seed}"


def stage2_args(method: str, target: str, k: int, seed: int, a: argparse.Namespace,
                out: Path, sources: list[Path], mpt_src: Path) -> list[str]:
    """launchers/train.py flags of one target run of the grid."""
    cell = cell_dir(out, target, k, seed)
    s1, s2 = a.target_stage1_steps, a.stage2_steps
    if method == "stage1":
        return ["--method", "pt", "--learning_rate", str(STAGE1_LR),
                *common(cell / "stage1", target, s1, k, seed)]
    src = [rel(p) for p in sources]
    if method in ("pt", "spot", "mpt", "attempt"):
        head = {"pt": ["--method", "pt"],
                "attempt": ["--method", "attempt", "--source_tpvs", *src,
                            "--attempt_temperature", "0"],
                "spot": ["--method", "spot", "--target_tpv", rel(cell / "stage1"), "--source_tpvs",
                         *src],
                "mpt": ["--method", "mpt_target", "--mpt_source", rel(mpt_src)]}[method]
        return [*head, "--learning_rate", str(STAGE1_LR), *common(cell / method, target, s1 + s2,
                                                                     k, seed)]
    lr_2 = {"dtvg_lr2_lo": LR_1 / 10, "dtvg_lr2_hi": LR_1 * 10}.get(method, LR_1)
    ablation = method if method in ("no_kc", "target_only", "all_sources", "fixed_group") else "none"
    extra = {"dtvg_init_inv": ["--source_scale_init", str(1 / (len(sources) + 1))],
             "dtvg_norm": ["--merge_norm", "target"]}.get(method, [])
    return ["--method", "dtvg", "--target_tpv", rel(cell / "stage1"), "--source_tpvs", *src,
            "--learning_rate", str(LR_1), "--target_task_scale_learning_rate", str(LR_1),
            "--source_task_scale_learning_rate", str(lr_2), "--ablation", ablation, *extra,
            "--weight_decay", "0", "--eval_on_start", *common(cell / method, target, s2, k, seed)]


def run_all(jobs: list[tuple[list[str], Path]], workers: int, deadline: float) -> None:
    """Launch `jobs` (flags, run dir), `workers` at a time, 1 rank each; skip past the deadline."""
    def one(job: tuple[list[str], Path]) -> None:
        if time.time() > deadline:
            return
        launch(job[0], job[1], 1)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, jobs))


def train(a: argparse.Namespace, out: Path) -> None:
    deadline = time.time() + (a.max_minutes * 60 if a.max_minutes else 1e12)
    src_dirs = {s: out / "sources" / s for s in SOURCES}
    run_all([(["--method", "pt", "--learning_rate", str(STAGE1_LR),
                *common(d, s, a.source_stage1_steps)], d) for s, d in src_dirs.items()],
            a.jobs, deadline)
    mpt_src = out / "sources" / "mpt_source"
    run_all([(["--method", "mpt_source", "--source_tpvs", *[rel(p) for p in src_dirs.values()],
               "--learning_rate", str(STAGE1_LR),
               *common(mpt_src, "+".join(SOURCES), a.source_stage1_steps)], mpt_src)],
            1, deadline)
    cells = [(t, k, s) for k in a.ks for t in a.targets for s in a.seeds]
    sources = list(src_dirs.values())
    run_all([(stage2_args("stage1", t, k, s, a, out, sources, mpt_src),
              cell_dir(out, t, k, s) / "stage1") for t, k, s in cells], a.jobs, deadline)
    for methods in (MAIN, EXTRAS if a.extras else ()):
        run_all([(stage2_args(m, t, k, s, a, out, sources, mpt_src), cell_dir(out, t, k, s) / m)
                 for t, k, s in cells for m in methods], a.jobs, deadline)


# ----------------------------------------------------------------------------------------------
# reading the runs
# ----------------------------------------------------------------------------------------------

def explain(run_dir: Path) -> dict[str, Any]:
    """Step-0 and last diagnostics of a DTVG-family run from its logs (groups.jsonl, metrics)."""
    groups = read_jsonl(run_dir / "groups.jsonl")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    at0 = [m["eval_score"] for m in metrics if m.get("step") == 0 and "eval_score" in m]
    rec: dict[str, Any] = {"acc_step0": at0[0] if at0 else None}
    if groups:
        g0, gl = groups[0], groups[-1]
        rec |= {"group0": g0["group"], "group_last": gl["group"],
                "mix_ratio0": g0["norm_mix"] / max(g0["norm_target"], 1e-12),
                "mix_ratio_last": gl["norm_mix"] / max(gl["norm_target"], 1e-12),
                "a_t_last": [gl["scale_target_min"], gl["scale_target_mean"], gl["scale_target_max"]],
                "a_group_last": gl["scale_group_mean"]}
    return rec


def attention_stats(run_dir: Path) -> dict[str, Any] | None:
    """ATTEMPT's attention at its last evaluation (eval_examples.jsonl): per candidate the mean
    weight over the validation examples and its spread (population std) across them."""
    evals = [e for e in read_jsonl(run_dir / "eval_examples.jsonl") if e.get("examples")]
    if not evals:
        return None
    rows = [r["attention"] for r in evals[-1]["examples"]]
    return {n: {"mean": statistics.fmean(r[n] for r in rows),
                "std": statistics.pstdev(r[n] for r in rows)} for n in rows[0]}


def summarize(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for t in a.targets:
        for k in a.ks:
            for s in a.seeds:
                cell = cell_dir(out, t, k, s)
                s1 = collect(cell / "stage1")
                rec: dict[str, Any] = {"stage1": s1["best"] if s1 else None}
                srcs = {n: out / "sources" / n for n in SOURCES}
                if complete(cell / "stage1") and all(complete(p) for p in srcs.values()):
                    rec["similarities"] = stage1_similarities(cell / "stage1", srcs)
                for m in (*MAIN, *EXTRAS):
                    c = collect(cell / m)
                    if c is None:
                        continue
                    rec[m] = {"best": c["best"], "final": c["final"], "curve": c["curve"]}
                    if "groups" in c:
                        rec[m]["groups"] = group_stats(c["groups"], list(SOURCES))
                        rec[m]["explain"] = explain(cell / m)
                    if m == "spot":
                        rec[m]["choice"] = c["extra"].get("spot_source")
                    if m == "attempt":
                        rec[m]["attention"] = attention_stats(cell / m)
                cells[f"{t}|{k}|{s}"] = rec
    srcs = {n: collect(out / "sources" / n) for n in SOURCES}
    return {"settings": {"targets": a.targets, "ks": a.ks, "seeds": a.seeds,
                         "source_stage1_steps": a.source_stage1_steps,
                         "target_stage1_steps": a.target_stage1_steps,
                         "stage2_steps": a.stage2_steps, "lr_1": LR_1, "stage1_lr": STAGE1_LR,
                         "out": rel(out)},
            "sources": {n: (c["best"] if c else None) for n, c in srcs.items()},
            "cells": cells, "machine": machine(),
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------

def _f(x: float | None, nd: int = 1) -> str:
    return "—" if x is None or x != x else f"{x:.{nd}f}"


def _vals(summary: dict[str, Any], t: str, k: int, m: str, key: str = "best") -> dict[int, float]:
    out = {}
    for s in summary["settings"]["seeds"]:
        rec = summary["cells"].get(f"{t}|{k}|{s}", {})
        if m == "stage1" and rec.get("stage1") is not None:
            out[s] = rec["stage1"]
        elif isinstance(rec.get(m), dict):
            out[s] = rec[m][key]
    return out


def _pm(xs: list[float]) -> str:
    st = stats(xs)
    return f"{_f(st['mean'])} ± {_f(st['std'])}" if xs else "—"


def accuracy_table(summary: dict[str, Any], t: str) -> list[str]:
    ks = summary["settings"]["ks"]
    lines = ["| method | " + " | ".join(f"k = {k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for m in ("stage1", *MAIN, *EXTRAS):
        label = "target stage 1 (PT, stage-1 steps only)" if m == "stage1" else LABELS[m]
        row = [_pm(list(_vals(summary, t, k, m).values())) for k in ks]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def paired_table(summary: dict[str, Any], t: str) -> list[str]:
    ks = summary["settings"]["ks"]
    lines = ["| DTVG minus | " + " | ".join(f"k = {k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for m in ("pt", "spot", "mpt", "attempt", "no_kc", "target_only", "all_sources", "fixed_group", *EXTRAS):
        row = []
        for k in ks:
            d, o = _vals(summary, t, k, "dtvg"), _vals(summary, t, k, m)
            diffs = [d[s] - o[s] for s in d if s in o]
            row.append(f"{_pm(diffs)} ({sum(x > 0 for x in diffs)}/{len(diffs)} won)" if diffs else "—")
        lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")
    return lines


def explain_table(summary: dict[str, Any], t: str) -> list[str]:
    ks, seeds = summary["settings"]["ks"], summary["settings"]["seeds"]
    lines = ["| k | seed | stage-1 acc | step-0 group (TS order) | P_mix acc at step 0 | "
             "‖P_mix−P_init‖/‖T_t‖ step 0 → last | group changes | last group | a_t min/mean/max "
             "(last) | mean a_s in group (last) | DTVG best |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in ks:
        for s in seeds:
            rec = summary["cells"].get(f"{t}|{k}|{s}", {})
            d = rec.get("dtvg")
            if not isinstance(d, dict) or "explain" not in d:
                continue
            e, g = d["explain"], d["groups"]
            a_t = "/".join(_f(x, 2) for x in e.get("a_t_last", []))
            lines.append(
                f"| {k} | {s} | {_f(rec.get('stage1'))} | {', '.join(e.get('group0', [])) or '∅'} | "
                f"{_f(e['acc_step0'])} | {_f(e.get('mix_ratio0'), 2)} → {_f(e.get('mix_ratio_last'), 2)} | "
                f"{g['changes']} | {', '.join(e.get('group_last', [])) or '∅'} | {a_t} | "
                f"{_f(e.get('a_group_last'), 2)} | {_f(d['best'])} |")
    return lines


def sanity(summary: dict[str, Any], t: str) -> list[str]:
    """The target-only run's step-0 prompt is the stage-1 artifact itself: same accuracy."""
    same, n = 0, 0
    for key, rec in summary["cells"].items():
        d = rec.get("target_only")
        if key.startswith(f"{t}|") and isinstance(d, dict) and rec.get("stage1") is not None:
            acc0 = [v for st, v in d["curve"] if st == 0]
            if acc0:
                n += 1
                same += abs(acc0[0] - rec["stage1"]) < 1e-9
    return [f"Check: the target-only ablation's step-0 prompt (P_init + T_t) scores exactly the "
            f"stage-1 artifact's best accuracy in {same} of {n} runs."] if n else []


def timeline(summary: dict[str, Any], t: str) -> list[str]:
    """The group over steps of the DTVG run of `t` whose group changed most (all k, seeds)."""
    best = None
    for key, rec in summary["cells"].items():
        d = rec.get("dtvg")
        if key.startswith(f"{t}|") and isinstance(d, dict) and "groups" in d:
            if best is None or d["groups"]["changes"] > best[1]["groups"]["changes"]:
                best = (key, d)
    if best is None or not best[1]["groups"]["changes"]:
        return ["No DTVG run of this target changed its group."]
    _, k, seed = best[0].split("|")
    steps = [f"step {st}: {{{', '.join(g) or '∅'}}}" for st, g in best[1]["groups"]["timeline"]]
    return [f"Group over time of the run that regrouped most (k = {k}, seed {seed}, "
            f"{best[1]['groups']['changes']} changes): " + "; ".join(steps) + "."]


def membership_table(summary: dict[str, Any], t: str) -> list[str]:
    ks, seeds = summary["settings"]["ks"], summary["settings"]["seeds"]
    lines = ["| source | relation | " + " | ".join(f"in group, k = {k}" for k in ks)
             + " | mean TS x1e3 at step 0 (all k, seeds) |",
             "|---|---|" + "---|" * len(ks) + "---|"]
    for src in SOURCES:
        row, ts0 = [], []
        for k in ks:
            fr = []
            for s in seeds:
                d = summary["cells"].get(f"{t}|{k}|{s}", {}).get("dtvg")
                if isinstance(d, dict) and "groups" in d:
                    fr.append(d["groups"]["fraction"][src])
                sim = summary["cells"].get(f"{t}|{k}|{s}", {}).get("similarities")
                if sim:
                    ts0.append(sim["ts"][src] * 1e3)
            row.append(_f(statistics.fmean(fr), 2) if fr else "—")
        lines.append(f"| {src} | {RELATION[t][src]} | " + " | ".join(row)
                     + f" | {_f(statistics.fmean(ts0), 1) if ts0 else '—'} |")
    return lines


def attention_table(summary: dict[str, Any], t: str) -> list[str]:
    """ATTEMPT: mean attention weight per candidate at the last evaluation (mean over seeds),
    and the largest per-candidate spread across validation examples (how input-dependent)."""
    ks, seeds = summary["settings"]["ks"], summary["settings"]["seeds"]
    names = [*SOURCES, "target"]
    lines = ["| k | " + " | ".join(f"{n} ({RELATION[t][n].split(' (')[0]})" if n in RELATION[t]
                                     else n for n in names) + " | max std across examples |",
             "|---|" + "---|" * (len(names) + 1)]
    for k in ks:
        att = [summary["cells"].get(f"{t}|{k}|{s}", {}).get("attempt", {}).get("attention")
               for s in seeds]
        att = [x for x in att if x]
        if not att:
            continue
        means = [_f(statistics.fmean(x[n]["mean"] for x in att), 3) for n in names]
        spread = max(x[n]["std"] for x in att for n in names)
        lines.append(f"| {k} | " + " | ".join(means) + f" | {spread:.1e} |")
    return lines


def plot(summary: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ts, ks = summary["settings"]["targets"], summary["settings"]["ks"]
    fig, axes = plt.subplots(1, len(ts), figsize=(5.2 * len(ts), 4.2), squeeze=False)
    for ax, t in zip(axes[0], ts, strict=True):
        for m in (*MAIN, "dtvg_init_inv", "dtvg_norm"):
            pts = [(k, stats(list(_vals(summary, t, k, m).values()))) for k in ks]
            pts = [(k, st) for k, st in pts if st["n"]]
            if not pts:
                continue
            style = "-" if m in ("pt", "spot", "mpt", "attempt", "dtvg") else ":"
            ax.errorbar([k for k, _ in pts], [st["mean"] for _, st in pts],
                        yerr=[0 if st["std"] != st["std"] else st["std"] for _, st in pts],
                        label=LABELS[m], linestyle=style, marker="o", capsize=2,
                        linewidth=2.2 if m == "dtvg" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(t)
        ax.set_xlabel("k (target training examples)")
        ax.set_ylabel("validation accuracy (best of run)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=90)
    return True


def report(summary: dict[str, Any], command: str, plotted: bool) -> str:
    a, m = summary["settings"], summary["machine"]
    src = ", ".join(f"{n} {_f(v)}" for n, v in summary["sources"].items())
    lines = [SECTION, "", "# Few-shot transfer (issue 14): the regime of the papers' claims", "",
             f"Generated by `{command}` on {summary['finished']}; raw numbers in "
             f"`{a['out']}/summary.json`, runs under `{a['out']}/` (git-ignored). "
             f"Machine: {m['cpus']}-core CPU, no GPU, torch {m['torch']}, DeepSpeed {m['deepspeed']}.",
             "", "## Setup", "",
             f"- Targets: {', '.join(a['targets'])}; k in {a['ks']} training examples "
             f"(label-balanced), seeds {a['seeds']} (the seed picks the k examples and the data "
             "order). 400 validation examples (0.25 points each); **best** of the run's evaluations "
             "(every max_steps/4 steps), the same number of looks for every method.",
             f"- Sources (full data, {a['source_stage1_steps']} steps PT each, best val acc): {src}. "
             "MPT's shared prompt is distilled from them once.",
             f"- Budgets: target stage 1 = {a['target_stage1_steps']} steps PT from P_init (lr "
             f"{a['stage1_lr']}); PT, SPoT, MPT, ATTEMPT (T = d*e) = "
             f"{a['target_stage1_steps'] + a['stage2_steps']} "
             f"steps from their start (lr {a['stage1_lr']}); DTVG family = the target's stage 1 + "
             f"{a['stage2_steps']} steps from its stage-1 prompt with the published coupling: prompt lr"
             f" = a_t lr = lr_1 = {a['lr_1']}, a_s lr = lr_2 = lr_1 (sweep rows: lr_1/10 and "
             "10 lr_1, as the released NLG script sweeps lr_2), no weight decay. Every method sees "
             "the same k examples per seed. 1 CPU rank per run, `ds_configs/zero2.json`, r = 20, "
             "micro batch 16.",
             f"- Plot: `bench/{PLOT.name}`" + ("" if plotted else " (not drawn: no matplotlib)")
             + "; solid lines PT/SPoT/MPT/ATTEMPT/DTVG, dotted the ablations and extensions; bars "
             "= std over seeds.", ""]
    for t in a["targets"]:
        lines += [f"## Target `{t}`", "", "Validation accuracy (best), mean ± std over seeds:", "",
                  *accuracy_table(summary, t), "",
                  "Paired differences (same seed = same k examples and data order), DTVG minus "
                  "method, best accuracy; in brackets how many seeds DTVG won:", "",
                  *paired_table(summary, t), "",
                  "ATTEMPT's attention at its last evaluation (`eval_examples.jsonl`; mean "
                  "weight over the 400 validation examples, mean over seeds). Its target prompt "
                  f"starts from the first source, {SOURCES[0]} (the released default):", "",
                  *attention_table(summary, t), "",
                  "Which sources DTVG grouped (fraction of steps, mean over seeds):", "",
                  *membership_table(summary, t), "",
                  "What the logs say (DTVG, released rule; `groups.jsonl` and the step-0 "
                  "evaluation):", "", *explain_table(summary, t), "", *timeline(summary, t), "",
                  *sanity(summary, t), ""]
    return "\n".join(lines) + "\n"


def write_report(text: str, results: Path) -> None:
    """Replace the transfer section of `results` (from its marker to the end), keep the rest."""
    old = results.read_text() if results.is_file() else ""
    head = old.split(SECTION)[0].rstrip() + "\n\n" if SECTION in old or old else ""
    if SECTION not in old and old:
        head = old.rstrip() + "\n\n"
    tail = ""
    if SECTION in old and "<!-- end transfer -->" in old:
        tail = old.split("<!-- end transfer -->", 1)[1]
    results.write_text(head + text + "<!-- end transfer -->" + tail)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/out/transfer")
    ap.add_argument("--results", default="bench/RESULTS_methods.md")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--ks", nargs="+", type=int, default=[16, 64, 256])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--source_stage1_steps", type=int, default=300)
    ap.add_argument("--target_stage1_steps", type=int, default=100)
    ap.add_argument("--stage2_steps", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (1 rank each)")
    ap.add_argument("--no_extras", dest="extras", action="store_false",
                    help="skip the lr_2 sweep and the extension rows")
    ap.add_argument("--max_minutes", type=float, default=0, help="start no run after this")
    ap.add_argument("--report_only", action="store_true")
    a = ap.parse_args(argv)
    out = (ROOT / a.out).resolve()
    if not a.report_only:
        train(a, out)
    summary = summarize(a, out)
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plotted = plot(summary)
    cmd = "python bench/transfer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(report(summary, cmd.strip(), plotted), ROOT / a.results)
    print(f"report: {a.results}; summary: {rel(out / 'summary.json')}")


if __name__ == "__main__":
    main()
