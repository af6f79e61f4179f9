"""Measured throughput and peak memory of a callable that processes one batch.

Generic (any ``fn()`` that runs one batch of ``items`` items: images, sequences, tokens):
warm-up runs first, then the median over timed repeats, so one slow repeat (a page fault,
another process) does not move the number. `measure_paired` alternates a reference (the
unreduced model) and a candidate batch by batch, so a speedup compares two numbers taken
under the same machine load: on a shared machine the load can change by 2x within minutes,
which makes speedups against a reference timed once at the start meaningless.

Peak memory:

* CUDA — ``torch.cuda.max_memory_allocated`` during a timed call minus what was allocated
  before it (exact, the caching allocator's own count); the largest over the repeats.
* CPU — there is no allocator counter, so a background thread samples the process's
  resident set size from ``/proc/self/statm`` every ``interval`` seconds during each timed
  call, and the peak minus the baseline just before the call is reported (the largest over
  the repeats): "peak RSS delta, sampled". Before the baseline we ask glibc to return freed heap to the OS
  (``malloc_trim``), otherwise memory freed by an earlier run stays resident and hides
  this run's allocations. Sampling can miss spikes shorter than ``interval``; treat small
  differences as noise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

__all__ = ["Timing", "RSSSampler", "measure_throughput", "measure_paired", "rss_bytes", "memory_label", "sync",
           "peak_memory"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``); 0 where unavailable."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class RSSSampler:
    """Context manager: samples RSS in a daemon thread; ``peak_delta`` in bytes after exit."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        _malloc_trim()
        self.baseline = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tokenreduce-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False

    @property
    def peak_delta(self) -> int:
        return max(0, self.peak - self.baseline)


def memory_label(device: str | torch.device) -> str:
    """What the memory number means on ``device`` (use it as the column header)."""
    return "peak CUDA alloc (MB)" if torch.device(device).type == "cuda" else "peak RSS delta, sampled (MB)"


@contextlib.contextmanager
def peak_memory(device: str | torch.device) -> Iterator[dict]:
    """Yields a dict whose ``mb`` is set on exit: CUDA allocator peak or sampled RSS delta, in MiB."""
    device = torch.device(device)
    box: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield box
        box["mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        with RSSSampler() as s:
            yield box
        box["mb"] = s.peak_delta / 2**20


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Result of `measure_throughput`. Times are seconds per batch of ``items`` items."""

    items: int
    times: list[float] = field(default_factory=list)
    peak_mem_mb: float | None = None
    mem_kind: str = ""

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def items_per_s(self) -> float:
        return self.items / self.median_s

    @property
    def ms_per_item(self) -> float:
        return 1000.0 * self.median_s / self.items

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}items_per_s": self.items_per_s, f"{prefix}ms_per_item": self.ms_per_item,
                f"{prefix}batch_times_s": list(self.times), f"{prefix}peak_mem_mb": self.peak_mem_mb,
                f"{prefix}mem_kind": self.mem_kind}


def _check_counts(repeats: int, items: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if items < 1:
        raise ValueError(f"items must be >= 1, got {items}")


def measure_throughput(fn: Callable[[], object], items: int, repeats: int = 3, warmup: int = 1,
                       device: str | torch.device = "cpu", measure_memory: bool = True,
                       interval: float = 0.002) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (with memory tracking).

    ``items``: how many items one call processes (the batch size), for items/s.
    """
    _check_counts(repeats, items)
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    mem = _Memory(device, measure_memory, interval)
    timing = Timing(items=items, mem_kind=memory_label(device) if measure_memory else "")
    for _ in range(repeats):
        timing.times.append(mem.run(fn))
    timing.peak_mem_mb = mem.peak
    return timing


class _Memory:
    """Peak memory over several separate calls (CUDA allocator peak, or sampled RSS on CPU)."""

    def __init__(self, device: torch.device, enabled: bool, interval: float):
        self.device, self.enabled, self.interval = device, enabled, interval
        self.cuda = device.type == "cuda"
        self.peak: float | None = None

    def run(self, fn: Callable[[], object]) -> float:
        """Call ``fn`` (synchronised), record its peak memory, return its wall time."""
        sampler = None
        if self.enabled and self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        elif self.enabled:
            sampler = RSSSampler(self.interval).__enter__()
        try:
            t0 = time.perf_counter()
            fn()
            sync(self.device)
            elapsed = time.perf_counter() - t0
        finally:
            if sampler is not None:
                sampler.__exit__(None, None, None)
        if self.enabled:
            peak = ((torch.cuda.max_memory_allocated(self.device) - base) if self.cuda else sampler.peak_delta) / 2**20
            self.peak = peak if self.peak is None else max(self.peak, peak)
        return elapsed


def measure_paired(reference: Callable[[], object], candidate: Callable[[], object], items: int, repeats: int = 3,
                   warmup: int = 1, reference_warmup: int = 0, device: str | torch.device = "cpu",
                   measure_memory: bool = True, interval: float = 0.002) -> tuple[Timing, Timing]:
    """Time ``reference`` and ``candidate`` alternately (ref, cand, ref, cand, ...), ``repeats`` each.

    Returns ``(reference_timing, candidate_timing)``; their ratio is a speedup measured under
    the same conditions. Memory is tracked for both, separately. ``reference_warmup`` is 0 by
    default because the reference is usually warm already (timed earlier in the run).
    """
    _check_counts(repeats, items)
    device = torch.device(device)
    for _ in range(reference_warmup):
        reference()
    for _ in range(warmup):
        candidate()
    sync(device)
    kind = memory_label(device) if measure_memory else ""
    mem_ref, mem_cand = _Memory(device, measure_memory, interval), _Memory(device, measure_memory, interval)
    ref, cand = Timing(items=items, mem_kind=kind), Timing(items=items, mem_kind=kind)
    for _ in range(repeats):
        ref.times.append(mem_ref.run(reference))
        cand.times.append(mem_cand.run(candidate))
    ref.peak_mem_mb, cand.peak_mem_mb = mem_ref.peak, mem_cand.peak
    return ref, cand
