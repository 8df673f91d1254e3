"""Methods plug into the one engine: each builds a `PromptMethod` from the config."""

from __future__ import annotations

from typing import Any

import torch

from dtvg_ds.config import TrainConfig
from dtvg_ds.methods.base import PromptMethod
from dtvg_ds.methods.inputs import MethodInputs, check_against_run, load_inputs

__all__ = ["PromptMethod", "build_method", "load_inputs"]


def build_method(cfg: TrainConfig, p_init: torch.Tensor, meta: dict[str, Any],
                 inputs: MethodInputs) -> PromptMethod:
    """The method module of `cfg.method`, built from the shared init and its stage-1 inputs."""
    from dtvg_ds.methods.dtvg import DTVG
    from dtvg_ds.methods.pt import PromptTuning
    from dtvg_ds.methods.spot import SPoT

    check_against_run(inputs, meta, p_init)
    if cfg.method == "pt":
        return PromptTuning(p_init)
    if cfg.method == "spot":
        return SPoT(p_init, inputs, cfg.spot_per_token)
    if cfg.method == "dtvg":
        return DTVG(p_init, inputs, cfg)
    if cfg.method == "mpt_source":
        from dtvg_ds.data.zoo import resolve_name
        from dtvg_ds.methods.mpt import MPTSource

        order = {resolve_name(n): i for i, n in enumerate(cfg.task.split("+"))}
        return MPTSource(p_init, sorted(inputs.sources, key=lambda a: order[resolve_name(a.name)]),
                         cfg)
    if cfg.method == "mpt_target":
        from dtvg_ds.methods.mpt import MPTTarget

        return MPTTarget(p_init, inputs.mpt_source, cfg.mpt_uv_init)
    raise ValueError(f"--method {cfg.method!r} is not available")
