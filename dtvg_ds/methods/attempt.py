"""ATTEMPT (Asai et al., EMNLP 2022): an attentional mixture of frozen source prompts per input.

Trainable: the target prompt P_tgt (one per task of a `--task a+b` mixture: the multi-task
variant, one attention module shared by all targets) and the attention module's W_down (m x d)
and W_up (d x m), no bias, normal(0, 0.01) as the released code initialises nn.Linear. Frozen:
the full source prompts P_j (stage-1 `prompt`, i.e. P_init + T_j) and the LayerNorm (weight 1,
bias 0 in the released code = a LayerNorm without affine part). Per example x:

    x_hat = maxpool(E[x])                     E = the frozen backbone's own embedding module
    h     = LayerNorm(W_up SiLU(W_down x_hat))
    a     = softmax_j(maxpool(P_j) . h / T)   j over the sources and the example's P_tgt
    P(x)  = P_tgt + sum_j a_j P_j             (P_tgt is a candidate and is added again)

The math is `prompt_math.max_pool_tokens / attempt_query / attempt_weights / attempt_mixture`.
The module is small and registered inside `PromptedSeq2Seq` before the backbone, so ZeRO-3 keeps
it whole on every rank like any prompt (`engine.set_prompt_persistence`). Differences from the
released code and every default: docs/algorithms.md, "ATTEMPT".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtvg_ds import dist, prompt_math
from dtvg_ds.artifacts import ArtifactError, PromptArtifact
from dtvg_ds.config import TrainConfig
from dtvg_ds.data.mixtures import MIX_SEPARATOR
from dtvg_ds.data.zoo import resolve_name
from dtvg_ds.methods.base import MethodSpec, PromptMethod
from dtvg_ds.methods.inputs import MethodInputs
from dtvg_ds.model import PromptInputs


@dataclass(frozen=True)
class AttemptSettings:
    """The settings ATTEMPT reads (the `--attempt_*` flags, resolved: `temperature` is a number,
    `attn_learning_rate` a rate), plus the run's lengths and seed."""

    temperature: float
    pool: str  # "released" | "masked"
    target_init: str  # "first_source" | "p_init" | "target_tpv"
    hidden: int
    learning_rate: float  # the target prompt(s)
    attn_learning_rate: float  # W_down, W_up
    weight_decay: float
    max_source_length: int  # the released pool's padding length
    seed: int  # W_down/W_up init

    @classmethod
    def of(cls, cfg: TrainConfig, d_model: int) -> AttemptSettings:
        return cls(cfg.attempt_temperature or d_model * math.e, cfg.attempt_pool,
                   cfg.attempt_target_init, cfg.attempt_hidden, cfg.learning_rate,
                   cfg.attempt_attn_learning_rate or cfg.learning_rate, cfg.weight_decay,
                   cfg.max_source_length, cfg.seed)


def target_tasks(task: str) -> list[str]:
    """The tasks with a target prompt of their own: the members of a mixture, else the task."""
    return [resolve_name(t) for t in task.split(MIX_SEPARATOR)]


