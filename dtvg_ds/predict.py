"""Run a saved prompt on new inputs: one jsonl file in, one jsonl file out, batched, one process.

    python -m dtvg_ds.predict --artifact runs/rte --model_name_or_path google/flan-t5-xl \
        --input in.jsonl --output out.jsonl [--task rte] [--batch_size 32] [--max_new_tokens 16]

Each input line is a JSON object. A line with a `source` string is used as is (already in the
text-to-text format the prompt was trained on). Otherwise `--task NAME` formats the line's raw
fields with that task's template (the Hub schema, as `python -m dtvg_ds.tasks` lists); label
fields may be absent, but a missing field the *input* needs is an error naming the line.

Each output line is the input object plus `source` (the text fed to the model) and `prediction`
(the greedy generation, decoded like evaluation decodes it), in input order. The output is
written to a temporary file next to it and renamed into place when complete, so a reader never
sees a partial file; an existing output is only replaced with `--overwrite`.

Decoding is the evaluation path of training: `PromptedSeq2Seq.generate` (greedy), inputs
truncated to `--max_source_length` (training's default 256), right padding, batches built by
`batches.collate`. Inputs are sorted by length before batching (less padding) and written back in
input order. The backbone is checked against the artifact's `backbone_fingerprint` before any
generation. No DeepSpeed, no process group: the backbone is loaded whole on one device.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtvg_ds.artifacts import ArtifactError, PromptArtifact, load_artifact, write_jsonl_atomic


class PredictError(ValueError):
    """A bad predict request: missing/invalid input, existing output, unknown task..."""


def build_model(art: PromptArtifact, model_name_or_path: str, dtype: torch.dtype = torch.float32,
                mpt_task: str | None = None, cache_dir: str = ".cache") -> tuple[Any, Any]:
    """(`PromptedSeq2Seq` with the artifact's prompt in eval mode, tokenizer); the backbone is
    checked against the artifact (fingerprint, d_model) from its config before its weights load."""
    from transformers import AutoTokenizer

    from dtvg_ds import backbone
    from dtvg_ds.export import artifact_prompter
    from dtvg_ds.model import PromptedSeq2Seq, load_backbone

    prompter = artifact_prompter(art, mpt_task)
    path = backbone.resolve(model_name_or_path, cache_dir)
    config = backbone.read_config(path, model_name_or_path)
    backbone.check_artifact(art, backbone.fingerprint(config), model_name_or_path, config.d_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = PromptedSeq2Seq(prompter, load_backbone(path, dtype))
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------
# input
# ----------------------------------------------------------------------------------------------

@dataclass
class Item:
    """One model input: the line it came from (1-based), its JSON object, the source text."""

    line: int
    row: dict[str, Any]
    source: str


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a bad line is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise PredictError(f"--input {p}: no such file")
    with p.open(encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise PredictError(f"--input {p} line {n}: not valid JSON ({e.msg} at column "
                                   f"{e.colno})") from None
            if not isinstance(obj, dict):
                raise PredictError(f"--input {p} line {n}: expected a JSON object, got "
                                   f"{type(obj).__name__}")
            yield n, obj


class _Filled(dict):
    """A row whose missing keys read as `fill`, remembering which were missing.

    Lets a task template run on a row without its label (prediction inputs have none).
    """

    def __init__(self, row: dict[str, Any], fill: Any):
        super().__init__(row)
        self.fill, self.missing = fill, set()

    def __missing__(self, key: str) -> Any:
        self.missing.add(key)
        return self.fill


def format_row(task: Any, row: dict[str, Any], where: str) -> list[str]:
    """The source text(s) of a raw row under `task`'s template.

    Missing fields are filled twice with different values: if the sources differ, a missing
    field feeds the input (an error naming it); otherwise it only fed the target, which
    prediction does not need.
    """
    if task.format is None:
        raise PredictError(f"{where}: no 'source' field, and task {task.name!r} has no template "
                           "for raw fields; give each line a 'source'")
    outs, missing = [], set()
    for fill in (0, 1):
        filled = _Filled(row, fill)
        try:
            recs = task.format(filled)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            # the stand-in value broke the template: most likely a missing input field
            need = f"needs field(s) {sorted(filled.missing)}; " if filled.missing else ""
            raise PredictError(f"{where}: cannot format as task {task.name!r} ({need}"
                               f"{type(e).__name__}: {e}); fields present: {sorted(row)}") from None
        recs = recs if isinstance(recs, list) else [recs]
        outs.append([str(r["source"]) for r in recs])
        missing |= filled.missing
    if outs[0] != outs[1]:
        raise PredictError(f"{where}: task {task.name!r} needs field(s) {sorted(missing)} for its "
                           f"input; fields present: {sorted(row)}")
    return outs[0]


def load_items(path: str | Path, task_name: str | None = None) -> list[Item]:
    """Every input of the file, as model inputs (a template may make several of one line)."""
    task = None
    if task_name:
        from dtvg_ds.data.zoo import get_task

        task = get_task(task_name)
    items: list[Item] = []
    for n, row in read_jsonl(path):
        where = f"--input {path} line {n}"
        if "source" in row:
            if not isinstance(row["source"], str):
                raise PredictError(f"{where}: 'source' must be a string")
            items.append(Item(n, row, row["source"]))
        elif task is None:
            raise PredictError(f"{where}: no 'source' field; give one, or pass --task NAME to "
                               f"format the raw fields {sorted(row)}")
        else:
            items += [Item(n, row, s) for s in format_row(task, row, where)]
    if not items:
        raise PredictError(f"--input {path}: no input lines")
    return items


# ----------------------------------------------------------------------------------------------
# prediction
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: Any, tokenizer: Any, sources: list[str], batch_size: int = 32,
            max_new_tokens: int = 16, max_source_length: int = 256,
            progress: bool = False) -> list[str]:
    """Greedy predictions for `sources`, in order (the evaluation decode path)."""
    from tqdm.auto import tqdm

    from dtvg_ds.data import batches

    ids = tokenizer(sources, truncation=True, max_length=max_source_length)["input_ids"]
    # collate() pads sources and labels; the labels are unused here (one eos as a stand-in).
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    enc = batches.Encoded(list(ids), [[eos]] * len(ids), [""] * len(ids))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # little padding per batch
    dev = next(model.backbone.parameters()).device
    out: list[str] = [""] * len(ids)
    with tqdm(total=len(ids), desc="predict", unit="ex", disable=not progress,
              file=sys.stderr, mininterval=1.0) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            b = batches.collate(enc, idx, tokenizer.pad_token_id)
            gen = model.generate(b["input_ids"].to(dev), b["attention_mask"].to(dev),
                                 max_new_tokens=max_new_tokens)
            for i, text in zip(idx, tokenizer.batch_decode(gen, skip_special_tokens=True),
                               strict=True):
                out[i] = text
            bar.update(len(idx))
    return out


def run(args: argparse.Namespace) -> Path:
    """Everything `main` does, raising user errors (checked cheapest first, before loading)."""
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise PredictError(f"--output {out}: exists; pass --overwrite to replace it")
    if out.is_dir():
        raise PredictError(f"--output {out}: is a directory; name a file")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise PredictError("--batch_size and --max_new_tokens must be >= 1")
    # Generating with a running job's best-so-far prompt is a fair way to watch it: warn only.
    art = load_artifact(args.artifact, allow_in_progress=True)
    items = load_items(args.input, args.task)
    if args.deepspeed:
        return _run_sharded(args, art, items, out)
    model, tokenizer = build_model(art, args.model_name_or_path or str(art.meta["backbone"]),
                                   torch.bfloat16 if args.bf16 else torch.float32,
                                   args.mpt_task, args.cache_dir)
    if args.device != "cpu":
        model.to(args.device)
    preds = predict(model, tokenizer, [it.source for it in items], args.batch_size,
                    args.max_new_tokens, args.max_source_length, progress=not args.quiet)
    rows = [{**it.row, "source": it.source, "prediction": p}
            for it, p in zip(items, preds, strict=True)]
    write_jsonl_atomic(out, rows)
    return out


def _run_sharded(args: argparse.Namespace, art: PromptArtifact, items: list[Item],
                 out: Path) -> Path:
    """`--deepspeed`: the backbone sharded over the launcher's ranks (as in training), each rank
    decoding its share of the inputs; rank 0 writes every prediction, in input order."""
    from dtvg_ds import dist, inference
    from dtvg_ds.data import batches
    from dtvg_ds.evaluation import generate_all
    from dtvg_ds.export import artifact_prompter

    inference.start_process_group()
    dec = inference.build_decoder(art, artifact_prompter(art, args.mpt_task),
                                  args.model_name_or_path or str(art.meta["backbone"]),
                                  args.deepspeed, args.bf16, args.cache_dir)
    recs = [{"source": it.source, "target": ""} for it in items]
    enc = batches.encode(recs, dec.tokenizer, args.max_source_length, 1)
    preds, _, _ = generate_all(dec.engine, dec.model, enc, dec.tokenizer, args.batch_size,
                               args.max_new_tokens, dec.zero_stage, args.eval_gather_backbone,
                               progress=not args.quiet)
    if dist.is_main():
        write_jsonl_atomic(out, [{**it.row, "source": it.source, "prediction": p}
                                 for it, p in zip(items, preds, strict=True)])
    dist.barrier()  # collective: every rank; rank 0 has written the output
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dtvg_ds.predict",
                                 description="Generate with a saved prompt on a jsonl file.")
    ap.add_argument("--artifact", required=True, help="prompt artifact dir (any method)")
    ap.add_argument("--model_name_or_path", default=None,
                    help="backbone (default: the artifact's; 'demo' = the cached demo T5)")
    ap.add_argument("--input", required=True, help="jsonl: 'source' per line, or raw fields + --task")
    ap.add_argument("--output", required=True, help="jsonl to write (input + source + prediction)")
    ap.add_argument("--task", default=None, help="format raw fields with this task's template")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--max_source_length", type=int, default=256, help="as in training")
    ap.add_argument("--mpt_task", default=None, help="MPT source artifacts: whose prompt to use")
    ap.add_argument("--bf16", action="store_true", help="load the backbone in bfloat16")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (one device; "
                    "--deepspeed shards the backbone over a launcher's ranks instead)")
    ap.add_argument("--deepspeed", default=None,
                    help="DeepSpeed config as in training (path or shipped name, e.g. zero3): "
                         "run under a launcher with the backbone sharded, e.g. `deepspeed "
                         "--num_gpus 8 --module dtvg_ds.predict --deepspeed zero3 ...`")
    ap.add_argument("--eval_gather_backbone", default="auto", choices=["auto", "always", "never"],
                    help="with --deepspeed: gather the backbone once for decoding when it fits")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cache_dir", default=".cache", help="where the 'demo' backbone is cached")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: user errors print one `error:` line and return 2."""
    from dtvg_ds import dist
    from dtvg_ds.cli import run_tool
    from dtvg_ds.data.zoo import TaskError
    from dtvg_ds.export import ExportError
    from dtvg_ds.model import ModelLoadError

    args = _parser().parse_args(argv)

    def body() -> None:
        out = run(args)
        if dist.is_main():
            print(f"predictions written to {out}")

    return run_tool(body, (PredictError, ArtifactError, ExportError, ModelLoadError, TaskError))

if __name__ == "__main__":
    from dtvg_ds.cli import exit_process

    exit_process(main())
