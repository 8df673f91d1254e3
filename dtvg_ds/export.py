"""Take prompts elsewhere: dtvg_ds prompt artifacts <-> HuggingFace PEFT prompt-tuning adapters.

    python -m dtvg_ds.export to-peft   ARTIFACT_DIR ADAPTER_DIR [--model_name_or_path M]
                                       [--mpt_task NAME] [--overwrite]
    python -m dtvg_ds.export from-peft ADAPTER_DIR ARTIFACT_DIR [--model_name_or_path M]
                                       [--task NAME] [--init_from ARTIFACT_DIR |
                                        --prompt_init vocab --prompt_init_seed 0
                                        --prompt_init_vocab_range 5000] [--overwrite]

**Export** (`to-peft`) writes `adapter_config.json` + `adapter_model.safetensors` in the layout
PEFT 0.21.2 itself saves for `PromptTuningConfig(task_type="SEQ_2_SEQ_LM")`, so that
`PeftModel.from_pretrained(backbone, ADAPTER_DIR)` reproduces `PromptedSeq2Seq` with the same
prompt: same logits (up to float rounding) and the same greedy generations (tested). Every
method's artifact holds the prompt its model prepends in `prompt` (PT, SPoT, DTVG's merged
P_mix, MPT target's P* (.) (u v^T)); an MPT *source* artifact holds the shared P*, so one of its
tasks is picked with `--mpt_task` and exported as P* (.) (u_k v_k^T), the prompt its student used.

How the config maps (see `peft_config`): `peft_type` PROMPT_TUNING, `task_type` SEQ_2_SEQ_LM
(-> `PeftModelForSeq2SeqLM`), `num_virtual_tokens` = r, `token_dim` = d, and
`num_transformer_submodules` = 1. PEFT defaults the latter to 2 for seq2seq models and then
allocates 2r prompt rows, but its prompt-tuning forward() and generate() only ever prepend rows
[:r] to the *encoder* input embeddings (and extend the encoder attention mask by r ones); the
decoder is untouched, exactly like `PromptedSeq2Seq.embed`. With 1 the saved tensor is exactly
our r x d prompt and no unused rows travel with it. `inference_mode` true: the weights are
loaded, never initialised, so `prompt_tuning_init` ("RANDOM") has no effect.

**Import** (`from-peft`) turns a PEFT prompt-tuning adapter into a stage-1 artifact (method
"pt", `extra.origin` "peft_import"). A task vector T = P - P_init needs the P_init shared by the
artifacts it will be compared with, which an adapter does not carry. Two ways to get it:
`--init_from DIR` copies P_init (and its settings) from an existing artifact of the family it
joins (the safe choice; also the one for bf16 families); otherwise P_init is recomputed from the
backbone exactly as a run with the same `--prompt_init/--prompt_init_seed/
--prompt_init_vocab_range` computes it (fp32 backbone), default vocab / 0 / 5000 = the training
defaults. An adapter saved by PEFT with 2 submodules holds 2r rows; rows [:r] are the prompt PEFT
applies and are imported, the decoder half (never used by PEFT's prompt tuning) is dropped.

Only safetensors and JSON are read: an adapter that only has `adapter_model.bin` (pickle) is
refused, never unpickled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from dtvg_ds import backbone
from dtvg_ds.artifacts import (
    META_FILE,
    TENSORS_FILE,
    ArtifactError,
    PromptArtifact,
    atomic_write_bytes,
    atomic_write_json,
    best_metric,
    load_artifact,
    save_artifact,
)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PICKLE_FILE = "adapter_model.bin"
PEFT_PROMPT_KEY = "prompt_embeddings"  # the one tensor PEFT saves for prompt learning
# The PEFT release whose on-disk prompt-tuning layout this module writes (and the tests load).
PEFT_FORMAT_VERSION = "0.21.2"


class ExportError(ValueError):
    """A bad export/import request (wrong kind of adapter, shape, existing output...)."""


# ----------------------------------------------------------------------------------------------
# shared helpers (also used by dtvg_ds.predict)
# ----------------------------------------------------------------------------------------------

def artifact_prompt(art: PromptArtifact, mpt_task: str | None = None) -> torch.Tensor:
    """The r x d prompt the artifact's model prepends (fp32).

    `prompt` for every method except `mpt_source`, whose `prompt` is the shared P*: there the
    student prompt of task `mpt_task`, P* (.) (u_k v_k^T), computed as the training forward does.
    ATTEMPT artifacts are refused: their prompt depends on each input (`artifact_prompter`).
    """
    from dtvg_ds import prompt_math

    if art.meta.get("method") == "attempt":
        raise ExportError(f"{art.path}: an ATTEMPT artifact's prompt is built per input by its "
                          "attention module; it cannot be exported as one static prompt (score "
                          "or run it with python -m dtvg_ds.evaluation / predict)")
    if art.meta.get("method") != "mpt_source":
        if mpt_task is not None:
            raise ExportError(f"--mpt_task applies to MPT source artifacts only; {art.path} is "
                              f"method {art.meta.get('method')!r}: drop the flag")
        return art.prompt.float()
    tasks = list(art.meta.get("extra", {}).get("mpt_tasks", []))
    if mpt_task is None:
        raise ExportError(f"{art.path}: an MPT source artifact holds the shared prompt P* and one "
                          f"factor pair per task; pick the task to export with --mpt_task (one "
                          f"of {tasks})")
    if mpt_task not in tasks:
        raise ExportError(f"--mpt_task {mpt_task!r}: not a task of {art.path} (tasks: {tasks})")
    k = tasks.index(mpt_task)
    return prompt_math.mpt_prompt(art.prompt.float(), art.tensors["u"][k].float(),
                                  art.tensors["v"][k].float())


def artifact_prompter(art: PromptArtifact, mpt_task: str | None = None) -> torch.nn.Module:
    """The prompter that decodes with the artifact as its training run did: the static
    `artifact_prompt` in a `FixedPrompt`, or for ATTEMPT the attention module rebuilt from the
    artifact (a prompt per input). Used by evaluation, predict and --do_test."""
    if art.meta.get("method") == "attempt":
        if mpt_task is not None:
            raise ExportError(f"--mpt_task applies to MPT source artifacts only; {art.path} is "
                              "an ATTEMPT artifact: drop the flag")
        from dtvg_ds.methods.attempt import Attempt

        return Attempt.from_artifact(art)
    from dtvg_ds.model import FixedPrompt

    return FixedPrompt(artifact_prompt(art, mpt_task))


def _check_output_dir(out: Path, overwrite: bool, what: str) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: not empty; pass --overwrite to replace the {what} in it, or "
                          "choose a new directory")


# ----------------------------------------------------------------------------------------------
# export: artifact -> PEFT adapter
# ----------------------------------------------------------------------------------------------

def peft_config(num_tokens: int, d_model: int, base_model: str,
                backbone_config: Any | None = None) -> dict[str, Any]:
    """`adapter_config.json` with exactly the fields PEFT 0.21.2 writes for seq2seq prompt tuning.

    No extra keys: PEFT warns about (and drops) unknown config keys, so provenance goes into the
    safetensors header instead. `num_layers`/`num_attention_heads` are informational for prompt
    tuning (PEFT fills them from the model config when it saves); we copy them when the backbone
    config is at hand.
    """
    layers = getattr(backbone_config, "num_layers", None) if backbone_config is not None else None
    heads = getattr(backbone_config, "num_heads", None) if backbone_config is not None else None
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": heads,
        "num_layers": layers,
        # 1, not PEFT's seq2seq default 2: see the module docstring (encoder-only prompt, r rows).
        "num_transformer_submodules": 1,
        "num_virtual_tokens": int(num_tokens),
        "peft_type": "PROMPT_TUNING",
        "peft_version": PEFT_FORMAT_VERSION,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": "SEQ_2_SEQ_LM",
        "token_dim": int(d_model),
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def export_peft(artifact_dir: str | Path, out_dir: str | Path, model_name_or_path: str | None = None,
                mpt_task: str | None = None, overwrite: bool = False,
                cache_dir: str = ".cache", allow_in_progress: bool = False) -> Path:
    """Write the artifact's prompt as a PEFT prompt-tuning adapter dir; returns it.

    With `model_name_or_path` the backbone's config is checked against the artifact's
    fingerprint and recorded as `base_model_name_or_path`; without it the artifact's `backbone`
    is recorded (and checked only if it is a local dir). 'demo' is recorded as the local dir it
    resolves to, so `AutoPeftModelForSeq2SeqLM.from_pretrained(adapter)` works on this machine.
    """
    from safetensors.torch import save

    out = Path(out_dir)
    _check_output_dir(out, overwrite, "adapter")
    art = load_artifact(artifact_dir, allow_in_progress)
    prompt = artifact_prompt(art, mpt_task).contiguous()
    from dtvg_ds.config import DEMO_MODEL

    name = model_name_or_path or str(art.meta["backbone"])
    # 'demo' means nothing to PEFT: record the directory it resolves to on this machine.
    # Checked against the backbone when one is named or present here (a Hub id recorded in the
    # artifact is not fetched just to export); 'demo' is recorded as the dir it resolves to.
    check = model_name_or_path is not None or name == DEMO_MODEL or Path(name).is_dir()
    path = backbone.resolve(name, cache_dir) if check else name
    base = path if name == DEMO_MODEL else name
    config = None
    if check:
        config = backbone.read_config(path, name)
        backbone.check_artifact(art, backbone.fingerprint(config), name, config.d_model)
    # safetensors header metadata must be str -> str; PEFT only needs "format": "pt".
    provenance = {"format": "pt", "dtvg_ds.task": str(art.meta["task"]),
                  "dtvg_ds.method": str(art.meta.get("method", "")),
                  "dtvg_ds.backbone_fingerprint": str(art.meta["backbone_fingerprint"]),
                  "dtvg_ds.init_fingerprint": str(art.meta["init_fingerprint"]),
                  "dtvg_ds.source_sha256": str(art.meta.get("safetensors_sha256", "")),
                  "dtvg_ds.mpt_task": mpt_task or ""}
    blob = save({PEFT_PROMPT_KEY: prompt}, metadata=provenance)
    # Weights first, config last: PEFT reads the config first, so a dir with a config always
    # has its weights (same rule as our own artifacts).
    atomic_write_bytes(out / PEFT_WEIGHTS_FILE, blob)
    atomic_write_json(out / PEFT_CONFIG_FILE, peft_config(prompt.shape[0], prompt.shape[1], base,
                                                          config))
    return out


# ----------------------------------------------------------------------------------------------
# import: PEFT adapter -> stage-1 artifact
# ----------------------------------------------------------------------------------------------

def read_peft_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], torch.Tensor]:
    """(adapter config, the r x d prompt PEFT prepends to the encoder) of a prompt-tuning adapter.

    Reads JSON and safetensors only. Refuses other PEFT methods (prefix tuning, P-tuning and
    MPT do not reduce to one input-embedding prompt) and non-seq2seq task types.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    d = Path(adapter_dir)
    cfg_f, w_f = d / PEFT_CONFIG_FILE, d / PEFT_WEIGHTS_FILE
    if not cfg_f.is_file():
        raise ExportError(f"{cfg_f}: missing; {d} is not a PEFT adapter directory")
    try:
        cfg = json.loads(cfg_f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{cfg_f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{cfg_f}: not a JSON object")
    if cfg.get("peft_type") != "PROMPT_TUNING":
        raise ExportError(f"{cfg_f}: peft_type {cfg.get('peft_type')!r}; only PROMPT_TUNING "
                          "adapters hold a plain input-embedding prompt that can be imported")
    task_type = cfg.get("task_type")
    if task_type not in ("SEQ_2_SEQ_LM", None):
        raise ExportError(f"{cfg_f}: task_type {task_type!r}; dtvg_ds prompts live on "
                          "encoder-decoder backbones (SEQ_2_SEQ_LM)")
    if not w_f.is_file():
        if (d / PEFT_PICKLE_FILE).is_file():
            raise ExportError(f"{d}: has only {PEFT_PICKLE_FILE} (a pickle, which dtvg_ds never "
                              "loads); re-save the adapter with save_pretrained(..., "
                              "safe_serialization=True)")
        raise ExportError(f"{w_f}: missing; the adapter has no weights")
    try:
        tensors = load(w_f.read_bytes())
    except (SafetensorError, ValueError) as e:
        raise ExportError(f"{w_f}: unreadable safetensors ({e})") from None
    if PEFT_PROMPT_KEY not in tensors:
        raise ExportError(f"{w_f}: no {PEFT_PROMPT_KEY!r} tensor (has {sorted(tensors)}); not a "
                          "PEFT prompt-tuning adapter")
    emb = tensors[PEFT_PROMPT_KEY].float()
    r, dim = cfg.get("num_virtual_tokens"), cfg.get("token_dim")
    # PEFT's own default when the field is null: 2 for seq2seq, else 1 (PeftModel setup).
    subs = cfg.get("num_transformer_submodules") or (2 if task_type == "SEQ_2_SEQ_LM" else 1)
    if not isinstance(r, int) or r < 1 or emb.dim() != 2 or emb.shape[0] != r * subs or (
            dim is not None and emb.shape[1] != dim):
        raise ExportError(f"{w_f}: {PEFT_PROMPT_KEY} has shape {tuple(emb.shape)}, the config "
                          f"says {r} x {subs} submodule(s) rows of width {dim}; the files do not "
                          "belong together")
    prompt = emb[:r].clone()  # rows PEFT prepends to the encoder; the rest is never used
    if not torch.isfinite(prompt).all():
        raise ExportError(f"{w_f}: the prompt contains NaN/Inf")
    return cfg, prompt


def import_peft(adapter_dir: str | Path, out_dir: str | Path, model_name_or_path: str | None = None,
                task: str | None = None, init_from: str | Path | None = None,
                prompt_init: str = "vocab", prompt_init_seed: int = 0,
                prompt_init_vocab_range: int = 5000, overwrite: bool = False,
                cache_dir: str = ".cache", allow_in_progress: bool = False) -> Path:
    """Write a PEFT prompt-tuning adapter as a stage-1 prompt artifact; returns its dir.

    The backbone (`model_name_or_path`, default the adapter's `base_model_name_or_path`) gives
    the fingerprint and, unless `init_from` is given, the recomputed P_init.
    """
    from dtvg_ds.model import init_prompt, load_backbone

    out = Path(out_dir)
    _check_output_dir(out, overwrite, "artifact")
    cfg, prompt = read_peft_adapter(adapter_dir)
    model_ref = model_name_or_path or cfg.get("base_model_name_or_path")
    if not model_ref:
        raise ExportError(f"{adapter_dir}: the adapter names no base model; pass "
                          "--model_name_or_path")
    path = backbone.resolve(model_ref, cache_dir)
    config = backbone.read_config(path, model_ref)
    r, d = prompt.shape
    if d != int(config.d_model):
        raise ExportError(f"{adapter_dir}: prompt width {d} != d_model {config.d_model} of "
                          f"{model_ref!r}; pass the backbone the adapter was trained on")
    fp = backbone.fingerprint(config)
    if init_from is not None:
        ref = load_artifact(init_from, allow_in_progress)
        backbone.check_artifact(ref, fp, model_ref, what="--init_from")
        if tuple(ref.init.shape) != (r, d):
            raise ArtifactError(f"--init_from {init_from}: P_init is {tuple(ref.init.shape)}, the "
                                f"adapter's prompt {r} x {d}; pick an artifact with "
                                f"--num_virtual_tokens {r}")
        init, method, seed = ref.init.clone(), ref.meta["init_method"], ref.meta["init_seed"]
        init_note: dict[str, Any] = {"init_from": str(init_from)}
    else:
        # fp32, as a run without --bf16 computes it: the same rows of the same embedding matrix.
        model = load_backbone(path, torch.float32)
        init = init_prompt(model, r, prompt_init, prompt_init_seed, prompt_init_vocab_range)
        del model
        method, seed = prompt_init, prompt_init_seed
        init_note = {"init_recomputed": {"prompt_init": prompt_init, "prompt_init_seed": seed,
                                         "prompt_init_vocab_range": prompt_init_vocab_range}}
    from dtvg_ds.config import DEMO_MODEL

    meta = {"task": task or Path(adapter_dir).resolve().name, "method": "pt",
            "backbone": DEMO_MODEL if model_ref == DEMO_MODEL else str(model_ref),
            "backbone_fingerprint": fp, "init_method": method, "init_seed": seed, "steps": 0,
            "best_metric": best_metric("imported", float("nan"), 0),
            "extra": {"origin": "peft_import", "peft_adapter": str(Path(adapter_dir).resolve()),
                      "peft_config": cfg, **init_note}}
    return save_artifact(out, prompt, init, meta)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dtvg_ds.export",
                                 description="Convert prompt artifacts to/from HuggingFace PEFT "
                                             "prompt-tuning adapters.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("to-peft", help="artifact dir -> PEFT adapter dir")
    e.add_argument("artifact", help=f"artifact dir ({TENSORS_FILE} + {META_FILE})")
    e.add_argument("out", help="adapter dir to write")
    e.add_argument("--model_name_or_path", default=None,
                   help="backbone to check the artifact against and record as the base model "
                        "(default: the artifact's backbone)")
    e.add_argument("--mpt_task", default=None, help="MPT source artifacts: the task to export")
    e.add_argument("--overwrite", action="store_true", help="write into a non-empty dir")
    e.add_argument("--cache_dir", default=".cache", help="where the 'demo' backbone is cached")
    e.add_argument("--allow_in_progress_artifacts", action="store_true",
                   help="export the best-so-far artifact of a run that has not finished")
    i = sub.add_parser("from-peft", help="PEFT adapter dir -> stage-1 artifact dir")
    i.add_argument("adapter", help=f"adapter dir ({PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE})")
    i.add_argument("out", help="artifact dir to write")
    i.add_argument("--model_name_or_path", default=None,
                   help="the adapter's backbone (default: its base_model_name_or_path)")
    i.add_argument("--task", default=None, help="task name to record (default: adapter dir name)")
    i.add_argument("--init_from", default=None,
                   help="take P_init from this artifact (the family the prompt joins)")
    i.add_argument("--prompt_init", default="vocab", choices=("vocab", "uniform"),
                   help="recompute P_init like training does (ignored with --init_from)")
    i.add_argument("--prompt_init_seed", type=int, default=0)
    i.add_argument("--prompt_init_vocab_range", type=int, default=5000)
    i.add_argument("--overwrite", action="store_true", help="write into a non-empty dir")
    i.add_argument("--cache_dir", default=".cache", help="where the 'demo' backbone is cached")
    i.add_argument("--allow_in_progress_artifacts", action="store_true",
                   help="--init_from may be the artifact of a run that has not finished")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user errors print one `error:` line and return 2."""
    from dtvg_ds.model import ModelLoadError

    args = _parser().parse_args(argv)
    try:
        if args.cmd == "to-peft":
            out = export_peft(args.artifact, args.out, args.model_name_or_path, args.mpt_task,
                              args.overwrite, args.cache_dir, args.allow_in_progress_artifacts)
            print(f"PEFT prompt-tuning adapter written to {out} (load it with "
                  "PeftModel.from_pretrained(backbone, dir))")
        else:
            out = import_peft(args.adapter, args.out, args.model_name_or_path, args.task,
                              args.init_from, args.prompt_init, args.prompt_init_seed,
                              args.prompt_init_vocab_range, args.overwrite, args.cache_dir,
                              args.allow_in_progress_artifacts)
            print(f"stage-1 prompt artifact written to {out}")
    except (ExportError, ArtifactError, ModelLoadError) as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
