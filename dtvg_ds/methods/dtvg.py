"""DTVG, stage 2: dynamic task vector grouping and merging while tuning the target.

Trainable: the target prompt P_t (from the target's stage-1 prompt, so T_t = P_t - P_init starts
as the target TPV), a per-token scale a_t (init 1) and a per-token scale a_s per source (init 1).
Frozen: P_init and the source TPVs T_s. Every `regroup_every` steps rank 0 picks the group from
its replica (`prompt_math.select_group`) and broadcasts it; every rank then builds
P_mix = P_init + a_t . T_t + sum_{s in group} a_s . T_s with autograd.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtvg_ds import dist, prompt_math
from dtvg_ds.config import TrainConfig
from dtvg_ds.methods.base import MethodSpec, PromptMethod
from dtvg_ds.methods.inputs import MethodInputs


@dataclass(frozen=True)
class DTVGSettings:
    """The settings DTVG reads: the flags of the same names (defaults in `TrainConfig`; see
    docs/algorithms.md), and the run's output dir for the group trace."""

    ablation: str
    ts_threshold: float
    group_lambda: float
    regroup_every: int
    merge_norm: str
    source_scale_init: float
    learning_rate: float  # the target prompt (lr_1)
    target_task_scale_learning_rate: float  # a_t
    source_task_scale_learning_rate: float  # a_s (lr_2)
    trace_dir: str  # group_trace/rank<k>.jsonl goes here (the output dir)

    @classmethod
    def of(cls, cfg: TrainConfig) -> DTVGSettings:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "trace_dir"]
        return cls(**{n: getattr(cfg, n) for n in names}, trace_dir=cfg.output_dir)


