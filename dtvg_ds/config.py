"""One typed source of truth for every hyperparameter.

`TrainConfig` is the only place a setting is declared. The CLI is generated from it (flag names
follow the HF Trainer and the published DTVG scripts), an optional YAML file (`--config`) sets
values, and CLI flags override the YAML. Values DeepSpeed also holds (micro batch, accumulation,
precision, optimizer, scheduler, clipping) are reconciled with the DeepSpeed JSON in
`resolve_ds_config`: `"auto"` is filled from the config, a concrete JSON value is adopted when the
flag was not given, and a flag that contradicts the JSON is an error naming both.

Validation collects *all* problems and names the flag to change (litgpt style), so a user fixes a
bad command line in one go.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ABLATIONS = ("none", "no_kc", "target_only", "all_sources", "fixed_group")
DEMO_MODEL = "demo"  # the embedded default: a tiny T5 the project pretrains and caches on CPU


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the flag or file to fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Field name == CLI flag (`--<name>`) == YAML key."""

    # --- what to run ---
    method: str = _f("pt", "training method: pt, spot, dtvg, mpt_source, mpt_target or attempt (the "
                     "registry: dtvg_ds.methods.REGISTRY)")
    task: str = _f("", "task name (see `python -m dtvg_ds.tasks`)")
    model_name_or_path: str = _f(DEMO_MODEL, "backbone: Hub id, local dir, or 'demo' (tiny local T5)")
    output_dir: str = _f("", "where checkpoints, logs and the prompt artifact go")
    deepspeed: str = _f("zero3", "DeepSpeed JSON config: a path, or a shipped one by name "
                        "(zero2, zero2_8bit, zero3, zero3_offload)")
    config: str = _f("", "optional YAML file of these settings; CLI flags override it")
    data_dir: str = _f("", "read the task from local json/jsonl/csv/parquet files in this dir")
    metric: str = _f("", "your own --data_dir task: accuracy (default), accuracy_f1, "
                         "accuracy_macro_f1, matthews, pearson_spearman, squad (F1/EM) or nlg "
                         "(BLEU/ROUGE/METEOR)")
    cache_dir: str = _f(".cache", "where the demo backbone and tokenised data are cached")
    overwrite_output_dir: bool = _f(False, "allow writing into a non-empty output_dir")
    resume: str = _f("", "'auto' (newest checkpoint in output_dir) or a checkpoint dir",
                     aliases=("--resume_from_checkpoint",))
    run_name: str = _f("", "a name for the run in W&B/TensorBoard and run.json (default: the "
                           "output dir's name)")
    ddp_timeout: int = _f(1800, "seconds a rank waits in a collective for its peers before the "
                                "job fails (a dead or hung rank)")
    disable_tqdm: bool = _f(False, "no progress bar (SLURM logs); the JSONL log is unchanged")
    log_level: str = _f("info", "debug|info|warning|error for dtvg_ds's messages on rank 0 (other "
                                "ranks: warnings and errors only)")
    log_on_each_node: bool = _f(False, "every rank logs at --log_level, tagged with its rank")
    seed: int = _f(42, "training seed (data order, dropout)")
    stop_at_step: int = _f(0, "checkpoint and stop at this step as if interrupted (0 = off); "
                              "for time-boxed jobs: resume later with --resume auto")
    debug: bool = _f(False, "show full tracebacks on errors")

    # --- data ---
    max_source_length: int = _f(256, "max input tokens (before the soft prompt)")
    max_target_length: int = _f(16, "max target tokens")
    max_train_samples: int = _f(0, "truncate the training set (0 = all)")
    max_eval_samples: int = _f(0, "truncate the validation set (0 = all)")
    do_test: bool = _f(False, "at the end, score the best (dev-selected) prompt on the test split "
                       "(<output_dir>/eval/<task>-test.json; test_* in metrics.jsonl)")
    max_test_samples: int = _f(0, "truncate the test set of --do_test (0 = all)")
    k_shot: int = _f(0, "few-shot: k training examples (label-balanced; 0 = all)")
    data_seed: int = _f(0, "seed of the dev/test split, the k-shot sample and subsampling")
    mixture_cap: int = _f(0, "multi-task --task a+b+c: at most this many examples per task")
    tokenized_cache: bool = _f(True, "cache tokenised splits under --cache_dir (rank 0 writes)")

    # --- the soft prompt ---
    num_virtual_tokens: int = _f(100, "soft prompt length r", aliases=("--prefix_length",))
    prompt_init: str = _f("vocab", "'vocab' (seeded rows of the embedding matrix) or 'uniform'")
    prompt_init_seed: int = _f(
        0, "seed of the shared prompt init; tasks sharing it share P_init (keep it fixed)"
    )
    prompt_init_vocab_range: int = _f(5000, "draw init rows from the first N vocabulary ids")

    # --- optimisation (also held by DeepSpeed; reconciled with the JSON) ---
    learning_rate: float = _f(0.3, "peak learning rate of the prompt")
    weight_decay: float = _f(1e-5, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 = off)")
    warmup_steps: int = _f(0, "warmup steps (overrides --warmup_ratio when > 0)")
    warmup_ratio: float = _f(0.0, "warmup as a fraction of --max_steps (used when "
                                  "--warmup_steps is 0)")
    lr_scheduler_type: str = _f("linear", "after warmup: linear (decay to 0), cosine, constant, "
                                          "or constant_with_warmup (transformers.get_scheduler)")
    max_steps: int = _f(1000, "optimizer steps to train")
    per_device_train_batch_size: int = _f(8, "micro batch per rank")
    per_device_eval_batch_size: int = _f(32, "eval batch per rank")
    gradient_accumulation_steps: int = _f(1, "micro batches per optimizer step")
    bf16: bool = _f(False, "bf16 backbone and prompt compute (fp32 master weights)")
    fp16: bool = _f(False, "not supported: T5 overflows in fp16; use --bf16")

    # --- quantized backbone (bitsandbytes; see dtvg_ds/quant.py for the supported combinations) ---
    load_in_8bit: bool = _f(False, "LLM.int8 backbone; ZeRO-0/1/2 only (ds_configs/zero2_8bit.json)")
    load_in_4bit: bool = _f(False, "4-bit (NF4/FP4) backbone; any ZeRO stage (ds_configs/zero3.json)")
    llm_int8_threshold: float = _f(6.0, "8-bit: outlier threshold of LLM.int8 (0 = no outliers)")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit: nf4 or fp4")
    bnb_4bit_compute_dtype: str = _f("auto", "4-bit: float32|bfloat16 (auto = the model dtype)")
    bnb_4bit_quant_storage: str = _f(
        "auto", "4-bit: storage dtype uint8|float32|bfloat16 (auto = the model dtype; ZeRO-3 "
                "needs the model dtype)")
    bnb_4bit_use_double_quant: bool = _f(False, "4-bit: quantize the quantization constants too")

    # --- evaluation, logging, checkpoints ---
    eval_steps: int = _f(100, "evaluate by generation every N steps (0 = only at the end)")
    metric_for_best_model: str = _f("", "the evaluation number that picks the best prompt, e.g. "
                                        "accuracy, f1, average (default: the task's primary "
                                        "metric, as the papers select)")
    greater_is_better: bool = _f(True, "with --metric_for_best_model: larger is better")
    eval_on_start: bool = _f(False, "also evaluate before the first step (logged as step 0, never "
                                    "chosen as the best prompt; DTVG: the step-0 merge)")
    save_steps: int = _f(100, "checkpoint every N steps (0 = only at the end)")
    logging_steps: int = _f(10, "log the training loss every N steps")
    save_total_limit: int = _f(2, "keep the last K checkpoints")
    generation_max_length: int = _f(16, "max new tokens when evaluating by generation")
    eval_gather_backbone: str = _f(
        "auto", "gather the ZeRO-3 backbone once per evaluation: auto|always|never"
    )
    trace_memory: bool = _f(False, "write each rank's peak memory per phase (load, forward, "
                                   "backward, step, evaluation, checkpoint) to "
                                   "output_dir/memory.rank<R>.jsonl")
    gradient_checkpointing: bool = _f(False, "recompute each backbone block in backward instead "
                                             "of keeping its activations (less memory, ~1/3 "
                                             "more compute)")
    report_to: str = _f("tensorboard", "extra loggers, comma-separated: tensorboard, wandb, or none "
                                       "(JSONL is always on; wandb reads WANDB_PROJECT/WANDB_MODE)")

    # --- stage 2 (DTVG) and SPoT ---
    target_tpv: str = _f("", "DTVG/SPoT: the target task's stage-1 prompt artifact dir")
    source_tpvs: list[str] = _f([], "DTVG/SPoT: source tasks' stage-1 prompt artifact dirs")
    target_task_scale_learning_rate: float = _f(0.3, "DTVG: learning rate of a_t")
    source_task_scale_learning_rate: float = _f(0.3, "DTVG: learning rate of the a_s")
    regroup_every: int = _f(1, "DTVG: recompute the group every N optimizer steps")
    group_lambda: float = _f(0.0, "DTVG: 0 = released-code rule; >0 = paper's TS + lambda*KC")
    ts_threshold: float = _f(0.0, "DTVG: keep sources with target similarity >= this")
    ablation: str = _f("none", f"DTVG ablation: one of {', '.join(ABLATIONS)}")
    source_scale_init: float = _f(
        1.0, "DTVG extension: initial value of every a_s (released code: 1). With a_t at 1, "
             "1/(n+1) for n sources makes a group of k add k/(n+1) source vectors instead of k")
    merge_norm: str = _f(
        "none", "DTVG extension: none (released rule) or target (rescale P_mix - P_init to the "
                "norm of a_t * T_t, keeping the merge's direction)")
    fingerprint_every: int = _f(50, "DTVG: check prompt replicas agree across ranks every N steps")
    allow_in_progress_artifacts: bool = _f(
        False, "stage 2 / MPT: accept --target_tpv/--source_tpvs/--mpt_source artifacts of runs "
               "that have not finished (their best so far), with a warning")
    spot_per_token: bool = _f(False, "SPoT: per-token cosine instead of average-token cosine")

    # --- MPT ---
    mpt_source: str = _f("", "mpt_target: the MPT source artifact dir (P*, u, v)")
    mpt_lambda: float = _f(1.0, "mpt_source: weight of the distillation losses")
    mpt_temperature: float = _f(1.0, "mpt_source: softmax temperature of L_logits")
    mpt_hidden: str = _f("decoder", "mpt_source: hidden states for L_hidden: decoder|encoder")
    mpt_kappa: int = _f(0, "mpt_source: max tasks per batch (0 = all sources)")
    mpt_uv_init: str = _f("mean", "mpt_target: init u, v from the source factors' mean, or ones")

    # --- ATTEMPT (sources: --source_tpvs; see docs/algorithms.md) ---
    attempt_temperature: float = _f(
        2087.0, "attempt: temperature T of the attention scores p.h/T (released configs: 2087, "
                "about 768*e for T5-base); 0 = d*e of this backbone")
    attempt_pool: str = _f(
        "released", "attempt: max-pool of the input embeddings: released (the pad embedding joins "
                    "the max of inputs shorter than --max_source_length, as the released code's "
                    "padding to that length gives) or masked (real tokens only)")
    attempt_target_init: str = _f(
        "first_source", "attempt: start of the target prompt(s): first_source (released code: the "
                        "first --source_tpvs prompt), p_init, or target_tpv (--target_tpv's prompt)")
    attempt_attn_learning_rate: float = _f(
        0.0, "attempt: learning rate of W_down/W_up; 0 = --learning_rate, which is what the released "
             "code runs (its configured 0.1 never applies: docs/algorithms.md)")
    attempt_hidden: int = _f(100, "attempt: width m of the attention bottleneck d->m->d (released: 100)")

    # --- derived at run time, not flags ---
    explicit: frozenset[str] = field(default=frozenset(), metadata={"cli": False})

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (for logs and checkpoints)."""
        d = dataclasses.asdict(self)
        d.pop("explicit")
        return d


SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
EXIT_CODES = ("exit codes: 0 = done (prompt artifact and adapter written); 2 = user error (bad "
              "flag, file, artifact or output dir; one 'error:' line each, nothing written); 3 = "
              "stopped by SIGTERM/SIGUSR1 after writing a checkpoint (continue with --resume "
              "auto); anything else = a crash (traceback; --debug for every rank's)")


def warmup_steps(cfg: TrainConfig) -> int:
    """Warmup steps in effect: --warmup_steps if > 0, else ceil(--warmup_ratio x --max_steps)
    (HF Trainer's rule)."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * cfg.max_steps)


def _cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]


