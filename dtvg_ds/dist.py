"""The only module that talks to torch.distributed / deepspeed.comm.

Rank-0 work, broadcasts, barriers, replica fingerprints and ZeRO-3 gathers live here, so the
rest of the code base reads as single-process code. Every collective call is commented with who
takes part and why; a collective that only some ranks reach is a hang, so each helper here is
called by *all* ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")


def _env_from_slurm() -> None:
    """`srun python train.py` with one task per rank: map SLURM variables to torch's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def expected_world_size() -> int:
    """World size announced by the launcher (valid before the process group exists)."""
    _env_from_slurm()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(timeout_minutes: float = 30.0) -> None:
    """Create the process group (NCCL on GPUs, gloo on the CPU accelerator) with a timeout.

    The timeout bounds how long a rank waits in a collective for a dead peer, so a killed rank
    ends the job instead of hanging it.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _env_from_slurm()
    if tdist.is_initialized():
        return
    backend = get_accelerator().communication_backend_name()
    if get_accelerator().device_name() == "cpu":
        backend = "gloo"  # the CPU accelerator's ccl backend needs oneCCL bindings we do not ship
    deepspeed.init_distributed(dist_backend=backend,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank())
    else:
        _unlink_shm_segment()


def _unlink_shm_segment() -> None:
    """Remove this rank's /dev/shm segment of DeepSpeed's CPU shared-memory all-reduce.

    DeepSpeed creates one ~64 MB segment per rank at init and never unlinks it, not even on a
    clean exit: dozens of runs fill /dev/shm (RAM). Every rank has mapped every peer's segment
    once `init_distributed` returns (its shm_initialize waits for all of them), so after a
    barrier the names can go; the mappings stay valid until the processes exit, and nothing
    is left behind even if a rank is later killed.
    """
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"
            f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank()}")
    barrier()  # collective: every rank has mapped every segment before any name is removed
    with contextlib.suppress(OSError):
        os.unlink(name)


def device() -> torch.device:
    """This rank's compute device (the CPU, or the accelerator of its local rank)."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, local_rank())


def rank() -> int:
    """Global rank (0 without a process group)."""
    return tdist.get_rank() if tdist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return tdist.get_world_size() if tdist.is_initialized() else 1


