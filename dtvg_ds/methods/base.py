"""What a method is: a module whose forward() returns this step's r x d prompt.

The engine owns the loop; a method only says which tensors are trainable (with their learning
rates), how the prompt of a step is built, what happens at the start of a step (DTVG regroups),
what it logs, and what it exports. No method copies another.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dtvg_ds import dist
from dtvg_ds.config import TrainConfig
from dtvg_ds.data import batches

if TYPE_CHECKING:
    from dtvg_ds.methods.inputs import MethodInputs


@dataclass(frozen=True)
class Optim:
    """The optimizer settings of a method's parameter groups."""

    learning_rate: float
    weight_decay: float = 0.0

    @classmethod
    def of(cls, cfg: TrainConfig) -> Optim:
        return cls(cfg.learning_rate, cfg.weight_decay)


def _no_checks(cfg: TrainConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class MethodSpec:
    """A method as the engine knows it (PEFT maps a type to its class the same way): its name,
    the stage-1 inputs it reads, its flag checks and its builder. Each method module defines
    its spec; `dtvg_ds.methods.REGISTRY` collects them, and nothing else names a method."""

    name: str
    build: Callable[[TrainConfig, torch.Tensor, MethodInputs], PromptMethod]
    # "none"; "tpvs": --target_tpv / --source_tpvs; "mpt_source": --mpt_source
    inputs: str = "none"
    # problems with the flags, each naming the flag (run with the config's own validation)
    check: Callable[[TrainConfig], list[str]] = _no_checks
    # raises ArtifactError if the loaded stage-1 inputs do not fit the flags
    check_inputs: Callable[[TrainConfig, MethodInputs], None] | None = None


class PromptMethod(nn.Module, abc.ABC):
    """Base class. `p_init` is the shared fp32 init, kept outside the module on purpose: it is
    frozen, must stay fp32 when the engine casts the module to bf16, and is not checkpointed."""

    name = "base"
    # True: forward() gets the batch's `model.PromptInputs` (`inputs=`) and returns one prompt
    # per example (ATTEMPT); False: the prompt does not depend on the input.
    instance_level = False
    log_name = "method.jsonl"  # where records returned by on_step_start go

    def __init__(self, p_init: torch.Tensor):
        super().__init__()
        self.p_init = p_init.detach().float().clone()
        self._resident: dict[str, torch.Tensor] = {}

    def resident(self, name: str, device: torch.device) -> torch.Tensor:
        """The frozen tensor attribute `name` (P_init, source vectors, teacher prompts) on
        `device`: copied there on first use and kept, not moved again at every micro step.

        The CPU original stays the source of truth (exports, grouping on rank 0); frozen
        tensors never change, so the device copy never goes stale."""
        t = self._resident.get(name)
        if t is None or t.device != torch.device(device):
            t = self._resident[name] = getattr(self, name).to(device)
        return t

    @abc.abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (each with `params`, `lr`, `weight_decay`, `name`)."""

    def compute_loss(self, model: nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, labels: torch.Tensor,
                     **extra: torch.Tensor) -> torch.Tensor:
        """The training loss of one micro batch; `model` is the `PromptedSeq2Seq` wrapper.

        Default: token cross-entropy with this step's prompt, made the one way decoding makes
        it too (`model.prompt_for`)."""
        prompt, tokens = model.prompt_for(input_ids, attention_mask, **extra)
        return model.run(prompt, input_ids, attention_mask, labels, tokens=tokens).loss

    def micro_batch(self, micro_step: int, ex_tasks: list[str], seed: int, micro_batch: int,
                    rank: int, world: int) -> list[int]:
        """Training example indices of this rank's micro batch (default: the epoch stream)."""
        return batches.micro_batch_indices(len(ex_tasks), seed, micro_step, micro_batch, rank,
                                           world)

    def batch_extras(self, idx: list[int], ex_tasks: list[str]) -> dict[str, torch.Tensor]:
        """Extra tensors a method needs per example (MPT: task ids); passed to forward()."""
        return {}

    def example_log(self) -> list[dict[str, Any]] | None:
        """Per-example records of the last prompt built (ATTEMPT: the attention weights), logged
        at evaluation beside each prediction; None when the prompt does not depend on the input."""
        return None

    def loss_parts(self) -> dict[str, float]:
        """Named components of the last loss, for logging (e.g. MPT's distillation terms)."""
        return {}

    def on_step_start(self, step: int) -> dict[str, Any] | None:
        """Called on every rank before each optimizer step; may return a record to log."""
        return None

    def export_prompt(self) -> torch.Tensor:
        """The static prompt for evaluation/export (full, fp32, CPU). All ranks call it."""
        with dist.gathered(list(self.parameters())):
            return self().detach().float().cpu().clone()

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Additional tensors saved in the exported artifact (all ranks call it)."""
        return {}

    def artifact_meta(self) -> dict[str, Any]:
        """Method-specific metadata for the artifact's `extra` field."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """JSON-able method state beyond the parameters, saved in checkpoints (e.g. the group)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    def named_trainable(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of the trainable parameters, for replica fingerprints."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]
