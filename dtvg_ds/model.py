"""The frozen backbone and the one prompt wrapper every method plugs into.

`PromptedSeq2Seq` prepends the r x d prompt produced by a method module (PT: a parameter; DTVG:
the merged P_mix; ...) to the encoder input embeddings and extends the attention mask. It is
ZeRO-3 aware: the backbone may be partitioned (loaded under `HfDeepSpeedConfig`), the prompt
module is whole on every rank (ZeRO persistence, set by the engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtvg_ds import dist, frozen_linear, hub
from dtvg_ds.hub import ModelLoadError


def load_backbone(name_or_path: str, dtype: torch.dtype, quantization: Any = None,
                  device: torch.device | None = None) -> nn.Module:
    """Load a seq2seq backbone through `from_pretrained` and freeze every parameter.

    Under ZeRO-3 the caller keeps an `HfDeepSpeedConfig` alive so that `from_pretrained` runs
    inside `zero.Init` and each rank only ever materialises its 1/N partition. A quantized
    backbone (`quantization` = a `BitsAndBytesConfig`, see `dtvg_ds.quant`) is placed by the
    loader on `device` and must never be moved with `.to()` afterwards: transformers loads it
    outside `zero.Init`, whole on every rank. `name_or_path` is a resolved local dir
    (`backbone.resolve`) whose config `backbone.read_config` has already read.
    """
    from transformers import AutoModelForSeq2SeqLM

    kw: dict[str, Any] = {}
    if quantization is not None:
        kw = {"quantization_config": quantization,
              "device_map": {"": str(device) if device is not None else "cpu"}}
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, dtype=dtype, **kw)
    except OSError as e:
        raise ModelLoadError(f"--model_name_or_path {name_or_path}: could not load "
                             f"({str(e).splitlines()[0][:200]}); {hub.advice([name_or_path])}"
                             ) from None
    model.requires_grad_(False)
    frozen_linear.install(model)  # save weights, not gathered views; fp32 matmul on slow CPUs
    return model


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) element counts, using full (not partitioned) sizes under ZeRO-3."""
    trainable = frozen = 0
    for p in module.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return trainable, frozen


def embedding_dim(backbone: nn.Module) -> int:
    """d of the backbone's input embeddings."""
    return int(backbone.config.d_model)


def init_prompt(backbone: nn.Module, num_tokens: int, method: str, seed: int,
                vocab_range: int = 5000) -> torch.Tensor:
    """The shared, seeded prompt init P_init (r x d, fp32, CPU), identical on every rank.

    'vocab': r rows of the embedding matrix E, drawn without replacement from the first
    `vocab_range` ids (T5's vocabulary is roughly frequency ordered). Under ZeRO-3 E is a [0]
    placeholder, so it is read inside a gather (all ranks call this). 'uniform': U(-0.5, 0.5).
    """
    d = embedding_dim(backbone)
    g = torch.Generator().manual_seed(seed)
    if method == "uniform":
        return torch.rand(num_tokens, d, generator=g) - 0.5
    emb = backbone.get_input_embeddings().weight
    with dist.gathered([emb]):
        vocab = emb.shape[0]
        pool = min(vocab_range, vocab)
        if num_tokens > pool:
            raise ValueError(f"--num_virtual_tokens {num_tokens} exceeds the init pool of {pool} "
                             "ids; raise --prompt_init_vocab_range or use --prompt_init uniform")
        rows = torch.randperm(pool, generator=g)[:num_tokens]
        return emb.detach()[rows].float().cpu().clone()


class FixedPrompt(nn.Module):
    """A prompter for `PromptedSeq2Seq` that returns one saved r x d prompt (inference)."""

    def __init__(self, prompt: torch.Tensor):
        super().__init__()
        # A buffer, not a parameter: inference only, and .to(device/dtype) moves it along.
        self.register_buffer("prompt", prompt.detach().float().clone())

    def forward(self, **_: Any) -> torch.Tensor:
        return self.prompt

    def batch_extras(self, idx: list[int], ex_tasks: list[str]) -> dict[str, torch.Tensor]:
        """No per-example inputs: the same prompt for every example."""
        return {}

    def example_log(self) -> list[dict[str, Any]] | None:
        """Nothing per example to log: the prompt does not depend on the input."""
        return None


