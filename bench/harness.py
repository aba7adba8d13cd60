"""A small timing harness for micro-benchmarks: correctness gate, timing, peak extra memory, GB/s.

For one (op, provider, shape) case, `run_case`:

1. **Gate.** Runs the provider once and compares its outputs with the reference's using the
   tolerances of `kernels.testing` (the same table the tests use). On a mismatch or an exception the
   row carries the error and *no* time: a speed is never reported for a wrong result.
2. **Memory.** One more call, untimed. CUDA: `torch.cuda.max_memory_allocated()` after
   `reset_peak_memory_stats()`, minus `memory_allocated()` before the call: the caching allocator's
   own peak of extra bytes, workspaces included. CPU: `kernels.testing.AllocationTracker`, the peak
   of live bytes in tensor storages created by aten ops during the call (scratch memory an op
   allocates and frees internally is invisible, so it is a lower bound; no RSS sampling, which
   the glibc heap makes unreliable for short-lived buffers). The row names the method.
3. **Time.** `warmup` calls, then `repeats` timed calls. CUDA: a pair of events around each call
   (the call itself may synchronise, e.g. to fetch metrics); CPU: `time.perf_counter`. Reports the
   median and the 20th/80th percentiles in milliseconds. No cache flushing between calls: the ops
   benchmarked here move far more bytes than any cache holds.
4. **GB/s** = bytes moved (the op's model of its minimum DRAM traffic) / median time; for
   compute-bound ops also **TFLOP/s** = the op's FLOP count / median time.

Results are `BenchRow`s (one dataclass, JSON-friendly).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kernels.testing import AllocationTracker


@dataclass
class BenchRow:
    """One measured (op, provider, shape) case."""

    op: str
    provider: str
    shape: dict[str, int]
    dtype: str
    device: str
    ok: bool
    max_err: float | None = None
    ms_median: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    peak_mem_bytes: int | None = None
    memory_method: str | None = None
    bytes_moved: int | None = None
    gbps: float | None = None
    flops: int | None = None
    tflops: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_call(fn: Callable[[], Any], *, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_memory(fn: Callable[[], Any], *, device: torch.device) -> tuple[int, str]:
    """(peak extra bytes of one call of `fn`, how they were measured)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return peak, "cuda.max_memory_allocated"
    with AllocationTracker() as tracker:
        out = fn()
        del out
    return tracker.peak_bytes, "aten-storage-tracker"


def run_case(
    *,
    op: str,
    provider: str,
    shape: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
    fn: Callable[[], Any],
    gate: Callable[[Any], float],
    bytes_moved: int,
    warmup: int,
    repeats: int,
    flops: int | None = None,
) -> BenchRow:
    """Gate, then memory, then time one provider; `gate(outputs)` returns the max error or raises."""
    row = BenchRow(
        op=op,
        provider=provider,
        shape=dict(shape),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        ok=False,
    )
    try:
        row.max_err = gate(fn())
    except torch.OutOfMemoryError as e:
        row.error = f"out of memory: {str(e).splitlines()[0]}"
        return row
    except AssertionError as e:
        row.error = f"correctness gate failed: {str(e).splitlines()[0]}"
        return row
    except Exception as e:
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return row
    row.ok = True
    row.peak_mem_bytes, row.memory_method = peak_memory(fn, device=device)
    times = time_call(fn, device=device, warmup=warmup, repeats=repeats)
    row.ms_median = statistics.median(times)
    row.ms_p20, row.ms_p80 = percentile(times, 20), percentile(times, 80)
    row.bytes_moved = bytes_moved
    row.gbps = bytes_moved / (row.ms_median * 1e-3) / 1e9 if row.ms_median > 0 else None
    if flops is not None:
        row.flops = flops
        row.tflops = flops / (row.ms_median * 1e-3) / 1e12 if row.ms_median > 0 else None
    return row


def format_table(rows: list[BenchRow]) -> str:
    """A fixed-width text table of rows (errors in place of numbers where the gate failed)."""
    head = (
        "op",
        "provider",
        "shape",
        "dtype",
        "median ms",
        "p20-p80 ms",
        "peak MiB",
        "GB/s",
        "TFLOP/s",
        "% roof",
        "max err",
    )
    lines = []
    for r in rows:
        shape = "x".join(str(v) for v in r.shape.values())
        if r.ok:
            cells = (
                r.op,
                r.provider,
                shape,
                r.dtype,
                f"{r.ms_median:.3f}",
                f"{r.ms_p20:.3f}-{r.ms_p80:.3f}",
                f"{r.peak_mem_bytes / 2**20:.1f}",
                f"{r.gbps:.1f}" if r.gbps is not None else "-",
                f"{r.tflops:.2f}" if r.tflops is not None else "-",
                f"{r.extra['roofline_pct']:.0f}% {r.extra['roofline']}" if "roofline_pct" in r.extra else "-",
                f"{r.max_err:.1e}",
            )
        else:
            cells = (r.op, r.provider, shape, r.dtype, "-", "-", "-", "-", "-", "-", r.error or "failed")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    table = [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*c) for c in lines)]
    return "\n".join(line.rstrip() for line in table)