class DTVG(PromptMethod):
    """The DTVG prompt module; `ablation` switches to the published ablations."""

    name = "dtvg"
    log_name = "groups.jsonl"

    def __init__(self, p_init: torch.Tensor, inputs: MethodInputs, cfg: DTVGSettings):
        super().__init__(p_init)
        assert inputs.target is not None
        r = p_init.shape[0]
        n = len(inputs.sources)
        self.prompt = nn.Parameter(inputs.target.prompt.clone().float())
        self.scale_target = nn.Parameter(torch.ones(r))
        # Released code: every a_s starts at 1. --source_scale_init is an extension.
        self.scale_sources = nn.Parameter(torch.full((n, r), float(cfg.source_scale_init)))
        # Frozen source vectors: a plain tensor, not a parameter or buffer, so ZeRO never
        # partitions it and a bf16 cast of the module never rounds it.
        self.source_vectors = torch.stack([s.task_vector.float() for s in inputs.sources])
        self.source_names = inputs.source_names
        self.ablation = cfg.ablation
        self.threshold, self.group_lambda = cfg.ts_threshold, cfg.group_lambda
        self.regroup_every = cfg.regroup_every
        self.merge_norm, self.source_scale_init = cfg.merge_norm, cfg.source_scale_init
        self.group: list[int] = list(range(n)) if cfg.ablation == "all_sources" else []
        self.fixed = False
        self.have_group = cfg.ablation in ("target_only", "all_sources")
        self.trace = Path(cfg.trace_dir) / "group_trace" / f"rank{dist.rank()}.jsonl"
        self.lrs = (cfg.learning_rate, cfg.target_task_scale_learning_rate,
                    cfg.source_task_scale_learning_rate)
        self.trace.parent.mkdir(parents=True, exist_ok=True)

    # -- the prompt of a step ------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        dev = self.prompt.device
        p_init = self.resident("p_init", dev)
        return prompt_math.merge(p_init, self.prompt.float() - p_init, self.scale_target.float(),
                                 self.resident("source_vectors", dev), self.scale_sources.float(),
                                 self.group, self.merge_norm)

    def param_groups(self) -> list[dict[str, Any]]:
        # Three learning rates as in the published code; no weight decay in stage 2.
        lr_prompt, lr_target, lr_sources = self.lrs
        return [
            {"params": [self.prompt], "lr": lr_prompt, "weight_decay": 0.0,
             "name": "target_prompt"},
            {"params": [self.scale_target], "lr": lr_target, "weight_decay": 0.0,
             "name": "target_scale"},
            {"params": [self.scale_sources], "lr": lr_sources, "weight_decay": 0.0,
             "name": "source_scales"},
        ]

    # -- grouping --------------------------------------------------------------------------------
    def _decide(self) -> dict[str, Any]:
        """Rank 0 only: the group from this replica's scaled vectors, as a log record."""
        with torch.no_grad():
            t_t = self.prompt.detach().float().cpu() - self.p_init
            res = prompt_math.select_group_scaled(
                self.scale_target.detach().float().cpu(), t_t,
                self.scale_sources.detach().float().cpu(), self.source_vectors,
                self.threshold, self.group_lambda)
            names = self.source_names
            group = {"none": res.group, "fixed_group": res.group, "no_kc": res.positive,
                     "target_only": [], "all_sources": list(range(len(names)))}[self.ablation]
            diag = self._diagnostics(group)
        return {"ts": {names[i]: float(v) for i, v in enumerate(res.ts)},
                "positive": [names[i] for i in res.positive], "kc": [float(x) for x in res.kc],
                "k": len(group), "group": [names[i] for i in group], "group_idx": group,
                "ts_threshold": self.threshold, "group_lambda": self.group_lambda,
                "ablation": self.ablation, **diag}

    def _diagnostics(self, group: list[int]) -> dict[str, Any]:
        """What explains a run afterwards: how far the merge moves the prompt from P_init
        against the target's own vector, and where the scales are (rank 0, no_grad)."""
        t_t = self.prompt.detach().float().cpu() - self.p_init
        a_t, a_s = self.scale_target.detach().float().cpu(), self.scale_sources.detach().float().cpu()
        mix = prompt_math.merge(self.p_init, t_t, a_t, self.source_vectors, a_s, group,
                                self.merge_norm) - self.p_init
        sel = a_s[group] if group else a_s[:0]
        return {"norm_target": float(t_t.norm()), "norm_scaled_target": float((a_t[:, None] * t_t).norm()),
                "norm_mix": float(mix.norm()),
                "scale_target_mean": float(a_t.mean()), "scale_target_min": float(a_t.min()),
                "scale_target_max": float(a_t.max()),
                "scale_sources_mean": {n: float(a_s[i].mean()) for i, n in enumerate(self.source_names)},
                "scale_group_mean": float(sel.mean()) if group else None}

    def on_step_start(self, step: int) -> dict[str, Any] | None:
        if self.fixed or (self.have_group and step % self.regroup_every != 0):
            return None
        # collective (inside `gathered`): make sure every rank's replica is readable
        with dist.gathered(list(self.parameters())):
            record = self._decide() if dist.is_main() else None
        record = dist.broadcast_object(record)  # collective: rank 0 decides, all ranks apply
        self.group = list(record.pop("group_idx"))
        self.have_group = True
        self.fixed = self.ablation == "fixed_group"
        with self.trace.open("a") as f:  # what *this* rank applied, to check ranks agree
            f.write(json.dumps({"step": step, "group": record["group"]}) + "\n")
        return {"step": step, **record}

    # -- export / resume -------------------------------------------------------------------------
    def extra_tensors(self) -> dict[str, torch.Tensor]:
        with dist.gathered([self.scale_target, self.scale_sources]):
            return {"scale_target": self.scale_target.detach().float().cpu().clone(),
                    "scale_sources": self.scale_sources.detach().float().cpu().clone()}

    def artifact_meta(self) -> dict[str, Any]:
        return {"sources": self.source_names, "group": [self.source_names[i] for i in self.group],
                "ablation": self.ablation, "ts_threshold": self.threshold,
                "group_lambda": self.group_lambda, "regroup_every": self.regroup_every,
                "merge_norm": self.merge_norm, "source_scale_init": self.source_scale_init}

    def extra_state(self) -> dict[str, Any]:
        return {"group": self.group, "fixed": self.fixed, "have_group": self.have_group}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.group, self.fixed = list(state["group"]), bool(state["fixed"])
        self.have_group = bool(state["have_group"])


def _check(cfg: TrainConfig) -> list[str]:
    probs = []
    if not cfg.source_tpvs:
        probs.append("--method dtvg needs --source_tpvs DIR [DIR ...]")
    if not cfg.target_tpv:
        probs.append("--method dtvg needs --target_tpv DIR (the target's stage-1 artifact)")
    return probs


def _build(cfg: TrainConfig, p_init: torch.Tensor, inputs: MethodInputs) -> DTVG:
    return DTVG(p_init, inputs, DTVGSettings.of(cfg))


SPEC = MethodSpec("dtvg", _build, inputs="tpvs", check=_check)
