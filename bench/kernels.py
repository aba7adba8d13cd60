"""Kernel micro-benchmarks: our fused ops against the eager reference (and optionally torch.compile).

A registry of ops × providers × shapes, measured by `bench.harness` (correctness gate against the
reference with `kernels.testing` tolerances, median and p20/p80 time, peak extra memory, GB/s):

    token_logprobs   forward, no grad               bytes moved ≈ N·V·b       (read the logits once)
    flow_grpo_loss   forward + backward + metrics   bytes moved ≈ 3·N·V·b     (read twice, write d logits)

with b the bytes per logit. Providers: `ours` (`kernels.*`, impl="auto": Triton on CUDA, the chunked
torch path on CPU), `reference` (`kernels.reference`, eager, float32 upcast, autograd) and
`compiled` (`torch.compile` of the reference; not run by default: compiling takes a while on CPU).

    .venv/bin/python -m bench.kernels --help
    .venv/bin/python -m bench.kernels --shapes 128x32000 --dtype bfloat16 --repeats 5

Prints a table, then one JSON line with every row and the conditions (device, versions).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton

import kernels
from bench.harness import BenchRow, format_table, run_case
from kernels import reference
from kernels.testing import assert_close, max_error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHAPES = {"cpu": "64x32000,512x4096", "cuda": "4096x32000,8192x151936"}
LOSS_KWARGS = {"kl_coef": 0.001, "kl_type": "k3", "entropy_coef": 0.0, "clip_ratio_c": 3.0, "temperature": 1.0}

Inputs = dict[str, Any]
Provider = Callable[[Inputs], Any]


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op: how to build inputs, run each provider, compare, and count bytes."""

    name: str
    make_inputs: Callable[[int, int, torch.dtype, torch.device], Inputs]
    providers: dict[str, Provider]
    compare: Callable[[Any, Any, torch.dtype], float]  # max error, or AssertionError
    bytes_moved: Callable[[int, int, torch.dtype], int]


def _logits_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 2).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return {"logits": logits, "targets": targets}


