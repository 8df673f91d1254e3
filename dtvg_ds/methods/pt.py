"""Vanilla prompt tuning (and stage 1, task prompt vector learning): train P from a start."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dtvg_ds.config import TrainConfig
from dtvg_ds.methods.base import MethodSpec, Optim, PromptMethod


class PromptTuning(PromptMethod):
    """P is one r x d parameter, started from `start` (default: the shared init P_init).

    SPoT is this method started from a source task's prompt.
    """

    name = "pt"

    def __init__(self, p_init: torch.Tensor, optim: Optim, start: torch.Tensor | None = None):
        super().__init__(p_init)
        self.optim = optim
        begin = self.p_init if start is None else start.detach().float()
        self.prompt = nn.Parameter(begin.clone())

    def forward(self) -> torch.Tensor:
        return self.prompt

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.prompt], "lr": self.optim.learning_rate,
                 "weight_decay": self.optim.weight_decay, "name": "prompt"}]


def _build(cfg: TrainConfig, p_init: torch.Tensor, inputs: Any) -> PromptTuning:
    return PromptTuning(p_init, Optim.of(cfg))


SPEC = MethodSpec("pt", _build)