@dataclass
class PromptInputs:
    """What an instance-level prompter (one whose class sets `instance_level = True`, e.g.
    ATTEMPT) reads of a batch to build each example's prompt."""

    input_ids: torch.Tensor  # B x L
    attention_mask: torch.Tensor  # B x L, 0 at padding
    tokens: torch.Tensor  # B x L x d: the frozen backbone's embedding lookup of input_ids
    embedding: nn.Module  # that lookup module: call it (never read .weight) so ZeRO-3 gathers
    pad_token_id: int


class PromptedSeq2Seq(nn.Module):
    """Frozen encoder-decoder + a prompt module whose forward() returns the r x d prompt."""

    def __init__(self, prompter: nn.Module, backbone: nn.Module):
        super().__init__()
        # The prompter is registered first on purpose: ZeRO-3 marks parameters persistent in
        # registration order under a total budget, and the prompt must win that budget.
        self.prompter = prompter
        self.backbone = backbone

    def prompt_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   **extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this batch's prompt, the input token embeddings): the one way every method's prompt
        is made, in training and in decoding. The prompter gets the batch's per-example extras
        (MPT: task ids); an instance-level prompter (ATTEMPT) also the `PromptInputs`. The
        embedding lookup is done once and reused for the encoder input (`embed(tokens=...)`)."""
        emb = self.backbone.get_input_embeddings()
        tokens = emb(input_ids)
        if getattr(self.prompter, "instance_level", False):
            extra = {**extra, "inputs": PromptInputs(input_ids, attention_mask, tokens, emb,
                                                     int(self.backbone.config.pad_token_id))}
        return self.prompter(**extra), tokens  # calling the module lets ZeRO-3 fetch it

    def embed(self, prompt: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor,
              tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[prompt; token embeddings] and the attention mask extended by r ones.

        `prompt` is r x d (one prompt for the batch) or B x r x d (one per example: MPT,
        ATTEMPT). `tokens`: the lookup of `input_ids` when the caller already has it.
        """
        if tokens is None:
            tokens = self.backbone.get_input_embeddings()(input_ids)
        b = input_ids.shape[0]
        prompt = prompt.to(tokens.dtype)
        prompt = prompt.unsqueeze(0).expand(b, -1, -1) if prompt.dim() == 2 else prompt
        embeds = torch.cat([prompt, tokens], 1)
        mask = torch.cat([attention_mask.new_ones(b, prompt.shape[1]), attention_mask], 1)
        return embeds, mask

    def run(self, prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            labels: torch.Tensor, tokens: torch.Tensor | None = None, **kw: Any) -> Any:
        """The backbone's seq2seq output with `prompt` prepended (loss on `labels`, -100 ignored)."""
        embeds, mask = self.embed(prompt, input_ids, attention_mask, tokens)
        return self.backbone(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kw)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """The training loss of the method (default: token cross-entropy with its prompt)."""
        return self.prompter.compute_loss(self, input_ids, attention_mask, labels, **extra)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, synced_gpus: bool = False,
                 **extra: torch.Tensor) -> torch.Tensor:
        """Greedy decoding with the prompt; `synced_gpus` must be True on every rank under
        ZeRO-3 unless the backbone is resident (see `dist.backbone_resident`)."""
        prompt, tokens = self.prompt_for(input_ids, attention_mask, **extra)
        embeds, mask = self.embed(prompt, input_ids, attention_mask, tokens)
        return self.backbone.generate(inputs_embeds=embeds, attention_mask=mask,
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      num_beams=1, synced_gpus=synced_gpus)