def local_rank() -> int:
    """Rank within the node."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this node (as announced by the launcher; 1 without one)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))


def is_main() -> bool:
    """True on global rank 0, the rank that decides groups and writes shared files."""
    return rank() == 0


def barrier() -> None:
    """All ranks wait for each other (e.g. rank 0 finished writing a file others will read)."""
    if tdist.is_initialized():
        tdist.barrier()  # collective: every rank


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a small picklable object from `src` to every rank; returns it on all ranks.

    Only our own in-memory objects travel here (never user files), so pickling is safe.
    """
    if not tdist.is_initialized():
        return obj
    box = [obj if rank() == src else None]
    tdist.broadcast_object_list(box, src=src)  # collective: every rank, rank `src` sends
    return box[0]


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` on every rank with rank `src`'s values (in place) and return it."""
    if tdist.is_initialized():
        tdist.broadcast(t, src=src)  # collective: every rank, rank `src` sends
    return t


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (used for eval predictions)."""
    if not tdist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)  # collective: every rank contributes its shard
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on at least one rank (e.g. a SIGTERM arrived)."""
    if not tdist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)  # collective: every rank, 4 bytes
    return bool(t.item() > 0)


class PeerError(RuntimeError):
    """Another rank failed a step every rank depends on; that rank reports the cause."""


def local_first(fn: Callable[[], T]) -> T:
    """`fn()` on the local rank 0 of every node first, then on the node's other ranks.

    For reads that fill a node's cache (Hub downloads, dataset preparation): the first rank of
    a node fetches, its other ranks then find the files in place. If `fn` fails on any node's
    local rank 0, that rank raises its error and every other rank raises `PeerError`, instead
    of waiting for it in the next collective until the timeout. All ranks must call this.
    """
    if not tdist.is_initialized():
        return fn()
    first = local_rank() == 0
    result: Any = None
    error: BaseException | None = None
    if first:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  -- re-raised below, after telling the others
            error = e
    if any_rank(error is not None):  # collective: every rank; also the barrier the others wait at
        if error is not None:
            raise error
        raise PeerError("stopped: the local rank 0 of a node failed to read the run's inputs "
                        "(its error is printed above)")
    return result if first else fn()


def fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    """sha256 of the exact bytes of tensors (fp32, CPU): equal iff bitwise equal."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ReplicaDivergence(RuntimeError):
    """The replicated prompt parameters differ between ranks: training would be silently wrong."""


def check_replicas(named: Sequence[tuple[str, torch.Tensor]], step: int) -> str:
    """Compare a fingerprint of the (full) prompt parameters across ranks; raise on divergence."""
    fp = fingerprint([t for _, t in named])
    every = gather_objects(fp)  # collective: every rank sends its 64-char digest
    if len(set(every)) != 1:
        raise ReplicaDivergence(
            f"step {step}: prompt parameters differ across ranks ({[e[:12] for e in every]}); "
            "the replicas diverged. Stop and report this with your DeepSpeed config.")
    return fp


# ----------------------------------------------------------------------------------------------
# ZeRO-3 gathers
# ----------------------------------------------------------------------------------------------

def is_zero3_param(p: torch.Tensor) -> bool:
    """True if `p` is a ZeRO-3 partitioned parameter (possibly currently gathered)."""
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: Sequence[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block on every rank; a no-op for non-ZeRO-3 parameters.

    With `modifier_rank`, changes made by that rank inside the block are kept (and broadcast).
    """
    z3 = [p for p in params if is_zero3_param(p)]
    if not z3:
        yield
        return
    import deepspeed

    # collective: every rank all-gathers the partitions (and on exit, broadcasts from
    # modifier_rank if given, then re-partitions)
    with deepspeed.zero.GatheredParameters(z3, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def available(p: torch.Tensor) -> Iterator[None]:
    """`p` gathered inside the block if ZeRO-3 has it released (a no-op otherwise).

    Used in a frozen layer's backward: ZeRO-3's backward hook normally gathers the layer's
    weight first; if not, this gathers it here and releases it after, as DeepSpeed's own
    memory-efficient linear does. Every rank runs the same backward, so every rank takes the
    same branch.
    """
    released = is_zero3_param(p) and getattr(p.ds_status, "name", "") == "NOT_AVAILABLE"
    if released:
        p.all_gather()  # collective: every rank, this one parameter
    try:
        yield
    finally:
        if released:
            p.partition()


def full_tensor(p: torch.nn.Parameter) -> torch.Tensor:
    """A CPU fp32 copy of the full value of `p` (gathers under ZeRO-3; all ranks must call)."""
    with gathered([p]):
        return p.detach().float().cpu().clone()


def _zero3_offload(engine: Any) -> Any | None:
    """ZeRO-3's parameter manager: the optimizer's when training; with no optimizer (decoding
    only, `dtvg_ds.inference`) DeepSpeed sets the manager itself as the engine's optimizer."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    opt = getattr(engine, "optimizer", None)
    if isinstance(opt, DeepSpeedZeRoOffload):
        return opt
    return getattr(opt, "parameter_offload", None) if opt is not None else None


@contextlib.contextmanager
def backbone_resident(engine: Any, module: torch.nn.Module, enabled: bool) -> Iterator[bool]:
    """Keep every parameter of `module` gathered for the whole block (ZeRO-3 generation).

    Generating under ZeRO-3 otherwise re-gathers every layer at every decoding step, and needs
    `synced_gpus` so ranks keep stepping together. With the weights resident and the ZeRO hooks
    detached, each rank generates locally with no collectives at all. Yields True if resident.
    """
    offload = _zero3_offload(engine)
    # ZeRO's own parameters only: a prompter built outside the engine (--do_test's saved
    # prompt or ATTEMPT module) holds plain tensors, whole on every rank, with no hooks.
    params = [p for p in module.parameters() if is_zero3_param(p)]
    if not enabled or offload is None or not params:
        yield False
        return
    # The ZeRO module hooks would release (re-partition) parameters after each sub-module's
    # forward; detach them while the weights are resident, reattach afterwards.
    with gathered(params), zero_hooks_detached(engine, params):
        yield True


@contextlib.contextmanager
def zero_hooks_detached(engine: Any, params: Sequence[torch.nn.Parameter] = ()) -> Iterator[None]:
    """ZeRO-3's per-module fetch/release hooks removed inside the block (reattached after).

    Only safe while the parameters the block touches are gathered or persistent: nothing
    fetches them. `params` are marked as used by no sub-module, so no release waits on them.
    """
    offload = _zero3_offload(engine)
    if offload is None:
        yield
        return
    for p in params:
        p.ds_active_sub_modules.clear()
    for h in offload.forward_hooks + offload.backward_hooks:
        h.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload._register_deepspeed_module(offload.module)
