"""Per-phase peak memory of this rank, and giving freed host memory back to the OS.

`--trace_memory` makes the engine wrap each phase of a run (load, deepspeed.initialize, forward,
backward, optimizer step, evaluation, checkpoint save, resume) in `MemoryTrace.phase(name)`;
every rank then appends one JSON record per phase to `memory.rank<R>.jsonl` in the output dir.

What is measured:
- on a GPU: `torch.cuda.max_memory_allocated` since the phase started (peak stats are reset at
  the start of every phase), plus the allocated and reserved bytes at its end;
- on the CPU: the process's anonymous resident memory (`RssAnon` in /proc/self/status: what
  the rank really occupies in RAM, without the mapped library and model files) sampled every
  20 ms by a thread, its high-water per phase; and glibc's own count of the bytes it has handed
  out and not got back (`mallinfo2`: `uordblks + hblkhd`). The two differ by memory the program
  freed but glibc kept: see `configure_host_allocator`.

Why `configure_host_allocator` exists: with glibc's defaults a CPU rank's RSS at Flan-T5-XL
size grew to 2-3x what was live (8-12 GiB vs 4.3-6.5 GiB in glibc's own count; two ranks were
OOM-killed in the second step), because ZeRO-3 gathers and frees one weight per layer in sizes
that glibc then keeps in its heaps. The engine applies it on CPU ranks at start-up (measured:
bench/RESULTS.md, "XL on this machine").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def _libc() -> Any | None:
    """glibc, or None (musl, macOS: no mallinfo2 / malloc_trim; the CPU figures then show RSS
    only and the allocator is left as it is)."""
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
        lib.mallinfo2.restype = _MallInfo2
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def rss_anon() -> int:
    """Anonymous resident bytes of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def heap_in_use() -> int:
    """Bytes glibc has handed out and not got back (in-heap + mmapped); 0 without glibc."""
    if _LIBC is None:
        return 0
    m = _LIBC.mallinfo2()
    return int(m.uordblks + m.hblkhd)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 20


def configure_host_allocator(cpu: bool) -> bool:
    """Make glibc give large freed blocks straight back to the OS (CPU ranks only).

    glibc serves allocations above its mmap threshold with their own mapping (returned on
    free), but raises that threshold to the size of every such block freed, up to 32 MiB: after
    the first ZeRO-3 gather is released, every weight and activation below 32 MiB comes from the
    heap, which only shrinks when its top is free. Fixing the threshold at 1 MiB (and trimming
    heap tops above 64 MiB) keeps RSS close to what is live. Not applied when the user set
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (their choice wins), and not on a GPU rank
    (`cpu` False), whose tensors do not live in this heap. Returns True if applied.
    """
    if _LIBC is None or not cpu or any(
            k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 64 << 20))


class _Sampler:
    """A daemon thread recording the high-water of `rss_anon()` and `heap_in_use()`."""

    def __init__(self, every_s: float = 0.02):
        self.every_s = every_s
        self.peak_rss = self.peak_heap = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memtrace", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.every_s)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_anon())
        self.peak_heap = max(self.peak_heap, heap_in_use())

    def reset(self) -> None:
        self.peak_rss, self.peak_heap = rss_anon(), heap_in_use()

    def stop(self) -> None:
        self._stop.set()


class MemoryTrace:
    """Per-phase peak memory of this rank, appended as JSON lines to `path` (None: off).

    Off (`path` None), `phase()` costs nothing.
    """

    def __init__(self, path: str | Path | None, rank: int = 0, device: str = "cpu",
                 fresh: bool = True):
        self.path = Path(path) if path else None
        self.rank = rank
        self.records: list[dict[str, Any]] = []
        self._gpu = device == "cuda"
        if self.path is not None and fresh:
            self.path.unlink(missing_ok=True)  # a resumed run appends; a new run starts over
        self._sampler = _Sampler() if self.path is not None and not self._gpu else None

    @contextlib.contextmanager
    def phase(self, name: str, **extra: Any) -> Iterator[None]:
        """Measure the block as phase `name` (peak since its start, state at its end)."""
        if self.path is None:
            yield
            return
        if self._gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if self._sampler is not None:
            self._sampler.reset()
        t0 = time.time()
        yield
        rec: dict[str, Any] = {"phase": name, "rank": self.rank, "seconds": round(time.time() - t0, 3),
                               **extra}
        if self._gpu:
            torch.cuda.synchronize()
            rec.update(device="cuda", peak_bytes=torch.cuda.max_memory_allocated(),
                       end_bytes=torch.cuda.memory_allocated(),
                       reserved_bytes=torch.cuda.memory_reserved())
        else:
            s = self._sampler
            s.sample()
            rec.update(device="cpu", peak_bytes=s.peak_rss, end_bytes=rss_anon(),
                       heap_peak_bytes=s.peak_heap, heap_end_bytes=heap_in_use())
        self.records.append(rec)
        self._append(rec)

    def _append(self, rec: dict[str, Any]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one short line per phase, appended: a crash loses at most the phase being written
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