def _str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _base_type(tp: Any) -> Any:
    """`list[str]` -> (list, str); `int` -> (None, int)."""
    origin = typing.get_origin(tp)
    if origin is list:
        return list, typing.get_args(tp)[0]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None, args[0]
    return None, tp


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # exit 2 with one clear line, no usage dump
        raise ConfigError([f"{message} (see --help)"])


def build_parser() -> argparse.ArgumentParser:
    """The CLI, generated from `TrainConfig`. Defaults are suppressed to know what was given."""
    p = _Parser(prog="dtvg_ds.train", description=__doc__.split("\n\n")[0],
                argument_default=argparse.SUPPRESS, allow_abbrev=False, epilog=EXIT_CODES)
    hints = typing.get_type_hints(TrainConfig)
    for f in _cli_fields():
        container, tp = _base_type(hints[f.name])
        names = [f"--{f.name}", *f.metadata.get("aliases", ())]
        default = f.default if f.default is not dataclasses.MISSING else "[]"
        helptext = f"{f.metadata['help']} (default: {default})"
        if tp is bool:
            p.add_argument(*names, dest=f.name, nargs="?", const=True, type=_str2bool, help=helptext)
            p.add_argument(f"--no_{f.name}", dest=f.name, action="store_false",
                           help=argparse.SUPPRESS)  # HF-style negation: --no_tokenized_cache
        elif container is list:
            p.add_argument(*names, dest=f.name, nargs="+", type=tp, help=helptext)
        else:
            p.add_argument(*names, dest=f.name, type=tp, help=helptext)
    # Launchers (deepspeed) append --local_rank; accept and ignore it: LOCAL_RANK is read from env.
    p.add_argument("--local_rank", "--local-rank", dest="_local_rank", type=int, help=argparse.SUPPRESS)
    return p