def _loss_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    inp = _logits_inputs(n, v, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        logp = kernels.token_logprobs(inp["logits"], inp["targets"])
    inp["old_logprobs"] = logp + (torch.randn(n, generator=g) * 0.3).to(device)
    inp["ref_logprobs"] = logp + (torch.randn(n, generator=g) * 0.3).to(device)
    inp["advantages"] = torch.randn(n, generator=g).to(device)
    inp["loss_mask"] = (torch.rand(n, generator=g) > 0.1).to(device)
    seqs = max(1, n // 512)
    cu = torch.linspace(0, n, seqs + 1).round().to(torch.int32)
    inp["cu_seqlens"] = cu.to(device)
    inp["logits"].requires_grad_()
    return inp


def _token_logprobs_provider(fn: Callable[..., torch.Tensor]) -> Provider:
    def run(inp: Inputs) -> torch.Tensor:
        with torch.no_grad():
            return fn(inp["logits"], inp["targets"])

    return run


def _loss_provider(fn: Callable[..., kernels.LossOutput]) -> Provider:
    def run(inp: Inputs) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        logits = inp["logits"]
        logits.grad = None
        out = fn(**inp, **LOSS_KWARGS)
        out.loss.backward()
        return out.loss.detach(), out.metrics, logits.grad

    return run


def _compare_logprobs(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    assert_close(actual, expected, dtype=torch.float32, name="logp")  # float32 outputs for every input dtype
    return max_error(actual, expected)


def _compare_loss(actual, expected, dtype: torch.dtype) -> float:
    loss, metrics, grad = actual
    e_loss, e_metrics, e_grad = expected
    assert_close(loss, e_loss, dtype=torch.float32, name="loss")
    for key, val in e_metrics.items():
        assert_close(metrics[key], val, dtype=torch.float32, name=f"metric {key}")
    scale = max(e_grad.abs().max().item(), 1e-12)
    assert_close(grad, e_grad, dtype=dtype, name="d logits", scale=scale)
    return max(max_error(loss, e_loss), max_error(grad, e_grad) / scale)


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    compiled = None

    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args, **kwargs)

    return run


OPS: dict[str, OpSpec] = {
    "token_logprobs": OpSpec(
        name="token_logprobs",
        make_inputs=_logits_inputs,
        providers={
            "ours": _token_logprobs_provider(kernels.token_logprobs),
            "reference": _token_logprobs_provider(reference.token_logprobs),
            "compiled": _token_logprobs_provider(_compiled(reference.token_logprobs)),
        },
        compare=_compare_logprobs,
        bytes_moved=lambda n, v, dtype: n * v * dtype.itemsize + n * 12,
    ),
    "flow_grpo_loss": OpSpec(
        name="flow_grpo_loss",
        make_inputs=_loss_inputs,
        providers={
            "ours": _loss_provider(kernels.flow_grpo_loss),
            "reference": _loss_provider(reference.flow_grpo_loss),
            "compiled": _loss_provider(_compiled(reference.flow_grpo_loss)),
        },
        compare=_compare_loss,
        bytes_moved=lambda n, v, dtype: 3 * n * v * dtype.itemsize + n * 40,
    ),
}
DEFAULT_PROVIDERS = ("ours", "reference")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'64x32000,512x4096' → [(64, 32000), (512, 4096)]."""
    shapes = []
    for part in text.split(","):
        try:
            n, v = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {part!r} is not NxV (e.g. 512x32000)") from None
        if n < 1 or v < 1:
            raise argparse.ArgumentTypeError(f"shape {part!r}: N and V must be >= 1")
        shapes.append((n, v))
    return shapes


def run(
    ops: list[str],
    providers: list[str],
    shapes: list[tuple[int, int]],
    dtype: torch.dtype,
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
) -> list[BenchRow]:
    """Every op × shape × provider; the reference runs first and is what the gate compares against."""
    rows = []
    for op_name in ops:
        spec = OPS[op_name]
        for n, v in shapes:
            inp = spec.make_inputs(n, v, dtype, device)
            try:
                expected = spec.providers["reference"](inp)
            except torch.OutOfMemoryError:
                expected = None
            for provider in providers:
                fn = spec.providers[provider]

                def gate(out: Any, spec: OpSpec = spec, expected: Any = expected) -> float:
                    if expected is None:
                        raise AssertionError("no reference result to compare with (the reference ran out of memory)")
                    return spec.compare(out, expected, dtype)

                rows.append(
                    run_case(
                        op=op_name,
                        provider=provider,
                        shape={"N": n, "V": v},
                        dtype=dtype,
                        device=device,
                        fn=lambda fn=fn, inp=inp: fn(inp),
                        gate=gate,
                        bytes_moved=spec.bytes_moved(n, v, dtype),
                        warmup=warmup,
                        repeats=repeats,
                    )
                )
            del inp, expected
    return rows


def conditions(device: torch.device) -> dict[str, Any]:
    info = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops (default: all of {list(OPS)})")
    parser.add_argument(
        "--providers",
        default=",".join(DEFAULT_PROVIDERS),
        help="comma-separated providers: ours, reference, compiled (default: ours,reference)",
    )
    parser.add_argument("--shapes", default=None, help=f"comma-separated NxV (default: {DEFAULT_SHAPES})")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="logits dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    ops = [o for o in args.ops.split(",") if o]
    providers = [p for p in args.providers.split(",") if p]
    for o in ops:
        if o not in OPS:
            print(f"error: unknown op {o!r}; known: {list(OPS)}", file=sys.stderr)
            return 2
    for p in providers:
        if any(p not in OPS[o].providers for o in ops):
            print(f"error: unknown provider {p!r}; known: {sorted(OPS[ops[0]].providers)}", file=sys.stderr)
            return 2
    try:
        shapes = parse_shapes(args.shapes or DEFAULT_SHAPES[device.type])
    except argparse.ArgumentTypeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    rows = run(ops, providers, shapes, dtype, device, warmup=args.warmup, repeats=args.repeats)
    cond = conditions(device)
    print(f"# {cond['device']}, torch {cond['torch']}, triton {cond['triton']}, {cond['cpu_threads']} CPU threads")
    print(format_table(rows))
    print(json.dumps({"bench": "kernels", "conditions": cond, "rows": [r.as_dict() for r in rows]}))
    # a reference that runs out of memory is a result; a wrong or crashing provider is a failure
    return 0 if all(r.ok or (r.error or "").startswith("out of memory") for r in rows) else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
