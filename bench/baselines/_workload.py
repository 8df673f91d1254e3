"""The standard issue-8 workload, shared by every baseline so that all of them train the same thing.

Frozen standard T5 (bench.common) + r=100 soft prompt on the encoder, the 128-word long task
(bench.step_time), micro batch 8 per rank, AdamW lr 0.3 / wd 1e-5, clip 1.0. Nothing here comes
from the dtvg_ds engine: only the bench helpers that build the model files and the data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
NUM_TOKENS = 100  # r
MICRO_BATCH = 8
WARMUP = 5
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 0.3, 1e-5, 1.0
SRC_LEN = 129  # 128 words + eos
INIT_VOCAB_RANGE = 5000  # prompt rows drawn from the first ids, as the project does


def parse_args(doc: str | None, extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    """Common flags (--steps, --data_dir, --seed) + the script's own; --local_rank is ignored."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps, warm-up included")
    p.add_argument("--data_dir", type=Path, default=None,
                   help="dir with train.jsonl (default: write the long task into a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    # The deepspeed launcher passes --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.steps <= WARMUP + 1:
        p.error(f"--steps must exceed the {WARMUP} warm-up steps by at least 2")
    return args


def model_dir() -> Path:
    """The standard T5 files (built once; callers with several ranks build on rank 0 first)."""
    from bench.common import build_standard_t5

    return build_standard_t5(REPO / ".cache" / "bench_t5")


def data_dir(given: Path | None) -> Path:
    """--data_dir, or a fresh temp dir holding the (deterministic, seeded) long task."""
    if given is not None:
        return given
    from bench.step_time import write_long_task

    return write_long_task(Path(tempfile.mkdtemp(prefix="bench_long_")))


def load_backbone(path: Path) -> torch.nn.Module:
    """The frozen fp32 T5 (under an HF DeepSpeed ZeRO-3 config this loads partitioned)."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    return model


def load_tensors(data: Path, tok_dir: Path) -> dict[str, torch.Tensor]:
    """train.jsonl as fixed-length tensors: input_ids/attention_mask [N, 129], labels [N, 2]."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = [json.loads(line) for line in (data / "train.jsonl").open()]
    src = tok([r["source"] for r in rows], max_length=SRC_LEN, truncation=True, padding="longest",
              return_tensors="pt")
    tgt = tok([r["target"] for r in rows], padding="longest", return_tensors="pt")
    labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
    return {"input_ids": src["input_ids"], "attention_mask": src["attention_mask"], "labels": labels}


def init_prompt(embedding: torch.Tensor, seed: int) -> torch.Tensor:
    """r seeded rows of the (full, unpartitioned) embedding matrix, fp32, as a fresh tensor."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(min(INIT_VOCAB_RANGE, embedding.shape[0]), generator=g)[:NUM_TOKENS]
    return embedding.detach()[rows].float().clone()


def batch_indices(n: int, seed: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """Endless micro batches of row ids: per epoch a seeded permutation, DistributedSampler-style
    strided slice per rank, chunks of MICRO_BATCH with the ragged tail dropped."""
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        mine = perm[rank::world]
        for i in range(0, len(mine) - MICRO_BATCH + 1, MICRO_BATCH):
            yield mine[i:i + MICRO_BATCH]
        epoch += 1


def report(bench: str, world_size: int, step_s: list[float], final_loss: float, **extra: object) -> str:
    """The one `{"bench": ...}` JSON line: step-time stats over the steps after the warm-up."""
    timed = step_s[WARMUP:]
    med = statistics.median(timed)
    deciles = statistics.quantiles(timed, n=10, method="inclusive")
    line = json.dumps({"bench": bench, "world_size": world_size, "steps": len(step_s), "warmup": WARMUP,
                       "median_step_s": round(med, 5), "p10_step_s": round(deciles[0], 5),
                       "p90_step_s": round(deciles[-1], 5),
                       "samples_per_s": round(MICRO_BATCH * world_size / med, 3),
                       "final_loss": round(final_loss, 5), **extra})
    print(line, flush=True)
    return line
