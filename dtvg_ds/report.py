"""`python -m dtvg_ds.report <output_dir> [--out DIR]`: PNG figures of a run, for people to look at.

Reads what every run writes (`metrics.jsonl`; `tpv.json` / `run_config.json` when present) and,
for DTVG, `groups.jsonl` and the final scales in `prompt.safetensors`. Works on a finished run
and on one still in progress (a torn last line is skipped). Writes into `<output_dir>/report/`
(or `--out`), each PNG atomically:

- `training.png` (every run): training loss over steps (raw and a moving average; MPT's loss
  parts too) and the validation metric (the primary one, mixture members thin), best marked.
- `dtvg_groups.png`: group membership, sources x steps: in the group / TS above the threshold
  but not chosen / excluded; the group size k above it.
- `dtvg_target_similarity.png`: TS of every source over steps (bold while in the group), the
  TS threshold dashed.
- `dtvg_kc.png`: the knowledge-consistency curve KC(k) over prefixes of the TS ranking at a few
  steps overlaid, the chosen k marked.
- `attempt_attention.png` (ATTEMPT, from `eval_examples.jsonl`): the distribution over the
  validation examples of each candidate prompt's attention weight at the last evaluation, and
  the mean weight of each candidate over the evaluations.
- `summary.png`: one page: run facts, loss, validation metric and (DTVG) the three figures
  above plus the final per-source scales.

Matplotlib is used through its object API (`Figure`, no pyplot): no global backend state and no
display needed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtvg_ds.artifacts import META_FILE, TENSORS_FILE, atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
GROUPS_FILE = "groups.jsonl"
EXAMPLES_FILE = "eval_examples.jsonl"  # per-example records of each evaluation (evaluation.py)
RUN_CONFIG_FILE = "run_config.json"
DPI = 110
# Membership states of a source at a regrouping (heat map values and their legend).
EXCLUDED, CANDIDATE, IN_GROUP = 0, 1, 2
STATE_COLORS = ("#eeeeee", "#9ecae1", "#08519c")
STATE_LABELS = ("excluded (TS below threshold)", "TS above threshold, not chosen", "in the group")
# Eval record keys that are bookkeeping, not task metrics.
_NOT_METRICS = {"eval_seconds", "eval_runtime", "eval_samples_per_second", "eval_backbone_resident",
                "eval_average"}


class ReportError(ValueError):
    """The directory is not a run output (or has nothing to plot yet)."""


@dataclass
class RunLogs:
    """Everything a report reads from one output dir."""

    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)   # records with "loss"
    evals: list[dict[str, Any]] = field(default_factory=list)   # records with eval_* keys
    groups: list[dict[str, Any]] = field(default_factory=list)  # DTVG regroupings
    meta: dict[str, Any] = field(default_factory=dict)          # tpv.json (best so far)
    config: dict[str, Any] = field(default_factory=dict)        # run_config.json "config"
    world_size: int | None = None
    scales: dict[str, Any] = field(default_factory=dict)        # DTVG scale tensors
    examples: list[dict[str, Any]] = field(default_factory=list)  # ATTEMPT attention per eval
    skipped_lines: int = 0

    @property
    def has_attention(self) -> bool:
        return any("attention" in r for e in self.examples for r in e.get("examples", []))

    @property
    def is_dtvg(self) -> bool:
        return bool(self.groups)

    @property
    def sources(self) -> list[str]:
        """Source names, most target-similar (mean TS) first: the heat map's top row."""
        names: list[str] = list(self.meta.get("extra", {}).get("sources", []))
        for r in self.groups:
            names += [n for n in r.get("ts", {}) if n not in names]
        mean = {n: _mean([r["ts"][n] for r in self.groups if n in r.get("ts", {})]) for n in names}
        return sorted(names, key=lambda n: -mean[n] if math.isfinite(mean[n]) else math.inf)

    @property
    def metric_name(self) -> str:
        return str(self.meta.get("best_metric", {}).get("name") or "score")

    @property
    def reference(self) -> tuple[str, float] | None:
        """(label, best value) of the target's stage-1 prompt (DTVG/SPoT `--target_tpv`), the
        baseline a stage-2 run should beat; None if unknown or another metric."""
        tpv = self.config.get("target_tpv")
        if not tpv:
            return None
        try:
            best = json.loads((Path(tpv) / META_FILE).read_text())["best_metric"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if best.get("name") != self.metric_name or best.get("value") is None:
            return None
        return f"target's stage-1 prompt: {best['value']:.4g}", float(best["value"])

    def metric_key(self) -> str | None:
        """The eval record key of the metric best checkpoints are chosen by."""
        keys = {k for r in self.evals for k in r}
        for k in (f"eval_{self.metric_name}", "eval_score"):
            if k in keys:
                return k
        rest = sorted(k for k in keys if k.startswith("eval_") and k not in _NOT_METRICS)
        return rest[0] if rest else None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSONL log and how many lines were unreadable (a run may be mid-write)."""
    recs, bad = [], 0
    if not path.is_file():
        return recs, bad
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(obj, dict) and "step" in obj:
            recs.append(obj)
        else:
            bad += 1
    return recs, bad


def load_run(output_dir: str | Path) -> RunLogs:
    """Read a run's logs (no validation beyond "is this a run dir")."""
    p = Path(output_dir)
    if not p.is_dir():
        raise ReportError(f"{p}: no such directory; pass a run's --output_dir")
    metrics, bad_m = _read_jsonl(p / METRICS_FILE)
    groups, bad_g = _read_jsonl(p / GROUPS_FILE)
    if not metrics and not groups:
        raise ReportError(f"{p}: no {METRICS_FILE} records (yet); is this a run's --output_dir?")
    examples, bad_e = _read_jsonl(p / EXAMPLES_FILE)
    run = RunLogs(p, skipped_lines=bad_m + bad_g + bad_e, groups=groups, examples=examples)
    run.train = [r for r in metrics if "loss" in r]
    run.evals = [r for r in metrics if any(k.startswith("eval_") for k in r)]
    for name, target in ((META_FILE, "meta"), (RUN_CONFIG_FILE, "config")):
        try:
            obj = json.loads((p / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue  # optional: written at the first best checkpoint / at start
        if target == "meta":
            run.meta = obj
        else:
            run.config, run.world_size = obj.get("config", {}), obj.get("world_size")
    if run.is_dtvg and (p / TENSORS_FILE).is_file():
        try:
            from safetensors.torch import load_file

            t = load_file(str(p / TENSORS_FILE))
            run.scales = {k: t[k] for k in ("scale_target", "scale_sources") if k in t}
        except Exception:  # a torn file while the run writes: the panel is optional
            run.scales = {}
    return run


# ----------------------------------------------------------------------------------------------
# panels: each draws into a given Axes, so the single figures and the summary share them
# ----------------------------------------------------------------------------------------------

def _source_colors(run: RunLogs) -> dict[str, Any]:
    """One fixed color per source across every panel (tab10, then tab20)."""
    from matplotlib import colormaps

    names = sorted(run.sources)  # by name: the same source keeps its color in every report
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _moving_average(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_loss(ax: Any, run: RunLogs) -> None:
    """Training loss over steps; a moving average when there are many points; MPT's parts."""
    ax.set_title("training loss")
    if not run.train:
        _empty(ax, "no training loss logged yet")
        return
    steps = [r["step"] for r in run.train]
    loss = [float(r["loss"]) for r in run.train]
    many = len(loss) > 20
    ax.plot(steps, loss, color="C0", lw=1, alpha=0.35 if many else 1, label="loss")
    if many:
        w = max(3, len(loss) // 20)
        ax.plot(steps, _moving_average(loss, w), color="C0", lw=2, label=f"loss (mean of {w})")
    for i, part in enumerate(k for k in ("loss_plm", "loss_logits", "loss_hidden")
                             if any(k in r for r in run.train)):
        pts = [(r["step"], r[part]) for r in run.train if part in r]
        ax.plot(*zip(*pts, strict=True), lw=1, color=f"C{i + 1}", label=part)
    if min(loss) > 0 and max(loss) / min(loss) > 20:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")  # a loss that falls by orders of magnitude stays readable
        # plain numbers ("0.05", not "5 x 10^-2"); minor ticks labelled at 2 and 5 only
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5)
            else ""))
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")


def draw_metric(ax: Any, run: RunLogs) -> None:
    """The validation metric over steps, the best evaluation starred (mixture members thin)."""
    key = run.metric_key()
    name = key[len("eval_"):] if key else run.metric_name
    ax.set_title(f"validation {name}")
    if key is None:
        _empty(ax, "no evaluation yet")
        return
    pts = [(r["step"], float(r[key])) for r in run.evals if key in r]
    members = sorted({k for r in run.evals for k in r if k.startswith("eval_") and "/" in k
                      and k.endswith(("/score", "/accuracy"))})
    for i, m in enumerate(members):
        mp = [(r["step"], float(r[m])) for r in run.evals if m in r]
        ax.plot(*zip(*mp, strict=True), lw=1, ls="--", color=f"C{i + 1}", label=m[5:])
    xs, ys = zip(*pts, strict=True)
    ax.plot(xs, ys, "o-", color="C0", lw=2, ms=4, label=name)
    ref = run.reference
    if ref is not None:
        ax.axhline(ref[1], color="0.35", ls=":", lw=1.5, label=ref[0])
    best = max(range(len(ys)), key=lambda i: (ys[i], -xs[i]))  # first best, as training keeps
    ax.plot([xs[best]], [ys[best]], "*", color="C3", ms=14, zorder=5,
            label=f"best {ys[best]:.4g} @ step {xs[best]}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def membership(run: RunLogs) -> tuple[list[str], list[int], list[list[int]]]:
    """(sources, regrouping steps, states[source][regrouping]) with states from STATE_*."""
    names = run.sources
    steps = [int(r["step"]) for r in run.groups]
    grid = []
    for n in names:
        row = []
        for r in run.groups:
            state = (IN_GROUP if n in r.get("group", []) else
                     CANDIDATE if n in r.get("positive", []) else EXCLUDED)
            row.append(state)
        grid.append(row)
    return names, steps, grid


def _step_edges(steps: list[int], last: int | None) -> list[float]:
    """Cell edges: a regrouping's group holds from its step to the next one (or the run end)."""
    end = max(steps[-1] + 1, last if last is not None else steps[-1] + 1)
    return [*steps, end]


def draw_membership(ax: Any, run: RunLogs, k_ax: Any | None = None) -> None:
    """Sources x steps heat map of group membership (k above it in `k_ax` if given)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    names, steps, grid = membership(run)
    last = run.train[-1]["step"] if run.train else None
    edges = _step_edges(steps, last)
    cmap = ListedColormap(STATE_COLORS)
    ax.pcolormesh(edges, range(len(names) + 1), grid, cmap=cmap,
                  norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3), shading="flat")
    ax.set_yticks([i + 0.5 for i in range(len(names))], names)
    ax.set_ylim(len(names), 0)  # most similar source on top
    ax.set_xlabel("step")
    ax.set_xlim(edges[0], edges[-1])
    ax.legend(handles=[Patch(color=c, label=lab) for c, lab in zip(STATE_COLORS, STATE_LABELS,
                                                                   strict=True)],
              loc="upper center", bbox_to_anchor=(0.5, -0.18 if k_ax is None else -0.25),
              ncol=3, fontsize=8, frameon=False)
    changes = sum(1 for a, b in zip(run.groups, run.groups[1:], strict=False)
                  if set(a.get("group", [])) != set(b.get("group", [])))
    title = f"group membership ({len(steps)} regroupings, group changed {changes}x)"
    if k_ax is None:
        ax.set_title(title)
        return
    k_ax.set_title(title)
    k_ax.step(steps, [len(r.get("group", [])) for r in run.groups], where="post", color="k")
    k_ax.set_ylabel("k")
    k_ax.set_ylim(-0.3, len(names) + 0.3)
    k_ax.grid(alpha=0.3)
    k_ax.tick_params(labelbottom=False)


def draw_target_similarity(ax: Any, run: RunLogs) -> None:
    """TS per source over steps: thin always, bold while the source is in the group."""
    colors = _source_colors(run)
    steps = [r["step"] for r in run.groups]
    for n in run.sources:
        ts = [r.get("ts", {}).get(n, math.nan) for r in run.groups]
        on = [t if n in r.get("group", []) else math.nan for t, r in zip(ts, run.groups,
                                                                        strict=True)]
        ax.plot(steps, ts, color=colors[n], lw=1, alpha=0.45)
        ax.plot(steps, on, color=colors[n], lw=2.5, label=n)
    thr = run.groups[-1].get("ts_threshold")
    if thr is not None:
        ax.axhline(thr, color="k", ls="--", lw=1, label=f"threshold {thr:g}")
    ax.set_title("target similarity TS per source (bold: in the group)")
    ax.set_xlabel("step")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def kc_steps(run: RunLogs, n: int = 5) -> list[int]:
    """Indices of up to `n` regroupings spread over the run (first and last included)."""
    m = len(run.groups)
    if m <= n:
        return list(range(m))
    return sorted({round(i * (m - 1) / (n - 1)) for i in range(n)})


def draw_kc(ax: Any, run: RunLogs) -> None:
    """KC(k) over prefixes of the TS ranking at a few steps overlaid; the chosen k starred."""
    from matplotlib import colormaps

    picks = kc_steps(run)
    cmap = colormaps["viridis"]
    drawn = 0
    for j, i in enumerate(picks):
        r = run.groups[i]
        kc = r.get("kc", [])
        if not kc:
            continue
        c = cmap(j / max(1, len(picks) - 1) * 0.9)
        ks = list(range(1, len(kc) + 1))  # kc[k-1] = KC(k), k = prefix length of the ranking
        ax.plot(ks, kc, "o-", color=c, lw=1.5, ms=4, label=f"step {r['step']} (k={r.get('k')})")
        k = r.get("k", 0)
        if 1 <= k <= len(kc):
            ax.plot([k], [kc[k - 1]], "*", color=c, ms=15, mec="k", mew=0.6, zorder=5)
        drawn += 1
    ax.set_title("knowledge consistency KC(k) of the top-k sources (star: chosen k)")
    if not drawn:
        _empty(ax, "no source passed the TS threshold")
        return
    last = run.groups[picks[-1]]
    lam = last.get("group_lambda", 0) or 0
    rule = "k = argmax KC" if not lam else f"k = argmax mean TS + {lam:g} KC"
    # below the axes, not inside: inside it would cover some curve whatever the corner
    ax.set_xlabel(f"k (the top-k sources by TS)\nranking at step {last['step']}: "
                  + " > ".join(last.get("positive", []))
                  + f"   |   rule: {rule}, ablation {last.get('ablation', 'none')}", fontsize=8.5)
    ax.set_xticks(range(1, max(len(run.groups[i].get("kc", [])) for i in picks) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def draw_scales(ax: Any, run: RunLogs) -> None:
    """Per-token scales a of the target and of each source at the saved (best) prompt: mean
    (dot), +- one std over tokens (bar) and min..max (thin), on an axis zoomed to the data:
    scales start at 1 and move little, so bars from 0 would all look alike."""
    st, ss = run.scales.get("scale_target"), run.scales.get("scale_sources")
    order = list(run.meta.get("extra", {}).get("sources", []))
    ax.set_title("per-token scales a at the saved prompt")
    if st is None or ss is None or len(order) != ss.shape[0]:
        _empty(ax, "no scales saved yet")
        return
    group = set(run.meta.get("extra", {}).get("group", []))
    colors = _source_colors(run)
    rows = [("target", st, "0.2", True)] + [
        (n, ss[i], colors.get(n, "C0"), n in group) for i, n in enumerate(order)]
    for x, (_, a, c, used) in enumerate(rows):
        a = a.float()
        mean, std = float(a.mean()), float(a.std()) if a.numel() > 1 else 0.0
        alpha = 1.0 if used else 0.35
        ax.vlines(x, float(a.min()), float(a.max()), color=c, lw=1, alpha=alpha)
        ax.errorbar(x, mean, yerr=std, fmt="o", color=c, ms=7, lw=3, capsize=0, alpha=alpha,
                    mfc=c if used else "white")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_ylabel("a (init 1)")
    ax.text(0.99, 0.98, "faded, hollow: not in the saved group (unused in P_mix)",
            transform=ax.transAxes, ha="right", va="top", fontsize=7.5, color="0.3")
    ax.grid(alpha=0.3, axis="y")


def run_facts(run: RunLogs) -> list[str]:
    """The run in a few lines of text (the summary's first panel)."""
    m, c, extra = run.meta, run.config, run.meta.get("extra", {})
    steps_done = max([r["step"] for r in run.train + run.evals] + [0])
    best = m.get("best_metric", {})
    lines = [f"task        {m.get('task', c.get('task', '?'))}",
             f"method      {m.get('method', c.get('method', '?'))}",
             f"backbone    {m.get('backbone', c.get('model_name_or_path', '?'))}",
             f"steps       {steps_done} of {c.get('max_steps', '?')}"]
    if best:
        val = best.get("value")
        lines.append(f"best        {best.get('name')} {val if val is None else f'{val:.4g}'} "
                     f"at step {best.get('step')}")
    if c:
        zero = c.get("deepspeed", "")
        lines += [f"prompt      r={m.get('num_tokens', c.get('num_virtual_tokens'))}  "
                  f"d={m.get('d_model', '?')}  init {c.get('prompt_init')}/"
                  f"{c.get('prompt_init_seed')}",
                  f"optimiser   lr {c.get('learning_rate')}  batch "
                  f"{c.get('per_device_train_batch_size')} x {run.world_size or '?'} ranks",
                  f"deepspeed   {Path(zero).name if zero else '?'}"
                  f"{'  bf16' if c.get('bf16') else ''}"]
    if run.is_dtvg:
        last = run.groups[-1]
        srcs = extra.get("sources") or run.sources
        lines += ["", f"sources     {', '.join(srcs)}",
                  f"group now   {', '.join(last.get('group', [])) or '(none)'} "
                  f"(step {last['step']})",
                  f"ablation    {last.get('ablation', 'none')}  TS threshold "
                  f"{last.get('ts_threshold')}  lambda {last.get('group_lambda')}"]
        if extra.get("group") is not None:
            lines.append(f"saved group {', '.join(extra['group']) or '(none)'} (best prompt)")
    if "spot_source" in extra:
        lines.append(f"SPoT source {extra['spot_source']}")
    if extra.get("mpt_tasks"):
        lines.append(f"MPT tasks   {', '.join(extra['mpt_tasks'])}")
    if run.skipped_lines:
        lines.append(f"({run.skipped_lines} unreadable log line(s) skipped: run in progress?)")
    return lines


def draw_facts(ax: Any, run: RunLogs) -> None:
    ax.axis("off")
    ax.set_title(f"run {run.path.name}", loc="left")
    ax.text(0.0, 1.0, "\n".join(run_facts(run)), transform=ax.transAxes, va="top", ha="left",
            family="monospace", fontsize=9)


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------

def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def figure_training(run: RunLogs) -> Any:
    fig = _figure(12, 4.2)
    a, b = fig.subplots(1, 2)
    draw_loss(a, run)
    draw_metric(b, run)
    fig.suptitle(f"{run.meta.get('task', run.path.name)}: training", fontweight="bold")
    return fig


def figure_groups(run: RunLogs) -> Any:
    n = len(run.sources)
    fig = _figure(12, 2.2 + 0.35 * n)
    k_ax, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, max(2, n * 0.6)])
    draw_membership(ax, run, k_ax)
    return fig


def figure_ts(run: RunLogs) -> Any:
    fig = _figure(12, 4.5)
    draw_target_similarity(fig.subplots(), run)
    return fig


def figure_kc(run: RunLogs) -> Any:
    fig = _figure(8, 4.8)
    draw_kc(fig.subplots(), run)
    return fig


def draw_attention(dist_ax: Any, mean_ax: Any, run: RunLogs) -> None:
    """ATTEMPT: per candidate prompt, the spread of its weight over the validation examples at
    the last evaluation (box plot), and its mean weight at each evaluation."""
    evals = [e for e in run.examples if any("attention" in r for r in e.get("examples", []))]
    names = list(evals[-1]["examples"][0]["attention"])
    last = [r["attention"] for r in evals[-1]["examples"]]
    dist_ax.boxplot([[w[n] for w in last] for n in names], tick_labels=names)
    dist_ax.axhline(1 / len(names), color="grey", ls="--", lw=0.8, label="uniform")
    dist_ax.set_ylabel("attention weight")
    dist_ax.set_title(f"per-example attention, step {evals[-1].get('step')} "
                      f"({len(last)} examples)", loc="left")
    dist_ax.legend(loc="best", fontsize=8)
    steps = [e.get("step") or 0 for e in evals]
    for n in names:
        means = [_mean([r["attention"][n] for r in e["examples"] if "attention" in r])
                 for e in evals]
        mean_ax.plot(steps, means, marker="o", label=n)
    mean_ax.set_xlabel("step")
    mean_ax.set_ylabel("mean attention weight")
    mean_ax.set_title("mean attention per candidate", loc="left")
    mean_ax.legend(fontsize=8)


def figure_attention(run: RunLogs) -> Any:
    fig = _figure(12, 4.5)
    draw_attention(*fig.subplots(1, 2), run)
    return fig


def figure_summary(run: RunLogs) -> Any:
    """One page: facts, loss, metric; for DTVG also membership, TS, KC and scales."""
    if not run.is_dtvg:
        fig = _figure(16, 4.6)
        axes = fig.subplots(1, 3, width_ratios=[0.75, 1, 1])
        draw_facts(axes[0], run)
        draw_loss(axes[1], run)
        draw_metric(axes[2], run)
    else:
        n = len(run.sources)
        fig = _figure(16, 14 + 0.2 * n)
        gs = fig.add_gridspec(4, 2, height_ratios=[1, 1, 0.5 + 0.1 * n, 1.1])
        draw_facts(fig.add_subplot(gs[0, 0]), run)
        draw_loss(fig.add_subplot(gs[0, 1]), run)
        draw_metric(fig.add_subplot(gs[1, 0]), run)
        draw_target_similarity(fig.add_subplot(gs[1, 1]), run)
        draw_membership(fig.add_subplot(gs[2, :]), run)
        draw_kc(fig.add_subplot(gs[3, 0]), run)
        draw_scales(fig.add_subplot(gs[3, 1]), run)
    title = (f"{run.meta.get('task', run.config.get('task', run.path.name))} - "
             f"{run.meta.get('method', run.config.get('method', ''))}  ({run.path})")
    fig.suptitle(title, fontweight="bold", fontsize=13)
    return fig


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())  # a viewer never sees a half-written PNG
    return path


def write_report(output_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw every figure the run supports into `out` (default `<output_dir>/report`)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("the figures need matplotlib: pip install 'dtvg_ds[report]'")
    run = load_run(output_dir)
    dest = Path(out) if out else run.path / "report"
    written = [_save(figure_training(run), dest / "training.png")]
    if run.is_dtvg:
        written += [_save(figure_groups(run), dest / "dtvg_groups.png"),
                    _save(figure_ts(run), dest / "dtvg_target_similarity.png"),
                    _save(figure_kc(run), dest / "dtvg_kc.png")]
    if run.has_attention:
        written.append(_save(figure_attention(run), dest / "attempt_attention.png"))
    written.append(_save(figure_summary(run), dest / "summary.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: user errors print one `error:` line and return 2."""
    ap = argparse.ArgumentParser(prog="python -m dtvg_ds.report",
                                 description="PNG figures of a training run's output dir.")
    ap.add_argument("output_dir", help="a run's --output_dir")
    ap.add_argument("--out", default=None, help="where the PNGs go (default <output_dir>/report)")
    args = ap.parse_args(argv)
    try:
        paths = write_report(args.output_dir, args.out)
    except ReportError as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
