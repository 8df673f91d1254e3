"""Shared bench helpers: the standard workload backbone (issue 8) built locally."""

from __future__ import annotations

from pathlib import Path


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
