"""Evidence for refusing --load_in_8bit with ZeRO-3 (dtvg_ds/quant.py): run it anyway.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/int8_zero3_probe.py --stage 3
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/int8_zero3_probe.py --stage 2

The start-up refusal is bypassed *in this script only*; the real engine is set up with an
LLM.int8 backbone (the standard workload T5) and a few prompt-tuning steps are taken. Prints one
JSON line per rank: the losses, the int8 weight elements the rank holds as ZeRO partitions and
as bitsandbytes' own copies (`weight.CB` / `state.CB`, which ZeRO-3 does not see).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import standard_run  # noqa: E402
from dtvg_ds import dist, quant  # noqa: E402
from dtvg_ds.data import batches  # noqa: E402


def _int8_layers(model):
    return [m for m in model.modules() if type(m).__name__ == "Linear8bitLt"]


def _held(layers) -> dict[str, int]:
    """Int8 weight elements this rank holds: its ZeRO partitions (or whole weights), and the
    whole copies bitsandbytes keeps in `weight.CB` / `state.CB` beyond those (ZeRO-3 does not
    see them; under ZeRO-2 they are the weight's own storage and not counted twice)."""
    part = extra = 0
    for m in layers:
        w = m.weight
        local = w.ds_tensor if hasattr(w, "ds_tensor") else w.data
        part += local.numel()
        ptrs = {local.data_ptr(), w.data.data_ptr()}
        for t in {id(t): t for t in (getattr(w, "CB", None), m.state.CB) if t is not None}.values():
            if t.data_ptr() not in ptrs:
                extra += t.numel()
                ptrs.add(t.data_ptr())
    return {"zero_partition_elements": part, "bnb_whole_copies_elements": extra}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, choices=[2, 3], default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    quant.check_zero_combination = lambda *a, **k: []  # the bypass: this script only
    ds = "zero3" if args.stage == 3 else "zero2_8bit"
    run, _ = standard_run("int8z3-", {
        "num_virtual_tokens": 20, "deepspeed": ds, "load_in_8bit": True, "max_steps": args.steps,
        "per_device_train_batch_size": 4, "max_train_samples": 64, "max_source_length": 64})
    cfg = run.cfg
    layers = _int8_layers(run.model.backbone)
    held0 = _held(layers)
    full = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in layers)
    losses = []
    for step in range(args.steps):
        idx = batches.micro_batch_indices(len(run.train), cfg.seed, step, 4, dist.rank(),
                                          dist.world_size())
        loss = run.engine(**batches.collate(run.train, idx, run.tokenizer.pad_token_id))
        run.engine.backward(loss)
        run.engine.step()
        losses.append(round(float(loss), 6))
    print(json.dumps({"stage": args.stage, "rank": dist.rank(), "world": dist.world_size(),
                      "int8_weight_elements_whole_model": full, "at_setup": held0,
                      "after_training": _held(layers), "losses": losses}), flush=True)
    import torch

    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
