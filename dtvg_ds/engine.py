"""The one training loop: deepspeed.initialize, train, evaluate, checkpoint, export.

Reads top to bottom like the method: load the frozen backbone (partitioned at load under
ZeRO-3), build the shared prompt init, let the method build its trainable prompt, then for each
step: the method prepares the step (DTVG regroups), forward with the prompt prepended, backward,
optimizer step; every `eval_steps` evaluate by generation and keep the best prompt; every
`save_steps` checkpoint. Finally the best prompt is exported as a prompt artifact.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtvg_ds import artifacts, checkpoint, dist, hub, memtrace, quant, rundir
from dtvg_ds.backbone import check_artifact, fingerprint, read_config, resolve_on_all_ranks
from dtvg_ds.backbone import resolve as resolve_backbone
from dtvg_ds.config import (
    DEMO_MODEL,
    ConfigError,
    TrainConfig,
    read_ds_config,
    report_sinks,
    resolve_ds_config,
    warmup_steps,
)
from dtvg_ds.config import zero_stage as get_zero_stage
from dtvg_ds.data import batches
from dtvg_ds.data.mixtures import MIX_SEPARATOR, MixtureTask, is_mixture
from dtvg_ds.data.zoo import Task, get_task
from dtvg_ds.errors import Preempted, TrainingError
from dtvg_ds.evaluation import evaluate, metric_name
from dtvg_ds.logs import RunLogger, configure_logging, info, progress
from dtvg_ds.methods import build_method, load_inputs
from dtvg_ds.methods import validate as validate_method
from dtvg_ds.methods.base import PromptMethod
from dtvg_ds.model import (
    PromptedSeq2Seq,
    count_parameters,
    init_prompt,
    load_backbone,
)


@dataclass
class Best:
    """The best validation result so far and the prompt that reached it."""

    score: float = -math.inf
    step: int = -1
    metrics: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    method_meta: dict[str, Any] = field(default_factory=dict)  # e.g. DTVG's group at that step


# ----------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------

class StartupClock:
    """Seconds from the process's start to each set-up phase and to the first optimizer step
    (logged once as `startup_*` in metrics.jsonl: where a launch spends its time)."""

    def __init__(self) -> None:
        import psutil

        self.t0 = psutil.Process().create_time()  # the interpreter's start, not our import
        self.last = self.t0
        self.phases: dict[str, float] = {}
        self.mark("interpreter_and_imports")

    def mark(self, phase: str) -> None:
        """Close `phase` now."""
        now = time.time()
        self.phases[phase] = round(now - self.last, 3)
        self.last = now

    def record(self) -> dict[str, float]:
        """The phases and the total, as flat scalars for the run log."""
        self.mark("first_step")
        return {"startup_s_to_first_step": round(self.last - self.t0, 3),
                **{f"startup_{k}_s": v for k, v in self.phases.items()}}


class _StopSignal:
    """Remembers that SIGTERM (preemption, scancel, SLURM --signal) or SIGUSR1 arrived.

    The handler only sets a flag; the loop checks it after each optimizer step on all ranks
    together (`dist.any_rank`), so every rank takes part in the final checkpoint even if only
    one of them received the signal (DeepSpeed's launcher terminates its children one by one).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        # Repeated signals are expected and must not kill the rank mid-checkpoint: the
        # scheduler signals every process and DeepSpeed's launcher then terminates its children
        # again. A rank stuck in a collective with a dead peer is ended by the launcher's SIGKILL
        # (30 s later) or the collective timeout.
        self.signum = signum


def seed_everything(seed: int) -> None:
    """Seed Python and torch RNGs (same seed on every rank: dropout masks differ by data only)."""
    random.seed(seed)
    torch.manual_seed(seed)


def check_output_dir(cfg: TrainConfig) -> None:
    """Never write into a non-empty output dir unless --overwrite_output_dir or --resume."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError([f"--output_dir {out}: exists and is not a directory"])
    busy = out.is_dir() and any(out.iterdir())
    dist.barrier()  # every rank has looked before rank 0 creates anything
    if busy and not (cfg.overwrite_output_dir or cfg.resume):
        raise ConfigError([f"--output_dir {out} is not empty; pass --resume auto to continue "
                           "that run, --overwrite_output_dir to reuse it, or a new directory"])
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()


def read_sources(cfg: TrainConfig, task: Any, inputs: Any) -> tuple[str, dict[str, list[dict]]]:
    """(the backbone's local dir, {split: records}): everything a run reads from the Hub or from
    --data_dir (the test split too with --do_test, so a missing one fails now, not after
    training). Run through `dist.local_first`: ranks other than a node's first read only the
    node's cache (never the Hub) for the backbone."""
    name, path = cfg.model_name_or_path, ""
    if name != DEMO_MODEL:  # the demo backbone is built later, once, and checked after loading
        path = resolve_backbone(name, cache_only=dist.local_rank() != 0)
        fp = fingerprint(read_config(path, name))
        for art in inputs.artifacts():  # stage-1 artifacts of this very backbone
            check_artifact(art, fp, name)
    recs = {"train": task.load("train", cfg.data_dir, cfg.max_train_samples, cfg.data_seed,
                               k_shot=cfg.k_shot),
            "validation": task.load("validation", cfg.data_dir, cfg.max_eval_samples,
                                    cfg.data_seed)}
    if cfg.do_test:
        recs["test"] = task.load("test", cfg.data_dir, cfg.max_test_samples, cfg.data_seed)
    return path, recs


def resolve_model_path(cfg: TrainConfig, fetched: str) -> str:
    """'demo' -> the locally pretrained tiny T5 (built once by rank 0, cached); else `fetched`
    (the local dir `read_sources` found). All ranks call this."""
    if cfg.model_name_or_path != DEMO_MODEL:
        return fetched
    return resolve_on_all_ranks(DEMO_MODEL, cfg.cache_dir, log=info)  # rank 0 builds it


def set_prompt_persistence(ds: dict[str, Any], groups: list[dict[str, Any]]) -> int:
    """Make ZeRO-3 keep every trainable prompt tensor whole on every rank.

    A parameter is "persistent" (never partitioned away) iff its numel is at most
    `stage3_param_persistence_threshold`. 'auto' becomes the largest trainable tensor, so the
    prompt stays whole while every backbone matrix larger than the prompt stays partitioned.
    A concrete value too small for the prompt is an error.
    """
    zero = ds.setdefault("zero_optimization", {})
    need = max(p.numel() for g in groups for p in g["params"])
    total = sum(p.numel() for g in groups for p in g["params"])
    have = zero.get("stage3_param_persistence_threshold", "auto")
    if have == "auto":
        zero["stage3_param_persistence_threshold"] = need
    elif int(have) < need:
        raise ConfigError([f"zero_optimization.stage3_param_persistence_threshold = {have} is below "
                           f"the prompt's {need} elements, so ZeRO-3 would partition the prompt; "
                           "set it to \"auto\" or >= that"])
    model_cap = zero.get("stage3_model_persistence_threshold", "auto")
    if model_cap == "auto":
        zero.pop("stage3_model_persistence_threshold", None)
    elif int(model_cap) < total:
        raise ConfigError([f"zero_optimization.stage3_model_persistence_threshold = {model_cap} "
                           f"is below the {total} trainable prompt elements; set it to \"auto\""])
    return int(zero["stage3_param_persistence_threshold"])


def configure_schedule(ds: dict[str, Any], groups: list[dict[str, Any]], cfg: TrainConfig):
    """The LR scheduler factory for `deepspeed.initialize` (None: DeepSpeed builds the JSON's).

    Without a scheduler block: `transformers.get_scheduler(--lr_scheduler_type)` with the warmup
    in effect, HF Trainer's curves. A linear WarmupDecayLR block from 0 (what the filled config
    holds unless the JSON says otherwise) is the same schedule, but DeepSpeed's implementation
    runs one step behind HF's (lr 0 for the first two steps); it is therefore replaced by
    `get_scheduler("linear")` with the block's steps, so both paths give one curve. Any other
    block (log warmup, a warmup_min_lr) is DeepSpeed's to run, per-group peaks filled in."""
    from transformers import get_scheduler

    sch = ds.get("scheduler")
    if sch is None:
        # LambdaLR scales each parameter group's own peak rate (DTVG has three).
        return lambda opt: get_scheduler(cfg.lr_scheduler_type, opt,
                                         num_warmup_steps=warmup_steps(cfg),
                                         num_training_steps=cfg.max_steps)
    params = sch.setdefault("params", {})
    if (params.get("warmup_type") == "linear" and float(params.get("warmup_min_lr", 0)) == 0
            and params.get("warmup_max_lr", "auto") == "auto"):  # per-group peaks, as ours
        ds.pop("scheduler")
        warm, total = int(params["warmup_num_steps"]), int(params["total_num_steps"])
        return lambda opt: get_scheduler("linear", opt, num_warmup_steps=warm,
                                         num_training_steps=total)
    if params.get("warmup_max_lr", "auto") == "auto":
        params["warmup_max_lr"] = [g["lr"] for g in groups]
    info(f"scheduler: DeepSpeed's WarmupDecayLR as configured ({params.get('warmup_type')} "
         "warmup); its curve is not HF Trainer's")
    return None


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run holds once set up."""

    cfg: TrainConfig
    ds: dict[str, Any]
    task: Task
    tokenizer: Any
    train: batches.Encoded
    train_tasks: list[str]
    valid: batches.Encoded
    valid_tasks: list[str]
    model: PromptedSeq2Seq
    method: PromptMethod
    engine: Any
    zero_stage: int
    model_path: str
    meta: dict[str, Any]
    backbone_checksum: str  # this rank's frozen backbone bytes after set-up (see check_frozen)
    clock: StartupClock | None  # None once the first step has logged it
    mem: memtrace.MemoryTrace  # per-phase peak memory (--trace_memory), else a no-op
    run_id: str  # this run's identity (run.json), recorded in every checkpoint
    replaced: Path | None  # where a replaced previous run waits until our first step
    test: tuple[batches.Encoded, list[dict], list[str]] | None  # --do_test: encoded, records, tasks


def setup(cfg: TrainConfig) -> Run:
    """Process group, data, backbone, method and DeepSpeed engine (all ranks)."""
    import deepspeed
    from transformers import AutoTokenizer

    clock = StartupClock()
    # Everything that can be checked without peers is checked first: a bad flag, file or
    # artifact fails in a second, before any process group, compilation or write.
    problems = validate_method(cfg)  # parse_config ran it for the CLI; bench/tests may not
    if problems:
        raise ConfigError(problems)
    ds, ds_adopted = resolve_ds_config(cfg, read_ds_config(cfg.deepspeed),
                                       dist.expected_world_size(), cfg.deepspeed)
    inputs = load_inputs(cfg)  # stage-1 artifacts: validated before anything is written
    # Values not given as flags, taken from the DeepSpeed JSON and the stage-1 artifact; from
    # here on the config is final (frozen) and every module reads the same values.
    adopted = [(k, v, cfg.deepspeed) for k, v in ds_adopted.items()] + \
        [(k, v, inputs.adopted_from) for k, v in inputs.adopted.items()]
    cfg = dataclasses.replace(cfg, **{k: v for k, v, _ in adopted})
    task = (MixtureTask(cfg.task.split(MIX_SEPARATOR), cfg.data_dir, cfg.mixture_cap)
            if is_mixture(cfg.task) else get_task(cfg.task, cfg.data_dir, cfg.metric))
    def reads() -> tuple[str, dict[str, list[dict]]]:
        return read_sources(cfg, task, inputs)

    # Local files only (a local backbone dir or 'demo', --data_dir or demo tasks): read them
    # now, so a missing file, empty data or k_shot > data fails before any process group.
    hub_reads = hub.is_hub_id(cfg.model_name_or_path) or task.reads_hub(cfg.data_dir)
    early = None if hub_reads else reads()
    clock.mark("checks_and_data_read")
    dist.init(cfg.ddp_timeout / 60)
    configure_logging(cfg.log_level, cfg.log_on_each_node)  # now that ranks are known
    clock.mark("process_group")
    # From the Hub: each node's local rank 0 reads first (one download per node into its HF
    # cache), then the node's other ranks read that cache; any failure stops every rank here,
    # before anything is written.
    fetched, recs = early or dist.local_first(reads)
    if hub_reads:
        clock.mark("hub_read")
    for k, v, source in adopted:
        info(f"--{k} = {v!r} taken from {source}")
    check_output_dir(cfg)
    run_id, replaced = rundir.prepare(cfg)  # run identity; an overwritten run moved aside
    if replaced is not None:
        info(f"the previous run in {cfg.output_dir} was moved to {replaced}; it is deleted once "
             "this run has taken its first step")
    mem = memtrace.MemoryTrace(
        Path(cfg.output_dir) / f"memory.rank{dist.rank()}.jsonl" if cfg.trace_memory else None,
        dist.rank(), dist.device().type, fresh=not cfg.resume)
    seed_everything(cfg.seed)
    model_path = resolve_model_path(cfg, fetched)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cache = Path(cfg.cache_dir) / "tokenized" if cfg.tokenized_cache else None
    enc = {split: batches.encode_cached(r, tokenizer, cfg.max_source_length,
                                        cfg.max_target_length, cache, key=f"{task.name}-{split}")
           for split, r in recs.items()}
    clock.mark("tokenize")
    ex_tasks = {split: [x.get("task", task.name) for x in r] for split, r in recs.items()}
    stage = get_zero_stage(ds)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    keep_alive = None
    if stage == 3 and not quant.is_quantized(cfg):
        from transformers.integrations import HfDeepSpeedConfig

        # Must exist *before* from_pretrained so that loading runs under zero.Init and each
        # rank only ever holds its 1/N partition of the backbone. transformers never loads a
        # quantized model under zero.Init (and then refuses the device_map bitsandbytes
        # needs): a 4-bit backbone is loaded whole and partitioned by deepspeed.initialize.
        keep_alive = HfDeepSpeedConfig(ds)
    if quant.is_quantized(cfg):
        quant.quiet_known_warnings()
    # A quantized backbone is placed on this rank's device by the loader (never `.to()`-moved).
    with mem.phase("load"):
        backbone = load_backbone(model_path, dtype, quant.bnb_config(cfg), dist.device())
        quant.freeze_layout(backbone)
    if cfg.gradient_checkpointing:
        # Non-reentrant: recomputing a block in backward goes back through the block's module
        # call (ZeRO-3's hooks gather its weights again) and needs no input that requires grad
        # other than the prompt-carrying hidden states. The backbone stays frozen.
        backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    clock.mark("load_backbone")
    trainable, frozen = count_parameters(backbone)
    if trainable:
        raise TrainingError(f"{trainable} backbone parameters are trainable; expected 0")
    p_init = init_prompt(backbone, cfg.num_virtual_tokens, cfg.prompt_init, cfg.prompt_init_seed,
                         cfg.prompt_init_vocab_range)
    meta = {  # the canonical task name: `record` and `superglue-record` are one task downstream
        "task": task.name, "backbone": cfg.model_name_or_path if cfg.model_name_or_path != DEMO_MODEL
        else "demo", "backbone_fingerprint": fingerprint(backbone.config),
        "init_method": cfg.prompt_init, "init_seed": cfg.prompt_init_seed,
        "init_fingerprint": artifacts.tensor_fingerprint(p_init),
    }
    method = build_method(cfg, p_init, meta, inputs)
    model = PromptedSeq2Seq(method, backbone)
    groups = method.param_groups()
    if stage == 3:
        set_prompt_persistence(ds, groups)
    n_prompt = sum(p.numel() for g in groups for p in g["params"])  # before ZeRO partitions them
    schedule = configure_schedule(ds, groups, cfg)
    with mem.phase("deepspeed_initialize"):
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds,
                                               lr_scheduler=schedule)
    del keep_alive
    clock.mark("deepspeed_initialize")
    info(f"backbone {model_path}: {frozen:,} frozen parameters (0 trainable); prompt "
         f"{n_prompt:,} trainable; ZeRO stage {stage}; world size {dist.world_size()}")
    if quant.is_quantized(cfg):
        info(f"quantized backbone ({'int8' if cfg.load_in_8bit else cfg.bnb_4bit_quant_type}): "
             f"{quant.quantization_report(backbone)}"
             + ("; LLM.int8 multiplies through fp16 (bitsandbytes' design)" if cfg.load_in_8bit
                else ""))
    return Run(cfg, ds, task, tokenizer, enc["train"], ex_tasks["train"], enc["validation"],
               ex_tasks["validation"], model, method, engine, stage, model_path, meta,
               quant.checksum(backbone), clock, mem, run_id, replaced,
               (enc["test"], recs["test"], ex_tasks["test"]) if cfg.do_test else None)


def check_frozen(run: Run) -> None:
    """Stop loudly if any rank's frozen backbone bytes (incl. quantization constants) changed."""
    now = quant.checksum(run.model.backbone)
    if dist.any_rank(now != run.backbone_checksum):  # collective: every rank learns the verdict
        raise TrainingError(f"the frozen backbone changed during training (rank {dist.rank()}: "
                            f"checksum {run.backbone_checksum} -> {now}); please report this")
    info(f"frozen backbone unchanged on every rank (rank 0: checksum {now}, "
         f"{quant.local_bytes(run.model.backbone):,} backbone bytes held)")


def check_prompt_replicas(method: PromptMethod, step: int) -> str:
    """Stop loudly if the replicated prompt parameters ever differ between ranks."""
    named = method.named_trainable()
    with dist.gathered([p for _, p in named]):
        return dist.check_replicas(named, step)


def _best_tensors(method: PromptMethod) -> dict[str, torch.Tensor]:
    return {"prompt": method.export_prompt(), **method.extra_tensors()}


def export_artifact(run: Run, best: Best, steps: int, final: bool = False) -> Path:
    """Write the best prompt as the run's prompt artifact (rank 0, atomically). Until the run
    ends (`final`) it is marked in progress, so no later stage takes it for a finished one."""
    out = Path(run.cfg.output_dir)
    if dist.is_main():
        extra = {k: v for k, v in best.tensors.items() if k != "prompt"}
        meta = {**run.meta, "method": run.method.name, "steps": steps,
                "status": artifacts.COMPLETE if final else artifacts.IN_PROGRESS,
                "best_metric": artifacts.best_metric(*_best_value(run, best), best.step),
                # the method's state *at the best step* (DTVG: the group of the exported P_mix)
                "extra": {"metrics": best.metrics,
                          **(best.method_meta or run.method.artifact_meta())}}
        artifacts.save_artifact(out, best.tensors["prompt"], run.method.p_init, meta, extra)
        if final:
            write_adapter(run, out)
    dist.barrier()  # the artifact exists before any rank reports success
    return out


def write_adapter(run: Run, out: Path) -> None:
    """Rank 0, at the end of a run: the prompt as a PEFT prompt-tuning adapter plus the
    tokenizer in `out/adapter/`, so `PeftModel.from_pretrained(backbone, out/"adapter")` works
    with no export step. MPT source runs hold one prompt per task: export those by task."""
    from dtvg_ds.export import export_peft

    if run.method.name == "mpt_source":
        info(f"no adapter/ for an MPT source run; per task: python -m dtvg_ds.export to-peft {out} "
             "DIR --mpt_task TASK")
        return
    if run.method.instance_level:
        info(f"no adapter/ for this {run.method.name} run: its prompt depends on each input, "
             "which a PEFT prompt-tuning adapter cannot express")
        return
    try:
        adapter = export_peft(out, out / "adapter", model_name_or_path=run.model_path,
                              overwrite=True)
        run.tokenizer.save_pretrained(str(adapter))
    except Exception as e:  # noqa: BLE001  -- a convenience copy must never fail a finished run
        info(f"WARNING: could not write {out / 'adapter'} ({type(e).__name__}: {e}); the "
             f"artifact is complete: python -m dtvg_ds.export to-peft {out} DIR")


def _micro_steps(run: Run, step: int, dev: torch.device) -> float:
    """One optimizer step: forward/backward over the accumulated micro batches; loss sum."""
    cfg, engine, method = run.cfg, run.engine, run.method
    accum, total = cfg.gradient_accumulation_steps, 0.0
    for micro in range(accum):
        idx = method.micro_batch(step * accum + micro, run.train_tasks, cfg.seed,
                                 cfg.per_device_train_batch_size, dist.rank(), dist.world_size())
        batch = {**batches.collate(run.train, idx, run.tokenizer.pad_token_id),
                 **method.batch_extras(idx, run.train_tasks)}
        with run.mem.phase("forward", step=step + 1):
            loss = engine(**batches.to_device(batch, dev))  # the method's loss, this step's prompt
        with run.mem.phase("backward", step=step + 1):
            engine.backward(loss)
        with run.mem.phase("optimizer_step", step=step + 1):
            engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary only
        total += float(loss.detach())
    if not math.isfinite(total):
        raise TrainingError(f"step {step + 1}: loss is {total}; lower --learning_rate")
    return total


def _save(run: Run, step: int, best: Best, resumed_from: Path | None) -> None:
    with run.mem.phase("checkpoint_save", step=step):
        checkpoint.save(run.engine, run.cfg.output_dir, step,
                        {"best_score": best.score, "best_step": best.step,
                         "best_metrics": best.metrics, "method_state": run.method.extra_state(),
                         "best_method_meta": best.method_meta,
                         "run_id": run.run_id, "config": run.cfg.to_dict()},
                        best.tensors, run.cfg.save_total_limit, protect=resumed_from)


def _selection(run: Run, res: dict[str, Any]) -> float:
    """What picks the best prompt, larger = better: the task's primary metric, or
    --metric_for_best_model (negated when not --greater_is_better)."""
    name = run.cfg.metric_for_best_model.removeprefix("eval_")
    if not name:
        return float(res["score"])
    if name not in res:
        known = sorted(k for k, v in res.items() if isinstance(v, int | float))
        raise ConfigError([f"--metric_for_best_model {run.cfg.metric_for_best_model}: this task's "
                           f"evaluation reports {', '.join(known)}; pick one of them"])
    return float(res[name]) if run.cfg.greater_is_better else -float(res[name])


def _best_value(run: Run, best: Best) -> tuple[str, float]:
    """(metric name, its value) of the best prompt, as the user reads it."""
    name = run.cfg.metric_for_best_model.removeprefix("eval_")
    if not name:
        return metric_name(run.task), best.score
    return name, float(best.metrics.get(name, math.nan))


def _rates(run: Run, seconds: float) -> dict[str, float]:
    """HF Trainer's names: learning_rate (and one per parameter group when there are several:
    DTVG's prompt, a_t, a_s), grad_norm (clipping on), steps and samples per second."""
    cfg = run.cfg
    lrs = [float(x) for x in run.engine.get_lr()]
    out = {"learning_rate": lrs[0], "lr": lrs[0]}  # "lr": the name older logs used
    if len(lrs) > 1:
        names = [g.get("name", str(i)) for i, g in enumerate(run.method.param_groups())]
        out |= {f"learning_rate/{n}": lr for n, lr in zip(names, lrs, strict=False)}
    norm = run.engine.get_global_grad_norm()
    if norm is not None:
        out["grad_norm"] = float(norm)
    sps = cfg.logging_steps / max(seconds, 1e-9)
    samples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * dist.world_size()
    return {**out, "steps_per_second": sps, "train_samples_per_second": sps * samples}


def _evaluate(run: Run, logger: RunLogger, step: int) -> dict[str, Any]:
    """Score this step's prompt on the validation set (all ranks) and log it."""
    with run.mem.phase("evaluation", step=step):
        res = evaluate(run.engine, run.model, run.valid, run.task, run.tokenizer, run.cfg,
                       run.zero_stage, run.valid_tasks, step)
    logger.log({"step": step, **{k if k.startswith("eval") else f"eval_{k}": v
                                 for k, v in res.items()}})
    return res


def _every(n: int, step: int, last: int) -> bool:
    return bool(n and step % n == 0) or step == last


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training end to end; returns a summary (same on all ranks)."""
    stop_signal = _StopSignal()
    configure_threads()
    run = setup(cfg)
    cfg = run.cfg  # with the values adopted from the DeepSpeed JSON and stage-1 artifacts
    logger = RunLogger(cfg.output_dir, report_sinks(cfg.report_to), config=cfg.to_dict())
    method_log = RunLogger(cfg.output_dir, (), run.method.log_name)
    try:
        return _train_loop(run, logger, method_log, stop_signal)
    finally:  # also on preemption and errors: flush TensorBoard, finish the W&B run
        logger.close()
        method_log.close()
        run.mem.close()


def _train_loop(run: Run, logger: RunLogger, method_log: RunLogger,
                stop_signal: _StopSignal) -> dict[str, Any]:
    """Resume if asked, then step, log, evaluate, checkpoint and export (all ranks)."""
    cfg, engine, method, dev = run.cfg, run.engine, run.method, dist.device()
    if dist.is_main():
        artifacts.atomic_write_json(Path(cfg.output_dir) / "run_config.json",
                                    {"config": cfg.to_dict(), "deepspeed": run.ds,
                                     "world_size": dist.world_size()})
    best, step = Best(), 0
    resume_dir = checkpoint.find_resume(cfg.output_dir, cfg.resume)
    if resume_dir is not None:
        with run.mem.phase("resume"):
            state, best_t = checkpoint.load(engine, resume_dir)
        step = state["step"]
        best = Best(state["best_score"], state["best_step"], state["best_metrics"], best_t,
                    state.get("best_method_meta", {}))
        method.load_extra_state(state["method_state"])
        info(f"resumed from {resume_dir} at step {step}")
    engine.train()
    bar = progress(cfg.max_steps, step, disable=cfg.disable_tqdm)
    loss_sum, loss_n, t_last = 0.0, 0, time.time()
    while step < cfg.max_steps:
        record = method.on_step_start(step)  # all ranks (DTVG: rank 0 decides, broadcasts)
        if record is not None:
            method_log.log(record)
        if step == 0 and cfg.eval_on_start:  # after on_step_start: DTVG's step-0 group is set
            _evaluate(run, logger, step)  # a diagnostic: never competes for the best prompt
        loss_sum += _micro_steps(run, step, dev)
        loss_n += cfg.gradient_accumulation_steps
        step += 1
        if run.clock is not None:  # the first step of this launch: how long start-up took
            timing, run.clock = run.clock.record(), None
            logger.log({"step": step, **timing})
            rundir.finish_replacing(run.replaced)  # the new run has started: drop the old one
        bar.update(1)
        if cfg.fingerprint_every and _every(cfg.fingerprint_every, step, cfg.max_steps):
            check_prompt_replicas(method, step)
        if _every(cfg.logging_steps, step, cfg.max_steps):
            loss = sum(dist.gather_objects(loss_sum / loss_n)) / dist.world_size()  # collective
            now = time.time()
            logger.log({"step": step, "loss": loss, **_rates(run, now - t_last),
                        **method.loss_parts()})
            bar.set_postfix(loss=f"{loss:.4f}")
            loss_sum, loss_n, t_last = 0.0, 0, now
        if _every(cfg.eval_steps, step, cfg.max_steps):
            res = _evaluate(run, logger, step)
            score = _selection(run, res)
            if score > best.score:  # keep the best prompt (all ranks hold it)
                best = Best(score, step, res, _best_tensors(method), method.artifact_meta())
                export_artifact(run, best, step)
        preempted = dist.any_rank(stop_signal.signum is not None)  # collective: 4 bytes
        stopping = step == cfg.stop_at_step or preempted
        if _every(cfg.save_steps, step, cfg.max_steps) or stopping:
            _save(run, step, best, resume_dir)  # the checkpoint we resumed from is kept
        if stopping:
            bar.close()
            why = "a termination signal" if preempted else "--stop_at_step"
            info(f"stopped at step {step} by {why}; checkpoint written, continue with "
                 "--resume auto")
            if preempted:
                raise Preempted(f"stopped by a termination signal at step {step}; checkpoint "
                                f"{checkpoint.ckpt_root(cfg.output_dir)}, resume with --resume auto")
            return {"output_dir": cfg.output_dir, "stopped_at": step}
    bar.close()
    check_frozen(run)
    if not best.tensors:  # resumed at max_steps, or eval never ran: export the current prompt
        best = Best(best.score, step, best.metrics, _best_tensors(method))
    out = export_artifact(run, best, step, final=True)
    name, value = _best_value(run, best)
    summary = {"output_dir": str(out), "best_score": value, "best_step": best.step,
               "metric": name, "best_metrics": best.metrics, "steps": step}
    info(f"done: {cfg.task} best {name} {value:.2f} at step {best.step}; prompt artifact in {out}")
    if run.test is not None:
        summary["test"] = _test(run, best, logger, step)
    return summary


def _test(run: Run, best: Best, logger: RunLogger, step: int) -> dict[str, float]:
    """--do_test: the exported (dev-selected) prompt on the test split, decoded by the same
    sharded backbone; written like `python -m dtvg_ds.evaluation` writes it (all ranks)."""
    from dtvg_ds.evaluation import score_split
    from dtvg_ds.export import artifact_prompter

    enc, recs, ex_tasks = run.test
    cfg = run.cfg
    # What is on disk is what gets scored: the artifact just exported, through the prompter
    # evaluation and predict use (a static prompt, or ATTEMPT's per-input module).
    prompter = artifact_prompter(artifacts.load_artifact(cfg.output_dir)).to(dist.device())
    fixed = PromptedSeq2Seq(prompter, run.model.backbone)
    result, path = score_split(run.engine, fixed, enc, recs, ex_tasks, run.task, run.tokenizer,
                               cfg, run.zero_stage, Path(cfg.output_dir) / "eval", "test",
                               {"best_step": best.step})
    logger.log({"step": step, **{f"test_{k}": v for k, v in result.items()}})
    info(f"test ({len(enc)} examples, prompt of step {best.step}): "
         f"{metric_name(run.task)} {result['score']:.4f} -> {path}")
    return result



def configure_threads() -> None:
    """CPU ranks share the machine's cores: without OMP_NUM_THREADS, give each local rank an
    equal share instead of letting every rank spawn one thread per core (they would fight).
    Also sets glibc up to return freed memory on CPU ranks (`memtrace.configure_host_allocator`)."""
    from deepspeed.accelerator import get_accelerator

    cpu = get_accelerator().device_name() == "cpu"
    memtrace.configure_host_allocator(cpu)  # before any large allocation (see memtrace)
    if "OMP_NUM_THREADS" in os.environ or not cpu:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(dist.local_world_size(), 1)))
