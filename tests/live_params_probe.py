"""Run under a launcher by tests: count gathered backbone parameters during real training steps.

Usage: live_params_probe.py OUT_JSON <train.py flags...>

ZeRO-3's own status is the count: a backbone parameter is live when its `ds_status` is not
NOT_AVAILABLE and it is not persistent (persistent ones are budgeted as held, not gathered). The
count is taken after every module's forward pre-hook and forward hook (the moments ZeRO gathers
and releases) and, in backward, whenever autograd unpacks a saved tensor (the moments a layer's
backward needs its weight). It also records every saved tensor that aliases a gathered weight's
storage beyond its layer (a view of a parameter: the pattern that kept whole layers alive).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dtvg_ds import dist  # noqa: E402
from dtvg_ds.data import batches  # noqa: E402
from tests.dist_probe import start  # noqa: E402


def main() -> None:
    out_json, cfg, run = start()
    engine = run.engine
    params = [p for p in run.model.backbone.parameters() if hasattr(p, "ds_status")]
    gathered_units = [sum(p.ds_numel for p in m.parameters(recurse=False) if hasattr(p, "ds_id")
                          and not p.ds_persist) for m in run.model.backbone.modules()]
    facts = {"total": sum(p.ds_numel for p in params),
             "persistent": sum(p.ds_numel for p in params if p.ds_persist),
             "largest_module": 0, "max_live_forward": 0, "max_live_backward": 0,
             "aliasing_views": 0}
    leaf_classes = tuple(type(m) for m in run.model.backbone.modules()
                         if type(m).__name__.endswith("Block"))
    facts["largest_module"] = max(
        [sum(p.ds_numel for p in m.parameters() if not p.ds_persist)
         for m in run.model.backbone.modules() if isinstance(m, leaf_classes)]
        + gathered_units)
    phase = ["forward"]

    def live() -> int:
        return sum(p.ds_numel for p in params
                   if p.ds_status.name != "NOT_AVAILABLE" and not p.ds_persist)

    def count(*_: object) -> None:
        key = f"max_live_{phase[0]}"
        facts[key] = max(facts[key], live())

    for m in run.model.backbone.modules():
        m.register_forward_pre_hook(count)
        m.register_forward_hook(count)
    views: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else None
        if base is not None and hasattr(base, "ds_id") and not base.ds_persist:
            views.append(t)
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        count()
        return t

    for step in range(int(cfg.max_steps)):
        idx = batches.micro_batch_indices(len(run.train), cfg.seed, step,
                                          cfg.per_device_train_batch_size, dist.rank(),
                                          dist.world_size())
        b = batches.collate(run.train, idx, run.tokenizer.pad_token_id)
        phase[0] = "forward"
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            loss = engine(**b)
        # after the forward every non-persistent weight has been released: a saved view of one
        # still holding storage keeps a gathered copy alive until backward
        facts["aliasing_views"] = max(facts["aliasing_views"],
                                      sum(v.untyped_storage().nbytes() > 0 for v in views))
        views.clear()
        phase[0] = "backward"
        engine.backward(loss)
        engine.step()
    Path(f"{out_json}.rank{dist.rank()}").write_text(json.dumps(facts))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from dtvg_ds.cli import exit_process

    main()
    exit_process(0)
