"""Build, pretrain and cache the embedded default backbone (a tiny T5) on CPU.

No pretrained T5 can be downloaded here, and prompt tuning on a randomly initialised frozen
backbone cannot learn. So the demo backbone is a ~1.2M-parameter T5 pretrained briefly
(full fine-tuning, a few minutes on 2 CPU cores) on the mixture of the non-held-out demo
tasks *with* their text prefixes (see :mod:`dtvg_ds.data.demo`). Afterwards a soft prompt
can take the role of the prefix, and held-out tasks (``senti_c``, ``senti_c_flip``) are
learnable too.

The result is cached in ``cache_dir``: a ``save_pretrained`` model + tokenizer directory
with a ``DONE.json`` marker holding the recipe hash. A cache built with another recipe is
rebuilt; a complete one is reused immediately.

CLI: ``python -m dtvg_ds.data.demo_backbone --cache_dir DIR [--steps N] [--seed S]``
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration

from dtvg_ds.data.demo import (
    DEMO_TASKS,
    PRETRAIN_TASKS,
    VOCAB_SIZE,
    build_tokenizer,
    generate,
    iter_examples,
    split_seed,
    vocab_fingerprint,
)

MARKER = "DONE.json"
RECIPE_VERSION = 1  # bump when the training procedure changes in a way the recipe misses

DEMO_T5_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,  # == len(build_tokenizer()); already a multiple of 64
    "d_model": 128,
    "d_ff": 512,
    "d_kv": 32,
    "num_heads": 4,
    "num_layers": 3,  # encoder
    "num_decoder_layers": 2,
    "dropout_rate": 0.0,  # tiny model, endless synthetic data: nothing to regularise
    "feed_forward_proj": "relu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,  # T5 convention: decoding starts from <pad>
}

# Pretraining hyper-parameters (all part of the recipe hash).
LR = 2e-3
WEIGHT_DECAY = 0.01
WARMUP_STEPS = 200
BATCH_PER_TASK = 9  # 9 x 7 tasks = 63 examples per step, every task in every batch
GRAD_CLIP = 1.0
# torch intra-op threads while pretraining. 2 suits an otherwise idle 2-core machine; when the
# cores are oversubscribed (other jobs running) 1 thread can be several times faster, because
# OpenMP barriers wait for a descheduled peer thread. Not part of the recipe: the thread count
# only changes floating-point summation order.
NUM_THREADS = 2
LOG_EVERY = 250
N_EVAL = 256  # examples per task for the progress accuracies


def demo_t5_config(
    vocab_size: int = VOCAB_SIZE,
    d_model: int = 128,
    d_ff: int = 512,
    num_layers: int = 3,
    num_decoder_layers: int = 2,
    num_heads: int = 4,
    d_kv: int = 32,
    dropout_rate: float = 0.0,
) -> T5Config:
    """``T5Config`` of the demo backbone; defaults equal :data:`DEMO_T5_CONFIG`."""
    kwargs = dict(DEMO_T5_CONFIG)
    kwargs.update(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_decoder_layers,
        num_heads=num_heads,
        d_kv=d_kv,
        dropout_rate=dropout_rate,
    )
    return T5Config(**kwargs)


def recipe(
    steps: int, seed: int, model_kwargs: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Everything that determines the pretrained weights (hashed into the cache marker)."""
    return {
        "recipe_version": RECIPE_VERSION,
        "vocab": vocab_fingerprint(),  # covers vocabulary and example-generator version
        # the kwargs, not T5Config.to_dict(): a transformers upgrade alone must not rebuild
        "config": {**DEMO_T5_CONFIG, **_check_model_kwargs(model_kwargs)},
        "tasks": list(PRETRAIN_TASKS),
        "prefixes": {t: DEMO_TASKS[t].prefix for t in PRETRAIN_TASKS},
        "steps": steps,
        "seed": seed,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "warmup_steps": _warmup(steps),
        "schedule": "linear-warmup-linear-decay-to-0",
        "batch_per_task": BATCH_PER_TASK,
        "grad_clip": GRAD_CLIP,
    }