def yaml_mapping(p: Path, label: str, error: type[Exception] | None = None) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; `error` (ConfigError by default; it takes a
    list of problems) names `label` (how the user gave the file) and the fix."""
    import yaml

    err = error or ConfigError
    if not p.is_file():
        raise err([f"{label}: no such file; pass an existing YAML file"])
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise err([f"{label}: not valid YAML ({' '.join(str(e).split())}); fix the file"]
                  ) from None
    if not isinstance(data, dict):
        raise err([f"{label}: expected a mapping of setting: value"])
    return data


def _read_yaml(path: str) -> dict[str, Any]:
    data = yaml_mapping(Path(path), f"--config {path}")
    known = {f.name for f in _cli_fields()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError([f"--config {path}: unknown setting(s) {unknown}; see --help for names"])
    return data


def parse_config(argv: list[str] | None = None,
                 checks: Sequence[Callable[[TrainConfig], list[str]]] = ()) -> TrainConfig:
    """defaults <- YAML (--config) <- CLI flags; then validate, with `checks` run beside the
    config's own (the entry points pass `dtvg_ds.methods.validate`: the config knows no method).
    Every problem is reported at once. Raises ConfigError."""
    ns = vars(build_parser().parse_args(argv))
    ns.pop("_local_rank", None)
    values: dict[str, Any] = {}
    if ns.get("config"):
        values.update(_read_yaml(ns["config"]))
    values.update(ns)
    explicit = frozenset(values)
    try:
        cfg = TrainConfig(**values, explicit=explicit)
    except TypeError as e:
        raise ConfigError([str(e)]) from None
    problems = validate(cfg) + [p for check in checks for p in check(cfg)]
    if problems:
        raise ConfigError(problems)
    return cfg


def report_sinks(report_to: str) -> list[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb']; 'none' -> []."""
    return [s.strip() for s in report_to.split(",") if s.strip() and s.strip() != "none"]


