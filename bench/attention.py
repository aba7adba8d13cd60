"""`flowgrpo bench attention`: the packed-attention backends on packs of planner-turn lengths.

One attention layer's call (`engine.attention`'s backends, the ones that can run here) on one packed
row of `--tokens` tokens: sequence lengths drawn from a seeded uniform distribution over
[--min-len, --max-len] (planner turns: prompt + response) until the row is full, the last one cut
to fit. Heads and head size of `--shape` (qwen2.5-1.5b: 12 query / 2 KV heads of 128; smollm2: 9 / 3
of 64). Per backend: forward, and forward + backward where the backend has a backward here
(FlexAttention has none on CPU), each timed by `bench.harness` (correctness gate against
SDPA per sequence on float32 copies of the same inputs, with the tolerance of `kernels.testing`;
median and p20/p80 ms; peak extra memory). FlexAttention's block mask is built once per packed
forward for all layers, so it is timed as its own row (`block_mask`), not inside the layer call.
GFLOP/s (the JSON: tflops) counts causal attention only: 4·D·H·n(n+1)/2 per sequence forward, 2.5x that backward.
The header names the backend `auto` picks here. Prints a table, the conditions and a last-line JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys

import torch

from bench import report
from bench.harness import BenchRow, peak_memory, percentile, time_call
from engine.attention import (
    BACKENDS,
    Packed,
    choose_backend,
    packed_backend,
    unavailable_reason,
)
from engine.model import resolve_dtype
from kernels.testing import assert_close, max_error

SHAPES = {"qwen2.5-1.5b": (12, 2, 128), "qwen2.5-7b": (28, 4, 128), "smollm2": (9, 3, 64)}


def pack_lengths(tokens: int, lo: int, hi: int, seed: int) -> list[int]:
    """Seeded lengths uniform in [lo, hi] filling exactly `tokens` (the last cut to fit)."""
    rng = random.Random(seed)
    out: list[int] = []
    left = tokens
    while left > 0:
        n = min(rng.randint(lo, hi), left)
        out.append(n)
        left -= n
    return out


def measure(op: str, provider: str, fn, gate, *, shape, dtype, device, flops: int, repeats: int) -> BenchRow:
    """Gate, time (`bench.harness.time_call`, 2 warm-up calls), then peak extra memory where it can be traced
    (the CPU allocation tracker cannot follow FlexAttention's higher-order op: no figure there)."""
    row = BenchRow(op, provider, shape, str(dtype).removeprefix("torch."), str(device), ok=False, flops=flops)
    try:
        row.max_err = gate(fn())
    except (AssertionError, RuntimeError, NotImplementedError) as e:
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return row
    times = time_call(fn, device=device, warmup=2, repeats=repeats)
    row.ok = True
    row.ms_median, row.ms_p20, row.ms_p80 = statistics.median(times), percentile(times, 20), percentile(times, 80)
    row.tflops = flops / (row.ms_median * 1e-3) / 1e12 if flops and row.ms_median > 0 else None
    try:
        row.peak_mem_bytes, row.memory_method = peak_memory(fn, device=device)
    except NotImplementedError:
        row.memory_method = "not traceable here"
    return row


def format_rows(rows: list[BenchRow]) -> str:
    lines = [
        f"{'op':<18} {'backend':<18} {'median ms':>10} {'p20-p80 ms':>17} {'GFLOP/s':>9} {'peak MiB':>9} {'max err':>8}"
    ]
    for r in rows:
        if not r.ok:
            lines.append(f"{r.op:<18} {r.provider:<18} {r.error}")
            continue
        tf = "-" if r.tflops is None else f"{r.tflops * 1e3:.1f}"
        mem = "-" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:.1f}"
        lines.append(
            f"{r.op:<18} {r.provider:<18} {r.ms_median:>10.3f} {f'{r.ms_p20:.3f}-{r.ms_p80:.3f}':>17} {tf:>9} "
            f"{mem:>9} {r.max_err:>8.1e}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokens", type=int, default=None, help="tokens in the packed row (default 8192 CUDA, 1024 CPU)"
    )
    parser.add_argument("--min-len", type=int, default=None, help="shortest sequence (default 128 CUDA, 32 CPU)")
    parser.add_argument("--max-len", type=int, default=None, help="longest sequence (default 2048 CUDA, 256 CPU)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b", help="heads and head size")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default bf16 CUDA, fp32 CPU"
    )
    parser.add_argument(
        "--backends", default=None, help=f"comma-separated of {list(BACKENDS)} (default: every available)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 20 CUDA, 3 CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", nargs="?", const="", default=None, metavar="PATH", help="write the JSON")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, run nothing")