class Attempt(PromptMethod):
    """Target prompt(s) + the attention module over frozen source prompts; the prompt of each
    example depends on its input (`instance_level`)."""

    name = "attempt"
    instance_level = True

    def __init__(self, p_init: torch.Tensor, sources: torch.Tensor, source_names: list[str],
                 start: torch.Tensor, tasks: list[str], cfg: AttemptSettings):
        super().__init__(p_init)
        r, d = p_init.shape
        if sources.dim() != 3 or sources.shape[1:] != (r, d):
            raise ValueError(f"source prompts must be [n, {r}, {d}]; got {tuple(sources.shape)}")
        self.cfg = cfg
        self.tasks = list(tasks)
        self.task_index = {t: i for i, t in enumerate(self.tasks)}
        self.source_names = list(source_names)
        self.targets = nn.Parameter(start.detach().float().expand(len(tasks), r, d).clone())
        g = torch.Generator().manual_seed(cfg.seed)
        self.w_down = nn.Parameter(0.01 * torch.randn(cfg.hidden, d, generator=g))
        self.w_up = nn.Parameter(0.01 * torch.randn(d, cfg.hidden, generator=g))
        # Frozen, plain tensors (not parameters or buffers): never partitioned by ZeRO, never
        # rounded by a bf16 cast of the module. The sources' pooled keys never change: once.
        self.sources = sources.detach().float().clone()
        self.pooled_sources = prompt_math.max_pool_tokens(self.sources)
        self._pad: torch.Tensor | None = None  # E[pad], read once through the module (ZeRO-3)
        self._last: torch.Tensor | None = None  # B x (n + 1) weights of the last forward

    @classmethod
    def from_artifact(cls, art: PromptArtifact) -> Attempt:
        """The trained module rebuilt from an ATTEMPT artifact, frozen, for decoding (evaluation,
        predict, --do_test): the same per-input prompts as at the artifact's best step."""
        t, extra = art.tensors, art.meta.get("extra", {})
        need = ("attempt_targets", "attn_w_down", "attn_w_up", "attempt_sources")
        missing = [k for k in need if k not in t] + \
            [k for k in ARTIFACT_KEYS if k not in extra]
        if missing:
            raise ArtifactError(f"{art.path}: an ATTEMPT artifact without {', '.join(missing)}; "
                                "it was not written by --method attempt of this version")
        cfg = AttemptSettings(extra["attempt_temperature"], extra["attempt_pool"],
                              extra["attempt_target_init"], int(t["attn_w_down"].shape[0]),
                              0.0, 0.0, 0.0, int(extra["attempt_max_source_length"]), 0)
        m = cls(art.init, t["attempt_sources"], list(extra["sources"]), t["attempt_targets"][0],
                list(extra["attempt_tasks"]), cfg)
        with torch.no_grad():
            for name in ("targets", "w_down", "w_up"):
                key = {"targets": "attempt_targets"}.get(name, f"attn_{name}")
                getattr(m, name).copy_(t[key])
        return m.requires_grad_(False).eval()

    # -- the prompt of a batch ---------------------------------------------------------------
    def _pooled_input(self, inputs: PromptInputs) -> torch.Tensor:
        """x_hat [B, d]: the max over each example's real tokens; with the released pool, the
        pad embedding joins it for inputs shorter than max_source_length (the released code
        pads every input to that length and pools without a mask). Batch-independent both ways."""
        mask = inputs.attention_mask.bool()
        extra = None
        if self.cfg.pool == "released":
            if self._pad is None:  # every rank's first forward (symmetric): a ZeRO-3 gather
                ids = inputs.input_ids.new_full((1, 1), inputs.pad_token_id)
                self._pad = inputs.embedding(ids)[0, 0].detach().float()
            short = mask.sum(1) < self.cfg.max_source_length
            extra = torch.where(short[:, None], self._pad.to(mask.device),
                                torch.full_like(self._pad, float("-inf")).to(mask.device))
        return prompt_math.max_pool_tokens(inputs.tokens.float(), mask, extra)

    def forward(self, inputs: PromptInputs | None = None,
                task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Without `inputs`: the (first) target prompt, r x d (what `export_prompt` saves as the
        artifact's `prompt`). With them: the B x r x d instance prompts."""
        if inputs is None:
            return self.targets[0]
        b = inputs.input_ids.shape[0]
        tgt = self.targets[task_ids] if task_ids is not None else \
            self.targets[0].unsqueeze(0).expand(b, -1, -1)
        tgt = tgt.float()
        dev = tgt.device
        query = prompt_math.attempt_query(self._pooled_input(inputs), self.w_down.float(),
                                          self.w_up.float())
        keys = torch.cat([self.resident("pooled_sources", dev).unsqueeze(0).expand(b, -1, -1),
                          prompt_math.max_pool_tokens(tgt).unsqueeze(1)], 1)
        weights = prompt_math.attempt_weights(query, keys, self.cfg.temperature)
        self._last = weights.detach()
        return prompt_math.attempt_mixture(tgt, self.resident("sources", dev), weights)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.targets], "lr": self.cfg.learning_rate,
                 "weight_decay": self.cfg.weight_decay, "name": "target_prompt"},
                {"params": [self.w_down, self.w_up], "lr": self.cfg.attn_learning_rate,
                 "weight_decay": self.cfg.weight_decay, "name": "attention"}]

    def batch_extras(self, idx: list[int], ex_tasks: list[str]) -> dict[str, torch.Tensor]:
        """Multi-task: each example's target prompt (task id); one target: nothing."""
        if len(self.tasks) == 1 or not ex_tasks:
            return {}
        unknown = sorted({ex_tasks[i] for i in idx} - set(self.task_index))
        if unknown:
            raise ArtifactError(f"task {unknown[0]!r} has no target prompt in this multi-task "
                                f"ATTEMPT model (its tasks: {', '.join(self.tasks)})")
        return {"task_ids": torch.tensor([self.task_index[ex_tasks[i]] for i in idx])}

    def example_log(self) -> list[dict[str, Any]] | None:
        """{candidate: weight} per example of the last batch (sources, then "target")."""
        if self._last is None:
            return None
        names = [*self.source_names, "target"]
        return [{"attention": dict(zip(names, map(float, row), strict=True))}
                for row in self._last.float().cpu()]

    # -- export ------------------------------------------------------------------------------
    def extra_tensors(self) -> dict[str, torch.Tensor]:
        with dist.gathered([self.targets, self.w_down, self.w_up]):
            return {"attempt_targets": self.targets.detach().float().cpu().clone(),
                    "attn_w_down": self.w_down.detach().float().cpu().clone(),
                    "attn_w_up": self.w_up.detach().float().cpu().clone(),
                    "attempt_sources": self.sources.clone()}

    def artifact_meta(self) -> dict[str, Any]:
        c = self.cfg
        return {"sources": self.source_names, "attempt_tasks": self.tasks,
                "attempt_temperature": c.temperature, "attempt_pool": c.pool,
                "attempt_target_init": c.target_init, "attempt_hidden": c.hidden,
                "attempt_max_source_length": c.max_source_length,
                "attempt_attn_learning_rate": c.attn_learning_rate}


