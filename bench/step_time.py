"""Training step throughput of dtvg_ds on the standard workload (issue 8), and the DTVG
grouping share of a step.

Workload: T5 vocab 32128, d_model 256, d_ff 1024, 4+4 layers, 8 heads, gated-gelu, fp32
(random weights); prompt r = 100; source 128 tokens + eos; target 1 token + eos; micro batch 8
per rank. Stage 1 (pt) and stage 2 (dtvg, 6 constructed sources), ZeRO-3 and ZeRO-2, on
`--ranks` CPU ranks, each a real `deepspeed` launch of launchers/train.py. Throughput is the
median of the per-window `steps_per_second` the run logs (first window dropped: warm-up).

    python bench/step_time.py [--ranks 2] [--steps 60] [--reps 1]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import build_standard_t5  # noqa: E402
from dtvg_ds.demo import _launch  # noqa: E402


def write_long_task(d: Path, n: int = 512, words: int = 128, seed: int = 0) -> Path:
    """A source/target task whose inputs are exactly `words` tokens of the demo vocabulary."""
    from dtvg_ds.data.demo import FILLER

    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for split, m in (("train", n), ("validation", 64)):
        with (d / f"{split}.jsonl").open("w") as f:
            for _ in range(m):
                src = " ".join(rng.choice(FILLER) for _ in range(words))
                f.write(json.dumps({"source": src, "target": rng.choice(["yes", "no"])}) + "\n")
    return d


def make_sources(model_dir: Path, out: Path, n: int = 6, r: int = 100) -> list[Path]:
    """n stage-1-format artifacts sharing this run's P_init (random task vectors)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from dtvg_ds.artifacts import save_artifact
    from dtvg_ds.backbone import fingerprint as backbone_fingerprint
    from dtvg_ds.model import init_prompt

    bb = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    p_init, fp = init_prompt(bb, r, "vocab", 0), backbone_fingerprint(bb.config)
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n + 1):
        name = "long" if i == n else f"src{i}"
        paths.append(out / name)
        save_artifact(paths[-1], p_init + 0.1 * torch.randn(r, bb.config.d_model, generator=g),
                      p_init, {"task": name, "backbone": str(model_dir),
                               "backbone_fingerprint": fp, "init_method": "vocab",
                               "init_seed": 0, "steps": 1, "method": "pt",
                               "best_metric": {"name": "accuracy", "value": 0.0, "step": 1}})
    return paths


def run_one(model: Path, data: Path, out: Path, method: str, ds: str, steps: int, ranks: int,
            tpvs: list[Path]) -> float:
    args = ["--method", method, "--task", "long", "--data_dir", str(data), "--deepspeed", ds,
            "--model_name_or_path", str(model), "--output_dir", str(out),
            "--num_virtual_tokens", "100", "--max_source_length", "129", "--max_steps",
            str(steps), "--per_device_train_batch_size", "8", "--eval_steps", "0",
            "--save_steps", "0", "--logging_steps", "10", "--max_eval_samples", "16",
            "--report_to", "none", "--tokenized_cache", "false"]
    if method == "dtvg":
        args += ["--target_tpv", str(tpvs[-1]), "--source_tpvs", *map(str, tpvs[:-1])]
    _launch(args, ranks, out.parent / f"{out.name}.log")
    rates = [json.loads(x)["steps_per_second"] for x in (out / "metrics.jsonl").read_text()
             .splitlines() if "steps_per_second" in x]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    model = build_standard_t5(ROOT / ".cache" / "bench_t5")
    tmp = Path(tempfile.mkdtemp(prefix="steptime-"))
    data = write_long_task(tmp / "data")
    tpvs = make_sources(model, tmp / "tpvs")
    results = []
    for rep in range(args.reps):
        for ds in ("ds_configs/zero3.json", "ds_configs/zero2.json"):
            for method in ("pt", "dtvg"):
                out = tmp / f"{method}-{Path(ds).stem}-{rep}"
                sps = run_one(model, data, out, method, ds, args.steps, args.ranks, tpvs)
                row = {"method": method, "config": ds, "ranks": args.ranks, "rep": rep,
                       "steps_per_second": sps,
                       "samples_per_second": sps * 8 * args.ranks}
                print(json.dumps(row), flush=True)
                results.append(row)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