def _check_model_kwargs(model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    extra = dict(model_kwargs or {})
    allowed = set(inspect.signature(demo_t5_config).parameters)
    if set(extra) - allowed:
        raise ValueError(f"unknown model_kwargs {sorted(set(extra) - allowed)}; "
                         f"allowed: {sorted(allowed)}")
    return extra


def recipe_hash(rec: Mapping[str, Any]) -> str:
    """Stable short hash of a recipe dict."""
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _warmup(steps: int) -> int:
    # Short smoke runs (tests) would otherwise never leave warmup.
    return max(1, min(WARMUP_STEPS, steps // 10))


def is_complete(cache_dir: str | Path, expected_hash: str | None = None) -> bool:
    """True if ``cache_dir`` holds a finished backbone (matching ``expected_hash`` if given)."""
    marker = Path(cache_dir) / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return expected_hash is None or info.get("recipe_hash") == expected_hash


@torch.no_grad()
def label_accuracy(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, str]],
    batch_size: int = 256,
) -> float:
    """Fraction of records whose greedy FIRST decoder token equals the label word.

    The argmax runs over the full vocabulary (not just yes/no), i.e. it is exactly the
    first token ``model.generate`` would emit; a model that answers anything else is wrong.
    """
    was_training = model.training
    model.eval()
    label_ids = [tokenizer.convert_tokens_to_ids(r["target"]) for r in records]
    correct = 0
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        enc = tokenizer([r["source"] for r in chunk], padding=True, return_tensors="pt")
        start = torch.full((len(chunk), 1), model.config.decoder_start_token_id)
        logits = model(**enc, decoder_input_ids=start).logits[:, 0]
        gold = torch.tensor(label_ids[i : i + batch_size])
        correct += int((logits.argmax(-1) == gold).sum())
    model.train(was_training)
    return correct / max(1, len(records))


def _batches(tokenizer: PreTrainedTokenizerBase, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stratified pretraining batches: BATCH_PER_TASK examples of every task."""
    # The "pretrain" split seed range is disjoint from train/validation/test, so downstream
    # prompt-tuning evaluation never scores sentences the backbone was trained on.
    streams = [iter_examples(t, split_seed("pretrain", seed), with_prefix=True)
               for t in PRETRAIN_TASKS]
    while True:
        recs = [next(s) for s in streams for _ in range(BATCH_PER_TASK)]
        enc = tokenizer([r["source"] for r in recs], padding=True, return_tensors="pt")
        # targets are one word + </s>, so every label row has length 2 and needs no padding
        labels = tokenizer(text_target=[r["target"] for r in recs], return_tensors="pt")
        yield {**enc, "labels": labels["input_ids"]}


def pretrain_demo_backbone(
    steps: int = 2500,
    seed: int = 0,
    log: Callable[[str], None] = print,
    model_kwargs: Mapping[str, Any] | None = None,
    n_eval: int = N_EVAL,
    num_threads: int = NUM_THREADS,
) -> tuple[T5ForConditionalGeneration, dict[str, Any]]:
    """Build the tiny T5 and pretrain it on the prefixed demo-task mixture (no caching).

    Single process, plain PyTorch, ``num_threads`` torch threads. The caller's global torch RNG
    state and thread count are restored afterwards. ``n_eval`` examples per task (validation
    split, with prefix) measure progress. Returns ``(model, stats)``.
    """
    tokenizer = build_tokenizer()
    eval_sets = {
        t: generate(t, n_eval, split_seed("validation", seed), with_prefix=True)
        for t in PRETRAIN_TASKS
    }
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seeded init without clobbering caller RNG
            torch.manual_seed(seed)
            model = T5ForConditionalGeneration(demo_t5_config(**dict(model_kwargs or {})))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"demo backbone: {n_params / 1e6:.2f}M params, vocab {model.config.vocab_size}, "
            f"{steps} steps x {BATCH_PER_TASK * len(PRETRAIN_TASKS)} examples, "
            f"tasks {', '.join(PRETRAIN_TASKS)}")
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        warmup = _warmup(steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (s + 1) / warmup if s < warmup
            else max(0.0, (steps - s) / max(1, steps - warmup)),
        )
        model.train()
        batches = _batches(tokenizer, seed)
        history: list[dict[str, Any]] = []
        accs: dict[str, float] = {}
        window_loss, window_n = 0.0, 0
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            loss = model(**next(batches)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            window_loss += loss.item()
            window_n += 1
            if step % LOG_EVERY == 0 or step == steps:
                accs = {t: round(label_accuracy(model, tokenizer, ev), 3)
                        for t, ev in eval_sets.items()}
                elapsed = time.perf_counter() - t0
                mean_loss = window_loss / window_n
                history.append({"step": step, "loss": round(mean_loss, 4),
                                "seconds": round(elapsed, 1), "accuracy": accs})
                log(f"step {step}/{steps} loss {mean_loss:.4f} ({elapsed:.0f}s) "
                    f"acc mean {sum(accs.values()) / len(accs):.3f} "
                    + " ".join(f"{t}={a:.2f}" for t, a in accs.items()))
                window_loss, window_n = 0.0, 0
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev_threads)
    model.eval()
    stats = {
        "steps": steps,
        "seconds": round(seconds, 1),
        "params": n_params,
        "final_accuracy": accs,
        "num_threads": num_threads,
        "accuracy_definition": "greedy first decoder token (argmax over full vocab) == label, "
        f"{n_eval} validation-split examples per task, with task prefix",
        "history": history,
    }
    return model, stats


@contextlib.contextmanager
def _build_lock(path: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Exclusive file lock so concurrent callers (e.g. several ranks) train only once."""
    try:
        import fcntl
    except ImportError:  # non-POSIX: fall back to the rename race handling in _install
        yield
        return
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building the demo backbone ({path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _install(tmp: Path, cache_dir: Path, expected_hash: str) -> None:
    """Move the finished ``tmp`` dir to ``cache_dir`` (rename: readers never see a partial dir)."""
    try:
        os.rename(tmp, cache_dir)  # succeeds if cache_dir is absent or an empty directory
        return
    except OSError:
        if is_complete(cache_dir, expected_hash):
            return  # someone else installed the same recipe meanwhile; keep theirs
    # Stale backbone from another recipe: swap it out, then delete it.
    old = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.old-", dir=cache_dir.parent))
    os.rename(cache_dir, old / cache_dir.name)
    os.rename(tmp, cache_dir)
    shutil.rmtree(old, ignore_errors=True)


def ensure_demo_backbone(
    cache_dir: str | Path,
    steps: int = 2500,
    seed: int = 0,
    log: Callable[[str], None] = print,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    n_eval: int = N_EVAL,
    num_threads: int = NUM_THREADS,
) -> Path:
    """Return ``cache_dir`` holding the pretrained demo backbone, building it if needed.

    If ``cache_dir/DONE.json`` carries the hash of the current recipe (vocabulary, config,
    ``steps``, ``seed``, optimiser settings) the directory is returned at once. Otherwise
    the backbone is pretrained (:func:`pretrain_demo_backbone`), saved with
    ``save_pretrained`` (model + tokenizer) into a temp dir next to ``cache_dir`` that gets
    ``DONE.json`` last, and renamed into place. ``model_kwargs`` override
    :func:`demo_t5_config` arguments; ``n_eval`` (examples per task for the logged
    accuracies) and ``num_threads`` (torch threads while training) are not part of the
    recipe. Refuses to replace a non-empty directory that has no ``DONE.json`` (it is not
    ours).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cache_dir = Path(cache_dir).absolute()
    rec = recipe(steps, seed, model_kwargs)
    h = recipe_hash(rec)
    if is_complete(cache_dir, h):
        log(f"demo backbone: using cached {cache_dir}")
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache_dir.parent / f".{cache_dir.name}.lock", log):
        if is_complete(cache_dir, h):  # built by another process while we waited
            log(f"demo backbone: using cached {cache_dir}")
            return cache_dir
        if cache_dir.exists():
            if not is_complete(cache_dir) and any(cache_dir.iterdir()):
                raise RuntimeError(
                    f"{cache_dir} exists, is not empty and has no {MARKER}; refusing to "
                    "overwrite it. Pass an empty or new --cache_dir."
                )
            if is_complete(cache_dir):
                log(f"demo backbone: recipe changed, rebuilding {cache_dir}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
        # mkdtemp makes a private 0700 dir; the installed cache should be readable like any
        # other directory (e.g. by other users' jobs sharing it)
        tmp.chmod(0o755)
        try:
            model, stats = pretrain_demo_backbone(
                steps, seed, log, model_kwargs, n_eval=n_eval, num_threads=num_threads
            )
            model.save_pretrained(tmp)
            build_tokenizer().save_pretrained(tmp)
            done = {"recipe_hash": h, "recipe": rec, **stats,
                    "torch_version": torch.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            # Marker written last: its presence means every other file is complete.
            for f in tmp.iterdir():  # some writers create 0600 files; the cache is shared
                f.chmod(0o644)
            (tmp / MARKER).write_text(json.dumps(done, indent=1) + "\n")
            _install(tmp, cache_dir, h)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"demo backbone: pretrained in {stats['seconds']:.0f}s, saved to {cache_dir}")
    return cache_dir


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: build (or reuse) the cached demo backbone and print its path."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache_dir", required=True, help="directory of the cached backbone")
    ap.add_argument("--steps", type=int, default=2500, help="pretraining steps")
    ap.add_argument("--seed", type=int, default=0, help="model init and data seed")
    ap.add_argument("--num_threads", type=int, default=NUM_THREADS,
                    help="torch threads (use 1 if the cores are busy with other jobs)")
    args = ap.parse_args(argv)
    path = ensure_demo_backbone(args.cache_dir, steps=args.steps, seed=args.seed,
                                log=lambda s: print(s, flush=True),
                                num_threads=args.num_threads)
    print(path)


if __name__ == "__main__":
    main()