# What `Attempt.from_artifact` reads of the artifact's `extra` (written by `artifact_meta`).
ARTIFACT_KEYS = ("sources", "attempt_tasks", "attempt_temperature", "attempt_pool",
                 "attempt_target_init", "attempt_max_source_length")


def _check(cfg: TrainConfig) -> list[str]:
    probs = []
    if not cfg.source_tpvs:
        probs.append("--method attempt needs --source_tpvs DIR [DIR ...] (the source prompts)")
    if cfg.attempt_target_init == "target_tpv" and not cfg.target_tpv:
        probs.append("--attempt_target_init target_tpv needs --target_tpv DIR")
    if cfg.target_tpv and MIX_SEPARATOR in cfg.task:
        probs.append("--target_tpv: a multi-task ATTEMPT run (--task a+b) has one target per "
                     "task; start them with --attempt_target_init first_source or p_init")
    return probs


def _build(cfg: TrainConfig, p_init: torch.Tensor, inputs: MethodInputs) -> Attempt:
    start = {"first_source": lambda: inputs.sources[0].prompt, "p_init": lambda: p_init,
             "target_tpv": lambda: inputs.target.prompt}[cfg.attempt_target_init]()
    sources = torch.stack([s.prompt.float() for s in inputs.sources])
    return Attempt(p_init, sources, inputs.source_names, start, target_tasks(cfg.task),
                   AttemptSettings.of(cfg, p_init.shape[1]))


SPEC = MethodSpec("attempt", _build, inputs="tpvs", check=_check)
