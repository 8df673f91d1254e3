"""Stage-1 artifacts a method starts from (DTVG, SPoT): loaded and validated before training.

Everything is checked before the backbone is even loaded: files exist and are intact, no NaN/Inf,
no source given twice, the target not among its own sources, and all artifacts share P_init,
backbone, r and d. Prompt length and init settings not given on the command line are taken from
the target artifact, so `--num_virtual_tokens` need not be repeated for stage 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtvg_ds import backbone
from dtvg_ds.artifacts import ArtifactError, PromptArtifact, check_compatible, load_artifact
from dtvg_ds.config import TrainConfig
from dtvg_ds.data.zoo import resolve_name

# Settings that define P_init; adopted from the target artifact unless given explicitly.
_INIT_SETTINGS = (("num_virtual_tokens", "num_tokens"), ("prompt_init", "init_method"),
                  ("prompt_init_seed", "init_seed"))


@dataclass
class MethodInputs:
    """The validated stage-1 artifacts of a stage-2 run."""

    target: PromptArtifact | None
    sources: list[PromptArtifact]
    mpt_source: PromptArtifact | None = None
    # Prompt settings not given as flags, taken from the reference artifact: {flag: value}.
    # The caller applies them (dataclasses.replace) and logs each; `adopted_from` names it.
    adopted: dict[str, Any] = field(default_factory=dict)
    adopted_from: str = ""

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def artifacts(self) -> list[PromptArtifact]:
        """Every input artifact (target, sources, MPT source)."""
        return [a for a in (self.target, *self.sources, self.mpt_source) if a is not None]


def read_inputs(cfg: TrainConfig, kind: str) -> MethodInputs:
    """Load and cross-check the stage-1 inputs a method reads (`MethodSpec.inputs`): "tpvs"
    (--target_tpv / --source_tpvs), "mpt_source" (--mpt_source) or "none"."""
    if kind == "mpt_source":
        src = load_artifact(cfg.mpt_source, cfg.allow_in_progress_artifacts)
        return MethodInputs(None, [], src, _adopt_init(cfg, src), str(src.path))
    if kind != "tpvs":
        return MethodInputs(None, [])
    seen: dict[Path, str] = {}
    names: dict[str, str] = {}
    target = load_artifact(cfg.target_tpv, cfg.allow_in_progress_artifacts) if cfg.target_tpv else None
    if target is not None:
        seen[Path(cfg.target_tpv).resolve()] = "--target_tpv"
    sources = []
    for path in cfg.source_tpvs:
        key = Path(path).resolve()
        if key in seen:
            what = "the target (--target_tpv)" if seen[key] == "--target_tpv" else "twice"
            raise ArtifactError(f"--source_tpvs {path}: given {what}; each source once, and "
                                "the target is never its own source")
        seen[key] = path
        art = load_artifact(path, cfg.allow_in_progress_artifacts)
        if target is not None and resolve_name(art.name) == resolve_name(target.name):
            raise ArtifactError(f"--source_tpvs {path}: is task {art.name!r}, the target itself; "
                                "drop it from the sources")
        if resolve_name(art.name) in names:  # artifacts older than canonical names: resolve
            raise ArtifactError(f"--source_tpvs {path}: task {art.name!r} is already given by "
                                f"{names[resolve_name(art.name)]}; pass each source task once")
        names[resolve_name(art.name)] = path
        sources.append(art)
    check_compatible(([target] if target else []) + sources)
    ref = target or sources[0]
    return MethodInputs(target, sources, None, _adopt_init(cfg, ref), str(ref.path))


def _adopt_init(cfg: TrainConfig, ref: PromptArtifact) -> dict[str, Any]:
    """The prompt length and init settings to take from the artifact (those not given as
    flags); a flag that contradicts it is an error."""
    adopted: dict[str, Any] = {}
    for flag, key in _INIT_SETTINGS:
        if flag not in cfg.explicit:
            if getattr(cfg, flag) != ref.meta[key]:
                adopted[flag] = ref.meta[key]
        elif getattr(cfg, flag) != ref.meta[key]:
            raise ArtifactError(f"--{flag} {getattr(cfg, flag)!r} differs from {ref.path} "
                                f"({key} = {ref.meta[key]!r}); drop the flag to use the "
                                "artifact's value")
    return adopted


def check_against_run(inputs: MethodInputs, meta: dict[str, Any], p_init: torch.Tensor) -> None:
    """The artifacts must come from this backbone and this exact P_init."""
    for art in inputs.artifacts():
        backbone.check_artifact(art, meta["backbone_fingerprint"], meta["backbone"])
        if not torch.equal(art.init, p_init):
            raise ArtifactError(f"{art.path}: its P_init differs from this run's (fingerprint "
                                f"{art.meta['init_fingerprint']} vs {meta['init_fingerprint']}); "
                                "use the --prompt_init/--prompt_init_seed stage 1 used")
