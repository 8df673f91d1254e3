"""Methods plug into the one engine: each builds a `PromptMethod` from the config."""

from __future__ import annotations

from typing import Any

import torch

from dtvg_ds.config import TrainConfig
from dtvg_ds.methods.base import PromptMethod


def build_method(cfg: TrainConfig, p_init: torch.Tensor, meta: dict[str, Any]) -> PromptMethod:
    """The method module of `cfg.method`, built from the shared init (and artifacts it names)."""
    from dtvg_ds.methods.pt import PromptTuning

    if cfg.method == "pt":
        return PromptTuning(p_init)
    raise ValueError(f"--method {cfg.method!r} is not available")
