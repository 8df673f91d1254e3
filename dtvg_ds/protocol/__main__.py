"""`python -m dtvg_ds.protocol plan|run|status|table`: the papers' protocol as one command.

    python -m dtvg_ds.protocol plan protocols/dtvg_t5_base.yaml --out runs/paper [--gpus_per_node 8]
    python -m dtvg_ds.protocol run runs/paper --executor slurm --max_in_flight 20
    python -m dtvg_ds.protocol status runs/paper
    python -m dtvg_ds.protocol table runs/paper

Exit codes: 0 all well (run: every job done, or submitted on SLURM); 1 some job failed, is
blocked or stale (listed); 2 a user error (one `error:` line each, naming what to change).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from dtvg_ds.protocol import graph, spec, state, table
from dtvg_ds.protocol.spec import ProtocolError

EXIT_PROBLEM = 1


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dtvg_ds.protocol",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="write the job graph (plan.json) into --out")
    p.add_argument("protocol", help="a protocol file, or a shipped one by name "
                                    f"({', '.join(sorted(x.stem for x in spec.SHIPPED.glob('*.yaml')))})")
    p.add_argument("--out", required=True, help="the protocol's directory (runs, logs, tables)")
    for key, tp in (("nodes", int), ("gpus_per_node", int), ("gpu_memory_gib", float)):
        p.add_argument(f"--{key}", type=tp, help=f"override resources.{key} of the file")
    p.add_argument("--model_name_or_path", help="override the file's backbone")
    p.add_argument("--seeds", type=int, nargs="+", help="override the file's seeds")
    p.add_argument("--verbose", action="store_true", help="print every job's command line")
    p.add_argument("--set", nargs="+", default=[], metavar="FLAG=VALUE",
                   help="training flags for every job, beating the file (e.g. a smoke test of "
                        "the whole graph: --set max_steps=20 eval_steps=10 max_eval_samples=50)")
    r = sub.add_parser("run", help="run (local) or submit (slurm) every job that is not done")
    r.add_argument("out")
    r.add_argument("--executor", choices=["local", "slurm"], required=True)
    r.add_argument("--max_in_flight", type=int, default=0,
                   help="slurm: at most N jobs queued or running (0 = submit all at once); "
                        "the command stays until all are submitted")
    r.add_argument("--wait", action="store_true", help="slurm: stay until every job ended")
    r.add_argument("--poll", type=float, default=30.0, help="slurm: seconds between checks")
    r.add_argument("--sbatch_arg", action="append", default=[],
                   help="slurm: an extra sbatch option, e.g. --sbatch_arg=--partition=gpu")
    r.add_argument("--overwrite_stale", action="store_true",
                   help="re-run jobs whose finished run had other settings (old files are "
                        "moved aside into .replaced-*, not deleted)")
    r.add_argument("--only", nargs="+", default=[],
                   help="only these jobs (shell patterns on job ids) and what they need")
    s = sub.add_parser("status", help="each job: done / running / queued / failed / waiting")
    s.add_argument("out")
    s.add_argument("--json", action="store_true")
    t = sub.add_parser("table", help="print and write table.md + table.csv")
    t.add_argument("out")
    return ap


def plan_cmd(args: Any) -> int:
    overrides = {k: getattr(args, k) for k in ("nodes", "gpus_per_node", "gpu_memory_gib",
                                               "model_name_or_path", "seeds")
                 if getattr(args, k) is not None}
    proto = spec.load(args.protocol, overrides, _assignments(args.set))
    out = Path(args.out).resolve()
    jobs = graph.build(proto, out)
    path = graph.write(out, proto, jobs)
    print(f"{proto.name}: {len(jobs)} jobs -> {path}")
    print(_summarise(jobs))
    if args.verbose:
        for j in jobs:
            print(f"  {j.id:<44} after {', '.join(j.deps) or '-'}\n    {' '.join(j.argv())}")
    print(f"next: python -m dtvg_ds.protocol run {args.out} --executor local|slurm")
    return 0


def _summarise(jobs: list[graph.Job]) -> str:
    """One line per kind of job: how many, their steps, how a step's batch is made."""
    groups: dict[tuple[str, ...], list[graph.Job]] = {}
    for j in jobs:
        f = j.flags
        key = (j.label or j.kind, j.method, f"{j.ranks} ranks x micro "
               f"{f['per_device_train_batch_size']} x accum {f['gradient_accumulation_steps']} "
               f"= {j.global_batch}", str(f["deepspeed"]))
        groups.setdefault(key, []).append(j)
    lines = [f"  {'row':<18}{'method':<12}{'jobs':>5}{'steps':>17}  batch per step, ZeRO config"]
    for (row, method, batch, ds), js in groups.items():
        steps = sorted(int(j.flags.get("max_steps", 1000)) for j in js)
        span = str(steps[0]) if steps[0] == steps[-1] else f"{steps[0]}-{steps[-1]}"
        rec = js[0].recipe
        extra = f" (planned peak {rec['peak_train_gib']} of {rec['gpu_memory_gib']} GiB)" \
            if rec else ""
        lines.append(f"  {row:<18}{method:<12}{len(js):>5}{span:>17}  {batch}, {ds}{extra}")
    total = sum(int(j.flags.get("max_steps", 1000)) * j.global_batch for j in jobs)
    lines.append(f"  total: {total / 1e6:.1f} M training examples over all jobs "
                 "(+ evaluation); `--verbose` lists every job's flags")
    return "\n".join(lines)