def main(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    tokens = args.tokens or (8192 if cuda else 1024)
    lo = args.min_len or (128 if cuda else 32)
    hi = args.max_len or (2048 if cuda else 256)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if cuda else "float32"))
    repeats = args.repeats or (20 if cuda else 3)
    heads, kv_heads, head_dim = SHAPES[args.shape]
    error = None
    if tokens < 1 or lo < 1 or hi < lo or repeats < 1:
        error = f"need --tokens >= 1, 1 <= --min-len <= --max-len, --repeats >= 1 (got {tokens}, {lo}, {hi}, {repeats})"
    runnable = {b: unavailable_reason(b, device, dtype, trainable=False) for b in BACKENDS}
    wanted = [b for b in (args.backends.split(",") if args.backends else BACKENDS) if b]
    for b in wanted:
        if b not in BACKENDS:
            error = error or f"unknown backend {b!r}; choose from {list(BACKENDS)}"
        elif args.backends and runnable[b]:
            error = error or f"backend {b!r} cannot run here: {runnable[b]}"
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    backends = [b for b in wanted if not runnable[b]]
    lengths = pack_lengths(tokens, lo, hi, args.seed)
    dt = str(dtype).removeprefix("torch.")
    auto = packed_backend(device, dtype)
    head = (
        f"# attention: auto picks {auto} here ({device}, {dt}); timing {backends}; one packed row of {tokens} tokens, "
        f"{len(lengths)} sequences of {lo}..{hi} (seed {args.seed}), {args.shape}: {heads} query / {kv_heads} KV "
        f"heads of {head_dim}"
    )
    if args.dry_run:
        print(head)
        return 0
    print(head, flush=True)
    bounds = [0, *itertools.accumulate(lengths)]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(args.seed)
    # transformers hands the heads over as [1, T, H, D] storage viewed as [1, H, T, D]
    q, k, v = (
        torch.randn(1, tokens, h, head_dim, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
        for h in (heads, kv_heads, kv_heads)
    )
    up = torch.randn(1, tokens, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    scale = head_dim**-0.5
    base = Packed(cu, bounds, max(lengths), scale, 0.0)
    ref_backend = choose_backend(device, torch.float32, "sdpa_per_sequence")
    with torch.no_grad():
        ref = ref_backend.run(q.float(), k.float(), v.float(), base)

    def gate(out: torch.Tensor) -> float:
        assert_close(out, ref, dtype=dtype, name="attention out")
        return max_error(out, ref)

    attn_flops = sum(4 * head_dim * heads * n * (n + 1) // 2 for n in lengths)
    shape = {"tokens": tokens, "sequences": len(lengths), "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    common = {"shape": shape, "dtype": dtype, "device": device, "repeats": repeats}
    rows = []
    for name in backends:
        backend = choose_backend(device, dtype, name, trainable=False)
        p = Packed(cu, bounds, max(lengths), scale, 0.0, backend.prepare(bounds, device).get("flex_block_mask"))
        if name == "flex":
            prepare = lambda backend=backend: backend.prepare(bounds, device)
            rows.append(measure("block_mask", name, prepare, lambda _: 0.0, flops=0, **common))

        def forward(backend=backend, p=p):
            with torch.no_grad():
                return backend.run(q, k, v, p)

        rows.append(measure("attention_fwd", name, forward, gate, flops=attn_flops, **common))
        if unavailable_reason(name, device, dtype, trainable=True):
            continue  # no backward here
        qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))

        def fwd_bwd(backend=backend, p=p, qg=qg, kg=kg, vg=vg):
            out = backend.run(qg, kg, vg, p)
            out.backward(up)
            return out.detach()

        rows.append(measure("attention_fwd_bwd", name, fwd_bwd, gate, flops=int(3.5 * attn_flops), **common))
    print(format_rows(rows))
    cond = report.conditions(device)
    print(report.conditions_line(cond))
    payload = {
        "bench": "attention",
        "conditions": cond,
        "auto": auto,
        "lengths": lengths,
        "rows": [r.as_dict() for r in rows],
    }
    if args.save is not None:
        print(f"# saved {report.save(payload, 'attention', args.save or None)}")
    print(json.dumps(payload))
    return 0 if all(r.ok for r in rows) else 1
