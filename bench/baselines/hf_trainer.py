"""Baseline (b): what users run today: HF PEFT prompt tuning trained by the HF Trainer + DeepSpeed.

    deepspeed --num_gpus 2 bench/baselines/hf_trainer.py --ds_config bench/baselines/zero3_plain.json
    deepspeed --num_gpus 2 bench/baselines/hf_trainer.py --ds_config ds_configs/zero3.json

peft.PromptTuningConfig(SEQ_2_SEQ_LM, r=100, SAMPLE_VOCAB init, num_transformer_submodules=1: the
prompt goes to the encoder only, like ours) on the frozen standard T5; TrainingArguments come first
so that from_pretrained loads the backbone under zero.Init (HF's documented ZeRO-3 order).
Trainer: micro batch 8/rank, lr 0.3 linear decay, wd 1e-5, max_grad_norm 1.0 (HF hands it to
DeepSpeed's "gradient_clipping"), no eval, no saving. The configs say "torch_adam": true because
DeepSpeed's fused CPU Adam would need a C++ JIT compile; the optimizer is then torch's AdamW.
Timed by a TrainerCallback: on_step_begin (after a barrier, data already fetched) to on_step_end
(after optimizer + scheduler step) on rank 0. Extra JSON fields report how ZeRO-3 treated the prompt.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    default_data_collator,
)

from bench.baselines import _workload as W


class TensorDataset(torch.utils.data.Dataset):
    """Rows of the fixed-length tensors as dicts, for the default collator."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class StepTimer(TrainerCallback):
    """Per-optimizer-step wall time, plus a look at the prompt parameter under DeepSpeed."""

    def __init__(self) -> None:
        self.step_s: list[float] = []
        self.prompt_info: dict[str, Any] = {}
        self._t0 = 0.0

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        # First step: the engine is set up but nothing was fetched yet; later steps: steady state
        # (a ZeRO-3 "persistent" parameter is gathered at its first use and then kept whole).
        info = _prompt_info(kwargs["model"])
        if not self.prompt_info:
            self.prompt_info = info
        self.prompt_info["prompt_param_numel_local_steady"] = info["prompt_param_numel_local"]
        if dist.is_initialized():
            dist.barrier()  # rank 0's clock then covers the slowest rank's step
        self._t0 = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self.step_s.append(time.perf_counter() - self._t0)


class LossTrainer(Trainer):
    """The stock Trainer, only remembering the last step's loss (HF logs window averages)."""

    last_loss: torch.Tensor | None = None

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.last_loss = super().training_step(*args, **kwargs)
        return self.last_loss


def _prompt_info(model: torch.nn.Module) -> dict[str, Any]:
    """The PEFT prompt embedding as this rank holds it: under ZeRO-3 a partitioned, released
    parameter is a numel-0 placeholder between forwards, while a persistent one stays whole."""
    p = model.prompt_encoder["default"].embedding.weight
    shard = getattr(p, "ds_tensor", None)
    return {"prompt_param_numel_local": p.numel(),
            "prompt_param_numel_full": int(getattr(p, "ds_numel", p.numel())),
            "prompt_param_ds_persist": getattr(p, "ds_persist", None),
            "prompt_param_shard_numel": None if shard is None else shard.numel()}


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ds_config", type=Path, required=True, help="DeepSpeed JSON config")


def main() -> None:
    args = W.parse_args(__doc__, _extra)
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_hf_"), per_device_train_batch_size=W.MICRO_BATCH,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=W.LR,
        weight_decay=W.WEIGHT_DECAY, max_grad_norm=W.MAX_GRAD_NORM, lr_scheduler_type="linear",
        warmup_steps=0, logging_steps=args.steps, save_strategy="no", eval_strategy="no",
        report_to=[], deepspeed=str(args.ds_config), use_cpu=True, dataloader_num_workers=0, seed=42)
    # Workaround: with use_cpu=True accelerate opens the process group with torch.distributed
    # directly, so deepspeed.comm stays uninitialised and the zero.Init that from_pretrained enters
    # sees world_size 1 ("train_batch_size 16 != 8 * 1 * 1"). Adopt the existing group in deepspeed.comm.
    deepspeed.init_distributed(dist_backend="gloo")
    # Build the model files on rank 0 first (no-op when already built).
    with targs.main_process_first(local=True):
        mdir = W.model_dir()
    data = W.load_tensors(W.data_dir(args.data_dir), mdir)
    base = W.load_backbone(mdir)  # partitioned at load time under ZeRO-3 (zero.Init)
    torch.manual_seed(args.seed)  # SAMPLE_VOCAB draws its r vocabulary ids from the global RNG
    model = get_peft_model(base, PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=W.NUM_TOKENS,
        prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, num_transformer_submodules=1))
    timer = StepTimer()
    trainer = LossTrainer(model=model, args=targs, train_dataset=TensorDataset(data),
                          data_collator=default_data_collator, callbacks=[timer])
    trainer.train()

    engine = trainer.model_wrapped  # the DeepSpeedEngine
    loss = trainer.last_loss.detach().float().clone()
    dist.all_reduce(loss)
    if targs.process_index == 0:
        W.report(f"hf_trainer:{args.ds_config.stem}", targs.world_size, timer.step_s,
                 loss.item() / targs.world_size, **timer.prompt_info,
                 zero_stage=engine.zero_optimization_stage(),
                 param_persistence_threshold=engine._config.zero_config.param_persistence_threshold,
                 ds_gradient_clipping=engine.gradient_clipping(),
                 optimizer=type(engine.optimizer.optimizer).__name__)
    dist.destroy_process_group()  # otherwise torch aborts at exit on the still-open gloo group


if __name__ == "__main__":
    main()