def _assignments(items: list[str]) -> dict[str, Any]:
    """['max_steps=20', 'bf16=true'] -> {'max_steps': 20, 'bf16': True} (YAML scalars)."""
    import yaml

    bad = [x for x in items if "=" not in x]
    if bad:
        raise ProtocolError([f"--set {bad[0]}: write FLAG=VALUE, e.g. --set max_steps=20"])
    return {k.lstrip("-"): yaml.safe_load(v) for k, v in (x.split("=", 1) for x in items)}


def _select(jobs: list[graph.Job], patterns: list[str]) -> list[graph.Job]:
    """The jobs matching `patterns` and everything they depend on, in plan order."""
    import fnmatch

    if not patterns:
        return jobs
    by_id = {j.id: j for j in jobs}
    want = {j.id for j in jobs if any(fnmatch.fnmatchcase(j.id, p) for p in patterns)}
    if not want:
        raise ProtocolError([f"--only {' '.join(patterns)}: matches no job id (see "
                             "`protocol status`)"])
    stack = list(want)
    while stack:
        for d in by_id[stack.pop()].deps:
            if d not in want:
                want.add(d)
                stack.append(d)
    return [j for j in jobs if j.id in want]


def run_cmd(args: Any) -> int:
    from dtvg_ds.protocol import executors

    out = Path(args.out).resolve()
    _, jobs = graph.read(out)
    jobs = _select(jobs, args.only)
    if args.executor == "local":
        verdicts = executors.run_local(out, jobs, args.overwrite_stale)
    else:
        verdicts = executors.run_slurm(out, jobs, args.max_in_flight, args.sbatch_arg,
                                       args.overwrite_stale, args.wait, args.poll)
    return _summary(verdicts)


def _summary(verdicts: dict[str, state.Verdict]) -> int:
    counts = Counter(v.state for v in verdicts.values())
    print("jobs: " + ", ".join(f"{n} {s}" for s, n in counts.most_common()))
    bad = {k: v for k, v in verdicts.items() if v.state in (state.FAILED, state.BLOCKED,
                                                               state.STALE)}
    for k, v in bad.items():
        print(f"  {v.state}: {k}: {v.detail}")
    if any(v.state == state.STALE for v in bad.values()):
        print("  stale runs are kept; re-run them with `run ... --overwrite_stale`")
    return EXIT_PROBLEM if bad else 0


def status_cmd(args: Any) -> int:
    out = Path(args.out).resolve()
    _, jobs = graph.read(out)
    queue: dict[str, str] = {}
    if any(state.read_record(out, j).get("slurm_job_id") for j in jobs):
        from dtvg_ds.protocol.executors import queue_states

        queue = queue_states()
    verdicts = state.judge(out, jobs, queue)
    if args.json:
        print(json.dumps({k: {"state": v.state, "detail": v.detail}
                          for k, v in verdicts.items()}, indent=1))
    else:
        for k, v in verdicts.items():
            print(f"{k:<40} {v.state:<8} {v.detail}")
    return _summary(verdicts)


def table_cmd(args: Any) -> int:
    from dtvg_ds.artifacts import atomic_write_bytes

    out = Path(args.out).resolve()
    plan, jobs = graph.read(out)
    rows = table.build(plan, jobs)
    md = table.markdown(plan, rows)
    atomic_write_bytes(out / "table.md", md.encode())
    atomic_write_bytes(out / "table.csv", table.to_csv(rows).encode())
    print(md)
    print(f"written: {out / 'table.md'}, {out / 'table.csv'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from dtvg_ds.cli import report_error

    args = _parser().parse_args(argv)
    cmd = {"plan": plan_cmd, "run": run_cmd, "status": status_cmd, "table": table_cmd}
    try:
        return cmd[args.command](args)
    except ProtocolError as e:
        report_error(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
