"""A saved prompt on a frozen backbone under DeepSpeed, for decoding only (no optimizer).

The sharded path of `python -m dtvg_ds.evaluation` and `python -m dtvg_ds.predict --deepspeed`:
under a launcher every rank holds 1/N of the backbone (ZeRO-3, loaded inside `zero.Init` as in
training) and decodes its shard of the inputs; rank 0 gets every prediction. Without a launcher
the same code runs as a 1-rank process group.
"""

from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass, replace
from typing import Any

import torch

from dtvg_ds import backbone, dist
from dtvg_ds.artifacts import PromptArtifact
from dtvg_ds.config import TrainConfig, read_ds_config, resolve_ds_config
from dtvg_ds.config import zero_stage as get_zero_stage
from dtvg_ds.model import PromptedSeq2Seq, load_backbone


@dataclass
class Decoder:
    """What `evaluation.generate_all` needs: the engine, its model, tokenizer and ZeRO stage."""

    engine: Any
    model: PromptedSeq2Seq
    tokenizer: Any
    zero_stage: int
    model_path: str


def start_process_group(timeout_minutes: float = 30.0) -> None:
    """The launcher's process group, or a 1-rank group when started as a plain `python -m`."""
    if not any(k in os.environ for k in ("RANK", "SLURM_PROCID")):
        with socket.socket() as s:  # a free port for the 1-rank rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
    dist.init(timeout_minutes)


def inference_ds_config(path: str, bf16: bool) -> dict[str, Any]:
    """The training JSON without what only training uses (optimizer, scheduler, clipping), its
    "auto" values filled as training fills them (micro batch 1: decoding batches are ours)."""
    ds = copy.deepcopy(read_ds_config(path))
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        ds.pop(key, None)
    cfg = replace(TrainConfig(), deepspeed=path, bf16=bf16, per_device_train_batch_size=1,
                  gradient_accumulation_steps=1)
    ds, _ = resolve_ds_config(cfg, ds, dist.world_size(), path)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage3_param_persistence_threshold") == "auto":
        del zero["stage3_param_persistence_threshold"]  # no trainable prompt to keep whole
    return ds


def build_decoder(art: PromptArtifact, prompter: torch.nn.Module, model_name_or_path: str,
                  deepspeed_config: str, bf16: bool = False, cache_dir: str = ".cache") -> Decoder:
    """The backbone (sharded under ZeRO-3) + `prompter` (`export.artifact_prompter`: the saved
    prompt, or ATTEMPT's module), wrapped by `deepspeed.initialize` with no optimizer. The
    backbone is checked against the artifact before its weights load. All ranks."""
    import deepspeed
    from transformers import AutoTokenizer

    ds = inference_ds_config(deepspeed_config, bf16)
    name = model_name_or_path
    path = backbone.resolve_on_all_ranks(name, cache_dir)
    config = backbone.read_config(path, name)
    backbone.check_artifact(art, backbone.fingerprint(config), name, config.d_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    stage = get_zero_stage(ds)
    keep_alive = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds)  # from_pretrained inside zero.Init: 1/N per rank
    model = PromptedSeq2Seq(prompter,
                            load_backbone(path, torch.bfloat16 if bf16 else torch.float32))
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
    del keep_alive
    return Decoder(engine, model.eval(), tokenizer, stage, path)
