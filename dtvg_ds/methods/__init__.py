"""Methods plug into the one engine. Each method module defines a `MethodSpec` (its name, the
stage-1 inputs it reads, its flag checks, its builder); `REGISTRY` collects them, as PEFT maps a
type to its class. Adding a method = one module + one line here."""

from __future__ import annotations

from typing import Any

import torch

from dtvg_ds.config import TrainConfig
from dtvg_ds.methods import attempt, dtvg, mpt, pt, spot
from dtvg_ds.methods.base import MethodSpec, PromptMethod
from dtvg_ds.methods.inputs import MethodInputs, check_against_run, read_inputs

__all__ = ["REGISTRY", "PromptMethod", "build_method", "load_inputs", "validate"]

REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in (
    pt.SPEC, spot.SPEC, dtvg.SPEC, mpt.SOURCE_SPEC, mpt.TARGET_SPEC, attempt.SPEC)}


def validate(cfg: TrainConfig) -> list[str]:
    """The method's problems with the flags (passed to `config.parse_config` as a check)."""
    spec = REGISTRY.get(cfg.method)
    if spec is None:
        return [f"--method {cfg.method!r} is unknown; choose one of {', '.join(REGISTRY)}"]
    probs = spec.check(cfg)
    if spec.inputs != "tpvs" and (cfg.target_tpv or cfg.source_tpvs):
        users = ", ".join(s.name for s in REGISTRY.values() if s.inputs == "tpvs")
        probs.append(f"--target_tpv/--source_tpvs are for {users}, not --method {cfg.method}")
    return probs


def load_inputs(cfg: TrainConfig) -> MethodInputs:
    """The stage-1 artifacts `cfg.method` reads, loaded and cross-checked."""
    spec = REGISTRY[cfg.method]
    inputs = read_inputs(cfg, spec.inputs)
    if spec.check_inputs is not None:
        spec.check_inputs(cfg, inputs)
    return inputs


def build_method(cfg: TrainConfig, p_init: torch.Tensor, meta: dict[str, Any],
                 inputs: MethodInputs) -> PromptMethod:
    """The method module of `cfg.method`, built from the shared init and its stage-1 inputs."""
    check_against_run(inputs, meta, p_init)
    return REGISTRY[cfg.method].build(cfg, p_init, inputs)
