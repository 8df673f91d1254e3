"""MPT: multitask prompt tuning (Wang et al., ICLR 2023) on the same engine.

Source training (`mpt_source`): a shared prompt P* and rank-one task factors u_k (r), v_k (d);
the student prompt of task k is P_k = P* (.) (u_k v_k^T). The teachers are the stage-1 prompts
of the source tasks, run through the *same* frozen (possibly ZeRO-3 sharded) backbone under
no_grad: never a second copy of the backbone. Loss: L_PLM + lambda (L_logits + L_hidden), with
L_logits = KL(teacher || student) on temperature-softened target-token distributions and
L_hidden = MSE of hidden states (`--mpt_hidden`):
  - "decoder" (default): the decoder's final hidden state (after the final layer norm, the
    input of the LM head) at every target position: where student and teacher must agree for
    the logits to agree;
  - "encoder": the encoder's final hidden state over [prompt; input] positions.
Each batch draws K ~ U{2..kappa} tasks (`batches.k_task_micro_batch`).

Target adaptation (`mpt_target`): P = P* (.) (u v^T), u and v initialised from the mean of the
source factors (or ones, `--mpt_uv_init`), training P*, u and v with L_PLM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtvg_ds import dist, prompt_math
from dtvg_ds.artifacts import PromptArtifact
from dtvg_ds.config import TrainConfig
from dtvg_ds.data import batches
from dtvg_ds.data.mixtures import MIX_SEPARATOR
from dtvg_ds.data.zoo import resolve_name
from dtvg_ds.methods.base import MethodSpec, Optim, PromptMethod
from dtvg_ds.methods.inputs import MethodInputs


def _factors(k: int, r: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """u, v near 1 with small seeded noise (as PEFT does), so the tasks' students differ."""
    g = torch.Generator().manual_seed(seed)
    return 1 + 0.02 * torch.randn(k, r, generator=g), 1 + 0.02 * torch.randn(k, d, generator=g)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` and all its submodules in eval mode (no dropout) for the block; afterwards every
    submodule gets back its own `training` flag, also if the block raises. Only flags change,
    never parameters: fine under ZeRO-3."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@dataclass(frozen=True)
class MPTSettings:
    """The settings MPT source training reads (the `--mpt_*` flags; `seed` =
    --prompt_init_seed seeds the task factors)."""

    lam: float
    temperature: float
    hidden: str
    kappa: int
    seed: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> MPTSettings:
        return cls(cfg.mpt_lambda, cfg.mpt_temperature, cfg.mpt_hidden, cfg.mpt_kappa,
                   cfg.prompt_init_seed)


class MPTSource(PromptMethod):
    """Shared P* + per-task (u_k, v_k), distilled from the source tasks' stage-1 prompts."""

    name = "mpt_source"

    def __init__(self, p_init: torch.Tensor, teachers: list[PromptArtifact], cfg: MPTSettings,
                 optim: Optim):
        super().__init__(p_init)
        self.optim = optim
        r, d = p_init.shape
        self.task_names = [resolve_name(t.name) for t in teachers]  # the records' task names
        self.task_index = {n: i for i, n in enumerate(self.task_names)}
        self.shared = nn.Parameter(p_init.clone())
        u, v = _factors(len(teachers), r, d, cfg.seed)
        self.u, self.v = nn.Parameter(u), nn.Parameter(v)
        # Frozen teacher prompts: a plain tensor (never partitioned, never cast to bf16).
        self.teachers = torch.stack([t.prompt.float() for t in teachers])
        self.lam, self.temperature, self.hidden = cfg.lam, cfg.temperature, cfg.hidden
        self.kappa = cfg.kappa or len(teachers)
        self._parts: dict[str, float] = {}

    def forward(self, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if task_ids is None:  # no task: the shared prompt itself (what a target starts from)
            return self.shared
        return self.shared.unsqueeze(0) * self.u[task_ids].unsqueeze(2) * self.v[task_ids].unsqueeze(1)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.shared, self.u, self.v], "lr": self.optim.learning_rate,
                 "weight_decay": self.optim.weight_decay, "name": "mpt"}]

    def micro_batch(self, micro_step: int, ex_tasks: list[str], seed: int, micro_batch: int,
                    rank: int, world: int) -> list[int]:
        by_task = [[i for i, t in enumerate(ex_tasks) if t == n] for n in self.task_names]
        return batches.k_task_micro_batch(by_task, seed, micro_step, micro_batch, rank, world,
                                          self.kappa)

    def batch_extras(self, idx: list[int], ex_tasks: list[str]) -> dict[str, torch.Tensor]:
        if not ex_tasks:
            return {}
        return {"task_ids": torch.tensor([self.task_index[ex_tasks[i]] for i in idx])}

    def compute_loss(self, model: nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, labels: torch.Tensor,
                     task_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        want_hidden = self.hidden == "decoder"
        student = model.run(self(task_ids), input_ids, attention_mask, labels,
                            output_hidden_states=want_hidden)
        if self.lam == 0:
            self._parts = {"loss_plm": float(student.loss.detach())}
            return student.loss
        teacher = self.teacher_outputs(model, task_ids, input_ids, attention_mask, labels,
                                       want_hidden)
        tok_mask = labels != -100
        l_logits = prompt_math.distill_logits_loss(student.logits, teacher.logits,
                                                   self.temperature, tok_mask)
        if want_hidden:
            hs, ht, hmask = student.decoder_hidden_states[-1], teacher.decoder_hidden_states[-1], tok_mask
        else:
            r = self.shared.shape[0]
            hmask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], r), attention_mask], 1)
            hs, ht = student.encoder_last_hidden_state, teacher.encoder_last_hidden_state
        l_hidden = prompt_math.distill_hidden_loss(hs, ht, hmask.bool())
        self._parts = {"loss_plm": float(student.loss.detach()),
                       "loss_logits": float(l_logits.detach()),
                       "loss_hidden": float(l_hidden.detach())}
        return student.loss + self.lam * (l_logits + l_hidden)

    def teacher_outputs(self, model: nn.Module, task_ids: torch.Tensor | None,
                        input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor, want_hidden: bool) -> Any:
        """The teacher pass: the same frozen backbone with the tasks' teacher prompts, no graph.

        Run without dropout (backbone in eval mode for this pass only; the student keeps the
        configured dropout): the teacher is a fixed target, and dropout noise in its logits and
        hidden states would make the KL / MSE terms chase noise."""
        teacher_prompt = self.resident("teachers", input_ids.device)[task_ids]
        with torch.no_grad(), _eval_mode(model.backbone):
            return model.run(teacher_prompt, input_ids, attention_mask, labels,
                             output_hidden_states=want_hidden)

    def loss_parts(self) -> dict[str, float]:
        return dict(self._parts)

    def export_prompt(self) -> torch.Tensor:
        with dist.gathered([self.shared]):
            return self.shared.detach().float().cpu().clone()

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        with dist.gathered([self.u, self.v]):
            return {"u": self.u.detach().float().cpu().clone(),
                    "v": self.v.detach().float().cpu().clone()}

    def artifact_meta(self) -> dict[str, Any]:
        return {"mpt_tasks": self.task_names, "mpt_lambda": self.lam,
                "mpt_temperature": self.temperature, "mpt_hidden": self.hidden,
                "mpt_kappa": self.kappa}


class MPTTarget(PromptMethod):
    """P = P* (.) (u v^T) from an MPT source artifact; trains P*, u and v on the target."""

    name = "mpt_target"

    def __init__(self, p_init: torch.Tensor, source: PromptArtifact, uv_init: str, optim: Optim):
        super().__init__(p_init)
        self.optim = optim
        if "u" not in source.tensors or "v" not in source.tensors:
            from dtvg_ds.artifacts import ArtifactError

            raise ArtifactError(f"{source.path}: not an MPT source artifact (no u/v tensors); "
                                "pass the output dir of a --method mpt_source run")
        self.shared = nn.Parameter(source.prompt.clone().float())
        u, v = source.tensors["u"].float(), source.tensors["v"].float()
        r, d = self.shared.shape
        self.u = nn.Parameter(u.mean(0) if uv_init == "mean" else torch.ones(r))
        self.v = nn.Parameter(v.mean(0) if uv_init == "mean" else torch.ones(d))
        self.source_tasks = source.meta.get("extra", {}).get("mpt_tasks", [])
        self.uv_init = uv_init

    def forward(self, **_: Any) -> torch.Tensor:
        return prompt_math.mpt_prompt(self.shared, self.u, self.v)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.shared, self.u, self.v], "lr": self.optim.learning_rate,
                 "weight_decay": self.optim.weight_decay, "name": "mpt"}]

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        with dist.gathered([self.shared, self.u, self.v]):
            return {"shared": self.shared.detach().float().cpu().clone(),
                    "u": self.u.detach().float().cpu().clone(),
                    "v": self.v.detach().float().cpu().clone()}

    def artifact_meta(self) -> dict[str, Any]:
        return {"mpt_source_tasks": self.source_tasks, "mpt_uv_init": self.uv_init}


def _check_source(cfg: TrainConfig) -> list[str]:
    probs = []
    if cfg.do_test:
        probs.append("--do_test: an MPT source run holds one prompt per task; score each "
                     "with python -m dtvg_ds.evaluation --artifact DIR --task T --mpt_task T")
    if not cfg.source_tpvs:
        probs.append("--method mpt_source needs --source_tpvs (the teachers' stage-1 dirs)")
    if MIX_SEPARATOR not in cfg.task:
        probs.append(f"--method mpt_source trains on a mixture: --task a{MIX_SEPARATOR}b"
                     f"{MIX_SEPARATOR}... (the sources)")
    return probs


def _check_teachers(cfg: TrainConfig, inputs: MethodInputs) -> None:
    """One teacher (stage-1 artifact) per task of the mixture."""
    from dtvg_ds.artifacts import ArtifactError

    members = sorted(resolve_name(t) for t in cfg.task.split(MIX_SEPARATOR))
    names = sorted(resolve_name(a.name) for a in inputs.sources)
    if names != members:
        raise ArtifactError(f"--source_tpvs are tasks {names} but --task mixes {members}; give "
                            "one teacher per mixture task")


def _build_source(cfg: TrainConfig, p_init: torch.Tensor, inputs: MethodInputs) -> MPTSource:
    order = {resolve_name(n): i for i, n in enumerate(cfg.task.split(MIX_SEPARATOR))}
    teachers = sorted(inputs.sources, key=lambda a: order[resolve_name(a.name)])
    return MPTSource(p_init, teachers, MPTSettings.of(cfg), Optim.of(cfg))


def _check_target(cfg: TrainConfig) -> list[str]:
    if not cfg.mpt_source:
        return ["--method mpt_target needs --mpt_source DIR (an mpt_source run's output)"]
    return []


def _build_target(cfg: TrainConfig, p_init: torch.Tensor, inputs: MethodInputs) -> MPTTarget:
    return MPTTarget(p_init, inputs.mpt_source, cfg.mpt_uv_init, Optim.of(cfg))


SOURCE_SPEC = MethodSpec("mpt_source", _build_source, inputs="tpvs", check=_check_source,
                         check_inputs=_check_teachers)
TARGET_SPEC = MethodSpec("mpt_target", _build_target, inputs="mpt_source", check=_check_target)
