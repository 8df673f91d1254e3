"""Shared bench helpers: the standard workload backbone (issue 8) built locally."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def build_standard_t5(out: Path, seed: int = 0) -> Path:
    """T5: vocab 32128, d_model 256, d_ff 1024, 4+4 layers, 8 heads, gated-gelu, fp32.

    Random weights (speed does not depend on them) + the demo word-level tokenizer, saved with
    save_pretrained and loaded back by the real loading code. Reused if already built.
    """
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from dtvg_ds.data.demo import build_tokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=32128, d_model=256, d_ff=1024, num_layers=4, num_decoder_layers=4,
                   num_heads=8, d_kv=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                   tie_word_embeddings=False)
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def build_xl_t5(out: Path, seed: int = 0) -> Path:
    """A Flan-T5-XL-shaped T5 (the published config, `plan.PRESETS['google/flan-t5-xl']`: 2.85B
    parameters) with random weights in bf16 + the demo tokenizer (its ids are a subset of the
    32128-entry vocabulary), saved in 2 GB safetensors shards (5.4 GB). Reused if complete.

    About a minute and ~6 GB of memory; the folder (default `.cache/xl_backbone`) is git-ignored.
    Random weights: losses and accuracies mean nothing; memory, time and code paths are real.
    """
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from dtvg_ds.data.demo import build_tokenizer
    from dtvg_ds.plan import PRESETS

    if (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    torch.manual_seed(seed)
    cfg = T5Config(**PRESETS["google/flan-t5-xl"], dropout_rate=0.1, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: 5.3 GiB, not 10.6
    try:
        with torch.no_grad():
            model = T5ForConditionalGeneration(cfg)
            # transformers 5 builds lm_head tied to the shared embedding whatever the config
            # says; Flan-T5 checkpoints carry their own, so give it one (2.85B, not 2.78B)
            model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    finally:
        torch.set_default_dtype(default)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="2GB")
    build_tokenizer().save_pretrained(tmp)
    del model
    tmp.rename(out)  # a crash mid-save never leaves a half-written model that looks complete
    return out


def standard_run(prefix: str, flags: dict[str, Any],
                 prepare: Callable[[Path], None] | None = None) -> tuple[Any, Path]:
    """The engine set up by hand on the standard backbone, for benches that drive its steps
    themselves (all ranks, under a launcher): (`engine.Run`, the run's temp dir).

    Rank 0 builds the backbone (once, `.cache/bench_t5`) and runs `prepare(tmp)` (data, DS
    config); `flags` are training flags over the defaults below (`True` = a bare switch; `{tmp}`
    in a value is the temp dir).
    """
    import tempfile

    from dtvg_ds import dist
    from dtvg_ds.config import parse_config
    from dtvg_ds.engine import setup

    dist.init()
    tmp = Path(dist.broadcast_object(tempfile.mkdtemp(prefix=prefix)))  # collective: rank 0's dir
    model_dir = ROOT / ".cache" / "bench_t5"
    if dist.is_main():
        build_standard_t5(model_dir)
        if prepare is not None:
            prepare(tmp)
    dist.barrier()  # collective: rank 0 has built the backbone and prepared the inputs
    base = {"task": "senti_a", "model_name_or_path": str(model_dir),
            "output_dir": str(tmp / "run"), "num_virtual_tokens": 100, "report_to": "none"}
    argv: list[str] = []
    for k, v in {**base, **flags}.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v).format(tmp=tmp)]
    return setup(parse_config(argv)), tmp
