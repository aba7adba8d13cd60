"""`flowgrpo bench allocator`: pause/resume bandwidth of the VMM allocator against plain pinned copies (CUDA).

For each size in --gib: fill a tagged region (`engine.allocator.VMMAllocator`) with that many bytes
of random data, then `repeats` times: pause it with a pinned host backup (device → host copy, unmap,
release) and resume it (map, host → device copy). Reported per size: median seconds and GB/s of
pause and of resume, device memory NVML sees freed by the pause, and the ratio of each direction's
GB/s to a plain pinned `copy_` of the same byte count in the same direction (the ceiling the
allocator's copies could reach), measured in the same run. The contents are checked bit for bit
after the last resume; a mismatch prints no speed and exits 1. The first pause/resume (which pins
the host buffers) is a warm-up, not timed; `keep_host_backup=True` keeps the pinned buffers between
repeats, as the training loop does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench import report
from engine.device_memory import nvml

GiB = 1 << 30


def _pinned_copy_gbps(nbytes: int, to_device: bool, repeats: int) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if to_device:
            dev.copy_(host, non_blocking=True)
        else:
            host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        if i:  # the first copy is a warm-up
            times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def measure(gib: float, repeats: int) -> dict:
    from engine.allocator import VMMAllocator

    vmm = VMMAllocator.get()
    nbytes = int(gib * GiB) // 4 * 4
    tag = f"bench-{gib:g}GiB"
    with vmm.region(tag):
        x = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
    checksum = int(x.sum(dtype=torch.int64).item())
    vmm.pause(tag, backup=True)  # warm-up: pins the host backup
    vmm.resume(tag, keep_host_backup=True)
    pause_s, resume_s, freed = [], [], []
    for _ in range(repeats):
        used = nvml().used(torch.cuda.current_device())
        t0 = time.perf_counter()
        released = vmm.pause(tag, backup=True)
        pause_s.append(time.perf_counter() - t0)
        after = nvml().used(torch.cuda.current_device())
        if used is not None and after is not None:
            freed.append(used[0] - after[0])
        t0 = time.perf_counter()
        vmm.resume(tag, keep_host_backup=True)
        torch.cuda.synchronize()
        resume_s.append(time.perf_counter() - t0)
    ok = int(x.sum(dtype=torch.int64).item()) == checksum
    vmm.release_host_backup(tag)
    del x
    torch.cuda.empty_cache()
    row = {"gib": gib, "bytes": nbytes, "released_bytes": released, "ok": ok}
    if not ok:
        row["error"] = "contents changed across pause/resume"
        return row
    d2h, h2d = _pinned_copy_gbps(nbytes, False, repeats), _pinned_copy_gbps(nbytes, True, repeats)
    row |= {
        "pause_s": statistics.median(pause_s),
        "resume_s": statistics.median(resume_s),
        "pause_gbps": nbytes / statistics.median(pause_s) / 1e9,
        "resume_gbps": nbytes / statistics.median(resume_s) / 1e9,
        "pinned_d2h_gbps": d2h,
        "pinned_h2d_gbps": h2d,
        "nvml_freed_bytes": statistics.median(freed) if freed else None,
    }
    row["pause_pct"] = 100 * row["pause_gbps"] / d2h
    row["resume_pct"] = 100 * row["resume_gbps"] / h2d
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gib", default="1,4,8", help="comma-separated region sizes in GiB (default 1,4,8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--save", nargs="?", const="", default=None, metavar="PATH", help="write the result JSON")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, measure nothing")


def main(args: argparse.Namespace) -> int:
    try:
        sizes = [float(s) for s in args.gib.split(",") if s.strip()]
    except ValueError:
        print(f"error: --gib {args.gib!r} is not a comma-separated list of sizes in GiB", file=sys.stderr)
        return 2
    if not sizes or min(sizes) <= 0 or args.repeats < 1:
        print("error: need sizes > 0 (--gib) and --repeats >= 1", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"# dry run: pause/resume of {sizes} GiB regions, {args.repeats} repeats, against pinned copies")
        return 0
    if not torch.cuda.is_available():
        print(
            "error: the VMM allocator benchmark needs a CUDA device (torch.cuda.is_available() is False)",
            file=sys.stderr,
        )
        return 2
    cond = report.conditions(torch.device("cuda"))
    rows = [measure(g, args.repeats) for g in sizes]
    print(report.conditions_line(cond))
    print("GiB    pause s  GB/s (% of pinned D2H)   resume s  GB/s (% of pinned H2D)   NVML freed GiB")
    for r in rows:
        if not r["ok"]:
            print(f"{r['gib']:<6g} {r['error']}")
            continue
        freed = "-" if r["nvml_freed_bytes"] is None else f"{r['nvml_freed_bytes'] / GiB:.2f}"
        print(
            f"{r['gib']:<6g} {r['pause_s']:.3f}    {r['pause_gbps']:.1f} ({r['pause_pct']:.0f}%)"
            f"            {r['resume_s']:.3f}     {r['resume_gbps']:.1f} ({r['resume_pct']:.0f}%)            {freed}"
        )
    payload = {"bench": "allocator", "conditions": cond, "rows": rows}
    if args.save is not None:
        print(f"# saved {report.save(payload, 'allocator', args.save or None)}")
    print(json.dumps(payload))
    return 0 if all(r["ok"] for r in rows) else 1