def validate(cfg: TrainConfig) -> list[str]:
    """Every problem with the settings, each naming the flag to change."""
    probs: list[str] = []
    if not cfg.task:
        probs.append("--task is required (list tasks with `python -m dtvg_ds.tasks`)")
    if not cfg.output_dir:
        probs.append("--output_dir is required")
    for name in ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "num_virtual_tokens", "max_source_length",
                 "max_target_length", "generation_max_length", "regroup_every",
                 "prompt_init_vocab_range", "save_total_limit"):
        if getattr(cfg, name) < 1:
            probs.append(f"--{name} must be >= 1 (got {getattr(cfg, name)})")
    for name in ("k_shot", "data_seed", "mixture_cap", "stop_at_step", "eval_steps", "save_steps",
                 "logging_steps", "warmup_steps", "max_train_samples", "max_eval_samples",
                 "max_test_samples", "fingerprint_every"):
        if getattr(cfg, name) < 0:
            probs.append(f"--{name} must be >= 0 (got {getattr(cfg, name)})")
    if cfg.learning_rate <= 0:
        probs.append(f"--learning_rate must be > 0 (got {cfg.learning_rate})")
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        probs.append(f"--log_level {cfg.log_level!r}: choose debug, info, warning or error")
    if cfg.lr_scheduler_type not in SCHEDULERS:
        probs.append(f"--lr_scheduler_type {cfg.lr_scheduler_type!r}: choose one of "
                     f"{', '.join(SCHEDULERS)}")
    if not 0 <= cfg.warmup_ratio < 1:
        probs.append(f"--warmup_ratio must be in [0, 1) (got {cfg.warmup_ratio})")
    if cfg.ddp_timeout < 1:
        probs.append(f"--ddp_timeout must be >= 1 second (got {cfg.ddp_timeout})")
    if cfg.warmup_steps > cfg.max_steps:
        probs.append(f"--warmup_steps ({cfg.warmup_steps}) exceeds --max_steps ({cfg.max_steps})")
    if cfg.prompt_init not in ("vocab", "uniform"):
        probs.append(f"--prompt_init {cfg.prompt_init!r}: choose 'vocab' or 'uniform'")
    if cfg.fp16:
        probs.append("--fp16: T5 overflows in fp16 (NaN losses); use --bf16 or fp32")
    if cfg.eval_gather_backbone not in ("auto", "always", "never"):
        probs.append("--eval_gather_backbone: choose auto, always or never")
    sinks = report_sinks(cfg.report_to)
    if not set(sinks) <= {"tensorboard", "wandb"} or ("none" in cfg.report_to and sinks):
        probs.append(f"--report_to {cfg.report_to!r}: give tensorboard, wandb, both "
                     "comma-separated, or none")
    elif "wandb" in sinks:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            probs.append("--report_to wandb needs the wandb package: pip install 'dtvg_ds[wandb]' "
                         "(or drop wandb from --report_to)")
    if cfg.resume and cfg.overwrite_output_dir:
        probs.append("--resume and --overwrite_output_dir contradict each other; pass one")
    if cfg.ablation not in ABLATIONS:
        probs.append(f"--ablation {cfg.ablation!r}: choose one of {', '.join(ABLATIONS)}")
    if cfg.merge_norm not in ("none", "target"):
        probs.append(f"--merge_norm {cfg.merge_norm!r}: choose none or target")
    if not (math.isfinite(cfg.source_scale_init) and cfg.source_scale_init > 0):
        probs.append(f"--source_scale_init must be a finite number > 0 (got {cfg.source_scale_init})")
    if cfg.mpt_hidden not in ("decoder", "encoder"):
        probs.append("--mpt_hidden: choose decoder or encoder")
    if cfg.mpt_uv_init not in ("mean", "ones"):
        probs.append("--mpt_uv_init: choose mean or ones")
    if cfg.mpt_temperature <= 0:
        probs.append("--mpt_temperature must be > 0")
    if not (math.isfinite(cfg.attempt_temperature) and cfg.attempt_temperature >= 0):
        probs.append(f"--attempt_temperature must be > 0, or 0 for d*e (got {cfg.attempt_temperature})")
    if cfg.attempt_pool not in ("released", "masked"):
        probs.append(f"--attempt_pool {cfg.attempt_pool!r}: choose released or masked")
    if cfg.attempt_target_init not in ("first_source", "p_init", "target_tpv"):
        probs.append(f"--attempt_target_init {cfg.attempt_target_init!r}: choose first_source, "
                     "p_init or target_tpv")
    if not (math.isfinite(cfg.attempt_attn_learning_rate) and cfg.attempt_attn_learning_rate >= 0):
        probs.append("--attempt_attn_learning_rate must be >= 0 (0 = --learning_rate; got "
                     f"{cfg.attempt_attn_learning_rate})")
    if cfg.attempt_hidden < 1:
        probs.append(f"--attempt_hidden must be >= 1 (got {cfg.attempt_hidden})")
    from dtvg_ds import quant  # late: quant imports torch; parsing flags should not

    probs += quant.validate_flags(cfg)
    return probs


