"""Run under a launcher by tests: set up the real engine, take steps, dump per-rank facts.

Usage: dist_probe.py OUT_JSON <train.py flags...>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from dtvg_ds import dist, quant  # noqa: E402
from dtvg_ds.config import parse_config  # noqa: E402
from dtvg_ds.data import batches  # noqa: E402
from dtvg_ds.engine import setup  # noqa: E402


def start() -> tuple[str, Any, Any]:
    """(OUT_JSON, config, set-up run) from this process's argv (the launcher's --local_rank
    dropped); shared by the probe scripts."""
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = parse_config(args[1:])
    return args[0], cfg, setup(cfg)


def main() -> None:
    out_json, cfg, run = start()
    engine, method = run.engine, run.method
    facts: dict = {"rank": dist.rank(), "world": dist.world_size()}
    bb = list(run.model.backbone.parameters())
    facts["backbone_total"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in bb)
    facts["backbone_local"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                  for p in bb)
    facts["backbone_trainable"] = sum(p.numel() for p in bb if p.requires_grad)
    facts["checksum_before"] = quant.checksum(run.model.backbone)
    prm = method.prompt
    facts["prompt_persist"] = bool(getattr(prm, "ds_persist", True))
    grads, prompts = [], []
    for step in range(int(cfg.max_steps)):
        idx = batches.micro_batch_indices(len(run.train), cfg.seed, step,
                                          cfg.per_device_train_batch_size, dist.rank(),
                                          dist.world_size())
        b = batches.collate(run.train, idx, run.tokenizer.pad_token_id)
        loss = engine(**b)
        engine.backward(loss)
        if step == 0:
            g = deepspeed.utils.safe_get_full_grad(prm)
            grads.append(g.float().tolist())
            facts["loss0"] = float(loss)
            facts["indices0"] = idx
        engine.step()
        # The prompt's local data: whole (r x d) on every rank, and equal across ranks.
        facts["prompt_local_numel"] = prm.numel()
        prompts.append(prm.detach().float().clone())
    facts["checksum_after"] = quant.checksum(run.model.backbone)
    # steady state: ZeRO-3 materialises persistent parameters at the first forward
    facts["backbone_bytes"] = quant.local_bytes(run.model.backbone)
    facts["grad0"] = grads[0]
    facts["prompt_final"] = prompts[-1].tolist()
    facts["fingerprint"] = dist.check_replicas(method.named_trainable(), cfg.max_steps)
    Path(f"{out_json}.rank{dist.rank()}").write_text(json.dumps(facts))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from dtvg_ds.cli import exit_process

    main()
    exit_process(0)  # skip the interpreter teardown gloo can abort in (see exit_process)
