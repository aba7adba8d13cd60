"""`flowgrpo bench ceilings`: the device's ceilings, measured at the start of a GPU session.

The figures the session's kernel, allocator and step numbers are judged against (issue 21):

    copy GB/s        device-to-device `copy_` of a --copy-gib GiB buffer; bytes = 2 × size (read + write)
    matmul TFLOP/s   products in --dtype at the LM-head shapes of `flowgrpo bench kernels`, for each N of
                     --tokens and d of --hidden at V = --vocab, in the three orientations the fused loss runs:
                         logits    [N, d] @ [d, V]   (forward, and the recomputed logits in backward)
                         d_hidden  [N, V] @ [V, d]
                         d_weight  [V, N] @ [N, d]
                     FLOP = 2·N·d·V each; and the square n×n product (--square) as the plain reference rate
    pinned GB/s      CUDA only: host→device and device→host `copy_` of a pinned --pinned-gib GiB buffer (the
                     path of offload, allocator pause/resume and weight sync); bytes = size

Each figure is the median of --repeats calls after --warmup untimed ones, timed with device events
(`bench.harness.time_call`), on random normal inputs (never zeros: a product of zeros runs faster).
On CPU the same code runs at whatever sizes are given (the test runs it with small ones); the pinned
copies are skipped there. `--dry-run` checks the arguments and prints the plan without allocating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import torch

from bench import report
from bench.harness import time_call

GiB = 1 << 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ORIENTATIONS = ("logits", "d_hidden", "d_weight")


def parse_sizes(text: str, flag: str, *, integer: bool) -> list[float]:
    """'1,4' or '4k,16k' (integer sizes) → a list of positive sizes; ValueError naming the flag."""
    out: list[float] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            v = int(part[:-1]) * 1024 if integer and part.endswith("k") else (int(part) if integer else float(part))
        except ValueError:
            raise ValueError(f"{flag} {part!r} is not a {'count (e.g. 4096 or 4k)' if integer else 'size'}") from None
        if v <= 0:
            raise ValueError(f"{flag} needs sizes > 0, got {part!r}")
        out.append(v)
    if not out:
        raise ValueError(f"{flag} is empty")
    return out


def _median_s(fn, device: torch.device, warmup: int, repeats: int) -> float:
    return statistics.median(time_call(fn, device=device, warmup=warmup, repeats=repeats)) * 1e-3


def copy_row(device: torch.device, nbytes: int, warmup: int, repeats: int) -> dict[str, Any]:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    s = _median_s(lambda: dst.copy_(src), device, warmup, repeats)
    return {"bytes": nbytes, "seconds": s, "gbps": 2 * nbytes / s / 1e9}


def matmul_rows(
    device: torch.device, dtype: torch.dtype, n: int, d: int, v: int, warmup: int, repeats: int
) -> list[dict[str, Any]]:
    """The three LM-head products at (N, d, V); the inputs are built once and reused."""
    h = torch.randn(n, d, device=device, dtype=dtype)
    w = torch.randn(v, d, device=device, dtype=dtype)
    g = torch.randn(n, v, device=device, dtype=dtype)
    calls = {"logits": lambda: h @ w.t(), "d_hidden": lambda: g @ w, "d_weight": lambda: g.t() @ h}
    rows = []
    for name in ORIENTATIONS:
        s = _median_s(calls[name], device, warmup, repeats)
        rows.append({"op": name, "N": n, "d": d, "V": v, "seconds": s, "tflops": 2 * n * d * v / s / 1e12})
    return rows


def square_row(device: torch.device, dtype: torch.dtype, n: int, warmup: int, repeats: int) -> dict[str, Any]:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = _median_s(lambda: a @ b, device, warmup, repeats)
    return {"op": "square", "N": n, "d": n, "V": n, "seconds": s, "tflops": 2 * n**3 / s / 1e12}


def pinned_rows(device: torch.device, nbytes: int, warmup: int, repeats: int) -> list[dict[str, Any]]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rows = []
    for direction, fn in (
        ("h2d", lambda: dev.copy_(host, non_blocking=True)),
        ("d2h", lambda: host.copy_(dev, non_blocking=True)),
    ):
        s = _median_s(fn, device, warmup, repeats)
        rows.append({"direction": direction, "bytes": nbytes, "seconds": s, "gbps": nbytes / s / 1e9})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="matmul dtype (default bfloat16)")
    parser.add_argument("--tokens", default="4k,16k", help="comma-separated N of the LM-head products (default 4k,16k)")
    parser.add_argument("--hidden", default="1536,3584", help="comma-separated d (default 1536,3584)")
    parser.add_argument("--vocab", type=int, default=151_936, help="V (default 151936)")
    parser.add_argument("--square", type=int, default=8192, help="n of the square product (default 8192)")
    parser.add_argument("--copy-gib", default="1,4", help="comma-separated device copy sizes in GiB (default 1,4)")
    parser.add_argument("--pinned-gib", default="1", help="comma-separated pinned copy sizes in GiB (default 1)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--save", nargs="?", const="", default=None, metavar="PATH", help="write the result JSON")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, measure nothing")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:
            raise ValueError("--device cuda but no CUDA device is available")
        tokens = [int(x) for x in parse_sizes(args.tokens, "--tokens", integer=True)]
        hidden = [int(x) for x in parse_sizes(args.hidden, "--hidden", integer=True)]
        copy_gib = parse_sizes(args.copy_gib, "--copy-gib", integer=False)
        pinned_gib = parse_sizes(args.pinned_gib, "--pinned-gib", integer=False)
        if args.vocab < 1 or args.square < 1:
            raise ValueError(f"need --vocab >= 1 and --square >= 1, got {args.vocab} and {args.square}")
        if args.warmup < 0 or args.repeats < 1:
            raise ValueError(f"need --warmup >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    if args.dry_run:
        print(
            f"# dry run: ceilings on {device.type}: copy {copy_gib} GiB; {args.dtype} matmul {args.square}^3 and "
            f"{ORIENTATIONS} at N={tokens} x d={hidden} x V={args.vocab}; "
            + (f"pinned {pinned_gib} GiB" if device.type == "cuda" else "no pinned copies (CPU)")
        )
        return 0
    cond = report.conditions(device)
    w, r = args.warmup, args.repeats
    copies = [copy_row(device, int(g * GiB) // 4 * 4, w, r) for g in copy_gib]
    matmuls = [square_row(device, dtype, args.square, w, r)]
    for n in tokens:
        for d in hidden:
            matmuls += matmul_rows(device, dtype, n, d, args.vocab, w, r)
    pinned = [] if device.type != "cuda" else [x for g in pinned_gib for x in pinned_rows(device, int(g * GiB), w, r)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(report.conditions_line(cond))
    for c in copies:
        print(f"copy      {c['bytes'] / GiB:6.2f} GiB  {c['gbps']:9.1f} GB/s (read + write)")
    for m in matmuls:
        print(
            f"matmul    {m['op']:<9} N={m['N']:<6} d={m['d']:<5} V={m['V']:<7} {m['tflops']:8.2f} TFLOP/s ({args.dtype})"
        )
    for p in pinned:
        print(f"pinned    {p['direction']}  {p['bytes'] / GiB:6.2f} GiB  {p['gbps']:9.1f} GB/s")
    payload = {
        "bench": "ceilings",
        "conditions": cond,
        "dtype": args.dtype,
        "copy": copies,
        "matmul": matmuls,
        "pinned": pinned,
        "copy_gbps": max(c["gbps"] for c in copies),
        "matmul_tflops": max(m["tflops"] for m in matmuls),
    }
    if args.save is not None:
        print(f"# saved {report.save(payload, 'ceilings', args.save or None)}")
    print(json.dumps(payload))
    return 0
