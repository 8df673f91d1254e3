"""SPoT: start the target prompt from the most similar source prompt, then prompt-tune.

The choice uses the stage-1 prompts (average-token cosine, or the per-token variant). With a
single source (e.g. a prompt trained on the mixture of all sources) this is generic SPoT.
"""

from __future__ import annotations

import torch

from dtvg_ds import prompt_math
from dtvg_ds.config import TrainConfig
from dtvg_ds.methods.base import MethodSpec, Optim
from dtvg_ds.methods.inputs import MethodInputs
from dtvg_ds.methods.pt import PromptTuning


def choose_source(inputs: MethodInputs, per_token: bool) -> tuple[int, dict[str, float]]:
    """Index of the most similar source and every similarity (by source name)."""
    if inputs.target is None:  # generic SPoT: one mixture-trained prompt, nothing to choose
        return 0, {inputs.sources[0].name: float("nan")}
    sims = prompt_math.spot_similarity(inputs.target.prompt,
                                       torch.stack([s.prompt for s in inputs.sources]), per_token)
    return int(torch.argmax(sims)), {s.name: float(v) for s, v in zip(inputs.sources, sims,
                                                                       strict=True)}


class SPoT(PromptTuning):
    """Prompt tuning started from the chosen source's stage-1 prompt."""

    name = "spot"

    def __init__(self, p_init: torch.Tensor, inputs: MethodInputs, per_token: bool,
                 optim: Optim):
        self.choice, self.similarities = choose_source(inputs, per_token)
        self.chosen = inputs.sources[self.choice].name
        self.per_token = per_token
        super().__init__(p_init, optim, start=inputs.sources[self.choice].prompt)

    def artifact_meta(self) -> dict:
        return {"spot_source": self.chosen, "spot_similarities": self.similarities,
                "spot_variant": "per_token" if self.per_token else "average_token"}


def _check(cfg: TrainConfig) -> list[str]:
    probs = []
    if not cfg.source_tpvs:
        probs.append("--method spot needs --source_tpvs DIR [DIR ...]")
    if not cfg.target_tpv and len(cfg.source_tpvs) > 1:
        probs.append("--method spot with several --source_tpvs needs --target_tpv (to pick "
                     "the most similar source); generic SPoT takes one mixture prompt")
    return probs


def _build(cfg: TrainConfig, p_init: torch.Tensor, inputs: MethodInputs) -> SPoT:
    return SPoT(p_init, inputs, cfg.spot_per_token, Optim.of(cfg))


SPEC = MethodSpec("spot", _build, inputs="tpvs", check=_check)