# ----------------------------------------------------------------------------------------------
# DeepSpeed JSON reconciliation
# ----------------------------------------------------------------------------------------------

# The configs the package ships (package data; in a checkout a link to the top-level ds_configs/).
SHIPPED_DS_CONFIGS = Path(__file__).resolve().parent / "ds_configs"


def ds_config_path(name_or_path: str) -> Path:
    """`--deepspeed` as given, or a shipped config by name: `zero3` -> ds_configs/zero3.json."""
    p = Path(name_or_path)
    if p.is_file() or p.suffix or "/" in name_or_path:
        return p
    shipped = SHIPPED_DS_CONFIGS / f"{name_or_path}.json"
    return shipped if shipped.is_file() else p


def read_ds_config(path: str) -> dict[str, Any]:
    """Load a DeepSpeed JSON file (or a shipped one by name) with a clear error for a missing or
    malformed file."""
    p = ds_config_path(path)
    if not p.is_file():
        names = ", ".join(sorted(q.stem for q in SHIPPED_DS_CONFIGS.glob("*.json")))
        raise ConfigError([f"--deepspeed {path}: no such file; pass a JSON path or a shipped "
                           f"config by name ({names})"])
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError([f"--deepspeed {path}: malformed JSON at line {e.lineno}: {e.msg}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"--deepspeed {path}: expected a JSON object"])
    return data


class _Reconciler:
    """Fills "auto", adopts concrete JSON values for flags not given, flags real conflicts.

    Works on its own copy of the config, so a value adopted early (the micro batch) feeds the
    later checks (train_batch_size); the caller's config is never changed: the adopted values
    are returned and applied by the caller."""

    def __init__(self, cfg: TrainConfig, ds: dict[str, Any], path: str):
        self.cfg, self.ds, self.path = cfg, ds, path
        self.problems: list[str] = []
        self.adopted: dict[str, Any] = {}

    def link(self, keys: tuple[str, ...], flag: str, cast: type = float) -> None:
        node = self.ds
        for k in keys[:-1]:
            node = node.get(k)
            if not isinstance(node, dict):
                return
        leaf = keys[-1]
        if leaf not in node:
            return
        mine = getattr(self.cfg, flag)
        theirs = node[leaf]
        if theirs == "auto":
            node[leaf] = mine
        elif flag in self.cfg.explicit and cast(theirs) != cast(mine):
            self.problems.append(
                f"{self.path}: {'.'.join(keys)} = {theirs!r} contradicts --{flag} {mine!r}; "
                f"set the JSON value to \"auto\" or drop the flag")
        elif cast(theirs) != cast(mine):
            value = cast(theirs) if cast is not bool else bool(theirs)
            self.cfg = dataclasses.replace(self.cfg, **{flag: value})
            self.adopted[flag] = value


def resolve_ds_config(cfg: TrainConfig, ds_in: dict[str, Any], world_size: int,
                      path: str = "ds config") -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (resolved DeepSpeed dict, {flag: value adopted from the JSON}); `cfg` is not
    changed (apply the adopted values with `dataclasses.replace`).

    A value of the wrong type (`"optimizer": "adam"`, `"train_batch_size": "x"`) is a
    ConfigError naming the file, like every other problem of the JSON.
    """
    try:
        ds, adopted = _resolve_ds_config(cfg, ds_in, world_size, path)
        if zero_stage(ds) not in (0, 1, 2, 3):
            raise ConfigError([f"{path}: zero_optimization.stage = {zero_stage(ds)}; use 0-3"])
        _check_zero_section(ds, path)
        from dtvg_ds import quant

        problems = quant.check_zero_combination(cfg, zero_stage(ds), path)
        if problems:
            raise ConfigError(problems)
        return ds, adopted
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise ConfigError([f"{path}: a value has the wrong type or shape ({type(e).__name__}: "
                           f"{e}); fix the JSON (compare ds_configs/zero3.json)"]) from None


def _check_zero_section(ds: dict[str, Any], path: str) -> None:
    """Validate `zero_optimization` with DeepSpeed's own schema now, so a misspelt key is a
    one-line error before any process group starts, not a traceback from deepspeed.initialize."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    zero = {k: (0 if v == "auto" else v) for k, v in ds.get("zero_optimization", {}).items()}
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        raise ConfigError([f"{path}: zero_optimization.{'.'.join(map(str, err['loc']))}: "
                           f"{err['msg']} (see the DeepSpeed ZeRO config docs)"
                           for err in e.errors()]) from None


def _resolve_ds_config(cfg: TrainConfig, ds_in: dict[str, Any], world_size: int,
                       path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The body of `resolve_ds_config`.

    Reads the config through the reconciler (`r.cfg`), which carries the values adopted so far.
    """
    ds = copy.deepcopy(ds_in)
    r = _Reconciler(cfg, ds, path)
    r.link(("train_micro_batch_size_per_gpu",), "per_device_train_batch_size", int)
    r.link(("gradient_accumulation_steps",), "gradient_accumulation_steps", int)
    r.link(("gradient_clipping",), "max_grad_norm", float)
    r.link(("bf16", "enabled"), "bf16", bool)
    if ds.get("fp16", {}).get("enabled") in (True, "auto"):
        if ds["fp16"]["enabled"] is True:
            r.problems.append(f"{path}: fp16.enabled = true; T5 overflows in fp16, use bf16")
        ds["fp16"]["enabled"] = False
    opt = ds.get("optimizer")
    if opt is not None:
        if opt.get("type", "").lower() not in ("adamw", "adam"):
            r.problems.append(f"{path}: optimizer.type {opt.get('type')!r}: use AdamW")
        params = opt.setdefault("params", {})
        r.link(("optimizer", "params", "lr"), "learning_rate", float)
        r.link(("optimizer", "params", "weight_decay"), "weight_decay", float)
        r.link(("optimizer", "params", "eps"), "adam_epsilon", float)
        if params.get("betas") == "auto":
            params["betas"] = [r.cfg.adam_beta1, r.cfg.adam_beta2]
    sch = ds.get("scheduler")
    if sch is not None:
        if sch.get("type") != "WarmupDecayLR":
            r.problems.append(f"{path}: scheduler.type {sch.get('type')!r}: only WarmupDecayLR "
                              "(or no scheduler block: dtvg_ds then uses warmup + linear decay)")
        if r.cfg.lr_scheduler_type != "linear":
            r.problems.append(f"{path}: the scheduler block (WarmupDecayLR) decays linearly, "
                              f"--lr_scheduler_type is {r.cfg.lr_scheduler_type!r}; drop the block "
                              "(dtvg_ds then schedules with transformers.get_scheduler)")
        sp = sch.setdefault("params", {})
        auto_warmup = sp.get("warmup_num_steps") == "auto"
        r.link(("scheduler", "params", "warmup_num_steps"), "warmup_steps", int)
        r.link(("scheduler", "params", "total_num_steps"), "max_steps", int)
        if auto_warmup:
            sp["warmup_num_steps"] = warmup_steps(r.cfg)
        # DeepSpeed's default warmup_type is "log"; HF Trainer's (and ours without the block)
        # is linear: make both paths give the same curve unless the JSON asks otherwise.
        sp.setdefault("warmup_type", "linear")
        if sp.get("warmup_min_lr") == "auto":
            sp["warmup_min_lr"] = 0.0
        # warmup_max_lr is per param group (DTVG has three): filled by the engine.
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage == 3 and zero.get("stage3_param_persistence_threshold", "auto") != "auto":
        pass  # checked against the prompt size by the engine, which knows r x d
    tbs = ds.get("train_batch_size", "auto")
    want = r.cfg.per_device_train_batch_size * r.cfg.gradient_accumulation_steps * world_size
    if tbs == "auto" or "train_batch_size" not in ds:
        ds["train_batch_size"] = want
    elif int(tbs) % world_size:
        r.problems.append(
            f"{path}: train_batch_size = {tbs} does not divide by the world size {world_size}; "
            f"set it to \"auto\" (= --per_device_train_batch_size x "
            f"--gradient_accumulation_steps x ranks) or a multiple of {world_size}")
    elif int(tbs) != want:
        r.problems.append(
            f"{path}: train_batch_size = {tbs} but --per_device_train_batch_size "
            f"{r.cfg.per_device_train_batch_size} x --gradient_accumulation_steps "
            f"{r.cfg.gradient_accumulation_steps} x world size {world_size} = {want}; set it to \"auto\"")
    leftovers = _find_auto(ds)
    if leftovers and not r.problems:
        known_later = {"scheduler.params.warmup_max_lr",
                       "zero_optimization.stage3_param_persistence_threshold"}
        bad = [k for k in leftovers if k not in known_later]
        if bad:
            r.problems.append(f"{path}: dtvg_ds cannot fill \"auto\" for {bad}; give values")
    if r.problems:
        raise ConfigError(r.problems)
    return ds, r.adopted


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        out: list[str] = []
        for k, v in node.items():
            out += _find_auto(v, f"{prefix}{k}.")
        return out
    return [prefix[:-1]] if node == "auto" else []


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed dict (0 when absent)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))
