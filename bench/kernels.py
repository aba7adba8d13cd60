"""`flowgrpo bench kernels`: our fused ops against the eager reference, torch.compile and Liger-Kernel.

A registry (`OPS`) of ops × providers × shapes, measured by `bench.harness` (correctness gate with
`kernels.testing` tolerances, median and p20/p80 time, peak extra memory, GB/s, TFLOP/s) and judged
against the roofline measured in the same run (`bench.roofline`: copy GB/s, matmul TFLOP/s):

    token_logprobs          [N, V]     forward, no grad               bytes ≈ N·V·b       (read the logits once)
    flow_grpo_loss          [N, V]     forward + backward + metrics   bytes ≈ 3·N·V·b     (read twice, write d logits)
    linear_token_logprobs   [N, d, V]  forward, no grad (old/ref)     FLOP = 2·N·V·d      (the LM head fused)
    linear_flow_grpo_loss   [N, d, V]  forward + backward + metrics   FLOP = 8·N·V·d      (logits, recomputed logits,
                                                                                         d hidden, d weight)

with b the bytes per logit; "% roof" is GB/s over copy GB/s for the logits ops and TFLOP/s over matmul
TFLOP/s for the LM-head ops. Providers:

    ours         `kernels.*`, impl="auto": Triton on CUDA, the chunked torch path on CPU; for the linear ops
                 also algorithm="auto" (`kernels.linear_chunked.DEFAULT_ALGORITHM`, recorded as the row's
                 "algorithm")
    fused        linear ops, algorithm="fused": the fused Triton kernels (`kernels.linear_token_logprobs`)
    chunked      linear ops, algorithm="chunked": cuBLAS GEMMs per chunk of rows with the in-place epilogue
                 that forms d logits in the forward (`kernels.linear_chunked`); by default each linear op
                 runs ours and whichever of fused / chunked ours is not
    reference    `kernels.reference`: eager, float32 upcast of the logits, autograd (what RL frameworks do)
    compiled     `torch.compile` of the reference (default on CUDA; opt-in on CPU, where compiling takes minutes)
    materialize  linear ops: the LM head as a matmul, then the fused `kernels.token_logprobs` /
                 `kernels.flow_grpo_loss` on the [N, V] logits
    liger        linear_flow_grpo_loss: Liger-Kernel's chunked `LigerFusedLinearGRPOLoss`, when installed

The loss inputs are sequences of SEQ_LEN tokens with one advantage each (10% of tokens masked), the
shape GRPO gives and the one Liger accepts. The linear ops are gated against the reference run on
float32 copies of the inputs (the definition with float32 logits, which ours computes); the bf16
`reference` and `materialize` round the logits to bf16 and pass with the bf16 tolerance. A row whose
gate fails shows the error and no speed.

Shapes: NxV for the logits ops, NxdxV or a preset name for the linear ops (`LM_HEAD_PRESETS`, the
Qwen2.5 LM heads, once per token count of --tokens, default `DEFAULT_TOKENS`). Each op runs the
shapes of its rank.

    flowgrpo bench kernels --shapes 128x32000 --dtype bfloat16 --repeats 5
    flowgrpo bench kernels --ops linear_flow_grpo_loss --shapes qwen2.5-7b --tokens 1k,4k,16k,32k --save
    flowgrpo bench kernels --compare bench/results/nvidia-h100-80gb-hbm3-2026-11-23.json

Prints the conditions (device, driver, versions, commit), the roofline, a table, the comparison when
asked, then one JSON line with all of it; `--save` writes that JSON to bench/results/.

    flowgrpo bench kernels --compile-report [--dtype bfloat16]

times nothing: it compiles every Triton kernel as its wrapper launches it for sm_90, without a GPU,
and prints registers, spills, shared memory and tensor-core use (`bench.compile_report`); exit 1 on
a spill in a bfloat16 configuration or more than 228 KiB of shared memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import kernels
from bench import report, roofline
from bench.harness import BenchRow, format_table, run_case
from bench.roofline import Roofline
from kernels import reference
from kernels.linear_chunked import resolve_algorithm
from kernels.testing import assert_close, max_error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (d, V) of LM heads; N comes from --tokens
LM_HEAD_PRESETS = {"qwen2.5-1.5b": (1536, 151_936), "qwen2.5-7b": (3584, 152_064)}
DEFAULT_TOKENS = {"cpu": (64,), "cuda": (1024, 4096, 16384, 32768)}
DEFAULT_SHAPES = {
    "cpu": "64x32000,512x4096,2048x128x2000,4096x64x32000",
    "cuda": "4096x32000,8192x151936,qwen2.5-1.5b,qwen2.5-7b",
}
SEQ_LEN = 256  # tokens per sequence in the loss inputs
LOSS_CONFIG = kernels.LossConfig(kl_coef=0.001, kl_type="k3", entropy_coef=0.0, clip_ratio_c=3.0, temperature=1.0)
LOGITS_DIMS = ("N", "V")
LINEAR_DIMS = ("N", "d", "V")

Inputs = dict[str, Any]
Shape = dict[str, int]
Provider = Callable[[Inputs], Any]


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op: how to build inputs, run each provider, compare, and count bytes and FLOPs."""

    name: str
    dims: tuple[str, ...]  # names of the shape's sizes, e.g. ("N", "V")
    make_inputs: Callable[[Shape, torch.dtype, torch.device], Inputs]
    providers: dict[str, Provider]
    compare: Callable[[Any, Any, torch.dtype], float]  # max error, or AssertionError
    bytes_moved: Callable[[Shape, torch.dtype], int]
    default_providers: tuple[str, ...] = ("ours", "reference")
    flops: Callable[[Shape], int] | None = None  # for compute-bound ops
    expected: Provider | None = None  # what the gate compares with (default: the "reference" provider)


def _logits_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    n, v = shape["N"], shape["V"]
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 2).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return {"logits": logits, "targets": targets}


def _per_token_loss_inputs(logp: torch.Tensor, g: torch.Generator, log_ratios: torch.Tensor | None = None) -> Inputs:
    """old/ref log-probs, advantages, mask and cu_seqlens around the current log-probs `logp`.

    Sequences of SEQ_LEN tokens (the last one shorter when N is not a multiple) with one advantage
    each, broadcast to its tokens as GRPO does; 10% of the tokens are masked out (prompt, tool output)."""
    n, device = logp.shape[0], logp.device
    if log_ratios is None:
        log_ratios = torch.randn(n, generator=g) * 0.3
    cu_seqlens = torch.tensor([*range(0, n, SEQ_LEN), n], dtype=torch.int32)
    lengths = cu_seqlens.diff()
    advantages = torch.repeat_interleave(torch.randn(len(lengths), generator=g), lengths)
    return {
        "old_logprobs": logp - log_ratios.to(device),
        "ref_logprobs": logp + (torch.randn(n, generator=g) * 0.3).to(device),
        "advantages": advantages.to(device),
        "loss_mask": (torch.rand(n, generator=g) > 0.1).to(device),
        "cu_seqlens": cu_seqlens.to(device),
    }


def _loss_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    inp = _logits_inputs(shape, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        logp = kernels.token_logprobs(inp["logits"], inp["targets"])
    inp |= _per_token_loss_inputs(logp, g)
    inp["logits"].requires_grad_()
    return inp


def _linear_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    """hidden [N, d], weight [V, d] (logits of std ≈ 2, no bias, as Qwen2's head), targets."""
    n, d, v = shape["N"], shape["d"], shape["V"]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(dtype).to(device)
    weight = (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(dtype).to(device)
    return {"hidden": hidden, "weight": weight, "targets": torch.randint(0, v, (n,), generator=g).to(device)}


# log(ratio) values at least 0.08 from the clip edges log 0.8 and log 1.3 and below the dual clip (log 3):
# rounding the logits to bf16 (the reference and materialize providers) moves logp by ≲ 0.04 and so
# never flips a token's clip state, which the gate would see as a gradient error on that row
_LOG_RATIOS = torch.tensor([-0.6, -0.1, 0.05, 0.15, 0.6])


def _linear_loss_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    inp = _linear_inputs(shape, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        logp = kernels.linear_token_logprobs(inp["hidden"], inp["weight"], inp["targets"])
    log_ratios = _LOG_RATIOS[torch.randint(0, len(_LOG_RATIOS), (shape["N"],), generator=g)]
    inp |= _per_token_loss_inputs(logp, g, log_ratios)
    inp["hidden"].requires_grad_()
    inp["weight"].requires_grad_()
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
        out = fn(**inp, config=LOSS_CONFIG)
        out.loss.backward()
        return out.loss.detach(), out.metrics, logits.grad

    return run


def _linear_logprobs_provider(fn: Callable[..., torch.Tensor]) -> Provider:
    def run(inp: Inputs) -> torch.Tensor:
        with torch.no_grad():
            return fn(inp["hidden"], inp["weight"], inp["targets"])

    return run


def _linear_loss_provider(fn: Callable[..., kernels.LossOutput]) -> Provider:
    def run(inp: Inputs) -> tuple[torch.Tensor, dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
        hidden, weight = inp["hidden"], inp["weight"]
        hidden.grad = weight.grad = None
        rest = {k: x for k, x in inp.items() if k not in ("hidden", "weight", "targets")}
        out = fn(hidden, weight, inp["targets"], **rest, config=LOSS_CONFIG)
        out.loss.backward()
        return out.loss.detach(), out.metrics, (hidden.grad, weight.grad)

    return run


def _algorithm(fn: Callable[..., Any], algorithm: str) -> Callable[..., Any]:
    return functools.partial(fn, algorithm=algorithm)


def _materialized_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return kernels.token_logprobs(F.linear(hidden, weight), targets)


def _materialized_loss(
    hidden, weight, targets, old_logprobs, advantages, loss_mask, config, **kwargs
) -> kernels.LossOutput:
    return kernels.flow_grpo_loss(
        F.linear(hidden, weight), targets, old_logprobs, advantages, loss_mask, config, **kwargs
    )


def _float32_inputs(provider: Provider) -> Provider:
    """`provider` on float32 copies of the inputs (leaves keep requires_grad): the float32 definition."""

    def run(inp: Inputs) -> Any:
        return provider(
            {
                k: x.detach().float().requires_grad_(x.requires_grad) if x.is_floating_point() else x
                for k, x in inp.items()
            }
        )

    return run


def _compare_logprobs(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    assert_close(actual, expected, dtype=torch.float32, name="logp")  # float32 outputs for every input dtype
    return max_error(actual, expected)


def _compare_loss(actual, expected, dtype: torch.dtype) -> float:
    loss, metrics, grad = actual
    e_loss, e_metrics, e_grad = expected
    assert_close(loss, e_loss, dtype=torch.float32, name="loss")
    for key, val in metrics.items():  # the keys a provider reports (Liger: kl, clipfrac)
        assert_close(val, e_metrics[key], dtype=torch.float32, name=f"metric {key}")
    scale = max(e_grad.abs().max().item(), 1e-12)
    assert_close(grad, e_grad, dtype=dtype, name="d logits", scale=scale)
    return max(max_error(loss, e_loss), max_error(grad, e_grad) / scale)


# The linear ops' loss and log-probs are compared with the input dtype's tolerance: the bf16 providers
# `reference` and `materialize` round the logits to bf16 (|logp error| up to ~|z|·2^-9), ours does not.
def _compare_linear_logprobs(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    assert_close(actual, expected, dtype=dtype, name="logp")
    return max_error(actual, expected)


def _compare_linear_loss(actual, expected, dtype: torch.dtype) -> float:
    loss, metrics, grads = actual
    e_loss, e_metrics, e_grads = expected
    assert_close(loss, e_loss, dtype=dtype, name="loss")
    for key, val in metrics.items():  # the keys a provider reports (Liger: kl, clipfrac)
        assert_close(val, e_metrics[key], dtype=dtype, name=f"metric {key}")
    err = max_error(loss, e_loss)
    for name, grad, e_grad in zip(("d hidden", "d weight"), grads, e_grads):
        scale = max(e_grad.abs().max().item(), 1e-12)
        assert_close(grad, e_grad, dtype=dtype, name=name, scale=scale)
        err = max(err, max_error(grad, e_grad) / scale)
    return err


def _liger_linear_loss_provider() -> Provider | None:
    """Liger-Kernel's chunked fused-linear GRPO loss (`LigerFusedLinearGRPOLoss`), None when not installed.

    Liger takes padded [S, T] sequences with one advantage each, has no dual clip and averages over
    masked tokens ("bnpo"): with the benchmark's inputs (sequences of SEQ_LEN tokens, per-sequence
    advantages, ratios below the dual-clip bound) that is the same loss as ours with token-mean
    aggregation. It reports two metrics, kl and clipfrac (the same definitions), which the gate checks.
    torch.compile of its per-chunk loss is on for CUDA (its default) and off on CPU (compile time)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    cache: dict[str, Any] = {}

    def run(inp: Inputs) -> tuple[torch.Tensor, dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
        hidden, weight = inp["hidden"], inp["weight"]
        hidden.grad = weight.grad = None
        device = hidden.device
        if str(device) not in cache:
            cache[str(device)] = LigerFusedLinearGRPOLoss(
                beta=LOSS_CONFIG.kl_coef,
                epsilon_low=0.2,
                epsilon_high=0.3,
                loss_type="bnpo",
                use_ref_model=True,
                compiled=device.type == "cuda",
                temperature=LOSS_CONFIG.temperature,
            )
        n, d = hidden.shape
        starts = inp["cu_seqlens"][:-1].long()
        s = len(starts)
        t = SEQ_LEN if s > 1 else n
        pad = s * t - n

        def padded(x: torch.Tensor) -> torch.Tensor:
            return x if pad == 0 else torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])

        loss, metrics = cache[str(device)](
            padded(hidden).view(s, t, d),
            weight,
            padded(inp["targets"]).view(s, t),
            padded(inp["loss_mask"].float()).view(s, t),
            inp["advantages"][starts],
            ref_per_token_logps=padded(inp["ref_logprobs"]).view(s, t),
            old_per_token_logps=padded(inp["old_logprobs"]).view(s, t),
        )
        loss.backward()
        kl, clipfrac = (float(m) for m in metrics)
        return loss.detach(), {"kl": kl, "clipfrac": clipfrac}, (hidden.grad, weight.grad)

    return run


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    compiled = None

    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args, **kwargs)

    return run


def _linear_bytes(shape: Shape, dtype: torch.dtype, passes: int) -> int:
    """hidden and weight read `passes` times (their gradients written once per extra pass), in the input dtype."""
    return passes * (shape["N"] + shape["V"]) * shape["d"] * dtype.itemsize


_LIGER_LOSS = _liger_linear_loss_provider()
ALGORITHMS = ("fused", "chunked")  # the two LM-head algorithms, each a provider of the linear ops

OPS: dict[str, OpSpec] = {
    "token_logprobs": OpSpec(
        name="token_logprobs",
        dims=LOGITS_DIMS,
        make_inputs=_logits_inputs,
        providers={
            "ours": _token_logprobs_provider(kernels.token_logprobs),
            "reference": _token_logprobs_provider(reference.token_logprobs),
            "compiled": _token_logprobs_provider(_compiled(reference.token_logprobs)),
        },
        compare=_compare_logprobs,
        bytes_moved=lambda s, dtype: s["N"] * s["V"] * dtype.itemsize + s["N"] * 12,
    ),
    "flow_grpo_loss": OpSpec(
        name="flow_grpo_loss",
        dims=LOGITS_DIMS,
        make_inputs=_loss_inputs,
        providers={
            "ours": _loss_provider(kernels.flow_grpo_loss),
            "reference": _loss_provider(reference.flow_grpo_loss),
            "compiled": _loss_provider(_compiled(reference.flow_grpo_loss)),
        },
        compare=_compare_loss,
        bytes_moved=lambda s, dtype: 3 * s["N"] * s["V"] * dtype.itemsize + s["N"] * 40,
    ),
    "linear_token_logprobs": OpSpec(
        name="linear_token_logprobs",
        dims=LINEAR_DIMS,
        make_inputs=_linear_inputs,
        providers={
            "ours": _linear_logprobs_provider(kernels.linear_token_logprobs),
            **{a: _linear_logprobs_provider(_algorithm(kernels.linear_token_logprobs, a)) for a in ALGORITHMS},
            "materialize": _linear_logprobs_provider(_materialized_logprobs),
            "reference": _linear_logprobs_provider(reference.linear_token_logprobs),
            "compiled": _linear_logprobs_provider(_compiled(reference.linear_token_logprobs)),
        },
        compare=_compare_linear_logprobs,
        bytes_moved=lambda s, dtype: _linear_bytes(s, dtype, 1),
        default_providers=("ours", "materialize", "reference"),
        flops=lambda s: 2 * s["N"] * s["d"] * s["V"],
        expected=_float32_inputs(_linear_logprobs_provider(reference.linear_token_logprobs)),
    ),
    "linear_flow_grpo_loss": OpSpec(
        name="linear_flow_grpo_loss",
        dims=LINEAR_DIMS,
        make_inputs=_linear_loss_inputs,
        providers={
            "ours": _linear_loss_provider(kernels.linear_flow_grpo_loss),
            **{a: _linear_loss_provider(_algorithm(kernels.linear_flow_grpo_loss, a)) for a in ALGORITHMS},
            "materialize": _linear_loss_provider(_materialized_loss),
            "reference": _linear_loss_provider(reference.linear_flow_grpo_loss),
            "compiled": _linear_loss_provider(_compiled(reference.linear_flow_grpo_loss)),
            **({"liger": _LIGER_LOSS} if _LIGER_LOSS is not None else {}),
        },
        compare=_compare_linear_loss,
        bytes_moved=lambda s, dtype: _linear_bytes(s, dtype, 3),
        default_providers=("ours", "materialize", "reference"),
        flops=lambda s: 8 * s["N"] * s["d"] * s["V"],
        expected=_float32_inputs(_linear_loss_provider(reference.linear_flow_grpo_loss)),
    ),
}
PROVIDERS = ("ours", *ALGORITHMS, "materialize", "reference", "compiled", "liger")


def default_providers(spec: OpSpec, device: torch.device) -> list[str]:
    """The op's defaults (for the linear ops, after ours the LM-head algorithm ours does not run on this
    device), plus torch.compile on CUDA (on CPU compiling takes minutes) and Liger where installed."""
    names = list(spec.default_providers)
    if "chunked" in spec.providers:
        ours = resolve_algorithm("auto", device)
        names.insert(1, next(a for a in ALGORITHMS if a != ours))
    extra = ("compiled",) if device.type == "cuda" else ()
    return [*names, *extra, *(("liger",) if "liger" in spec.providers else ())]


def parse_shapes(text: str, tokens: tuple[int, ...]) -> list[tuple[int, ...]]:
    """'64x32000,512x64x4096,qwen2.5-7b' → [(64, 32000), (512, 64, 4096), (n, 3584, 152064) for n in tokens]."""
    shapes = []
    for part in text.split(","):
        name = part.strip().lower()
        if name in LM_HEAD_PRESETS:
            shapes += [(n, *LM_HEAD_PRESETS[name]) for n in tokens]
            continue
        try:
            sizes = tuple(int(x) for x in name.split("x"))
        except ValueError:
            sizes = ()
        if len(sizes) not in (2, 3):
            raise argparse.ArgumentTypeError(
                f"shape {part!r} is not NxV (e.g. 512x32000), NxdxV (e.g. 512x1536x151936) "
                f"or a preset ({', '.join(LM_HEAD_PRESETS)})"
            )
        if min(sizes) < 1:
            raise argparse.ArgumentTypeError(f"shape {part!r}: every size must be >= 1")
        shapes.append(sizes)
    return shapes


def run(
    ops: list[str],
    providers: list[str] | None,
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
) -> list[BenchRow]:
    """Every op × shape of its rank × provider it has (None: its default providers); the gate's
    expected result is computed first."""
    rows = []
    for op_name in ops:
        spec = OPS[op_name]
        names = [p for p in (providers or default_providers(spec, device)) if p in spec.providers]
        for sizes in (s for s in shapes if len(s) == len(spec.dims)):
            shape = dict(zip(spec.dims, sizes))
            inp = spec.make_inputs(shape, dtype, device)
            try:
                expected = (spec.expected or spec.providers["reference"])(inp)
            except torch.OutOfMemoryError:
                expected = None
            for provider in names:
                fn = spec.providers[provider]

                def gate(out: Any, spec: OpSpec = spec, expected: Any = expected) -> float:
                    if expected is None:
                        raise AssertionError("no reference result to compare with (the reference ran out of memory)")
                    return spec.compare(out, expected, dtype)

                row = run_case(
                    op=op_name,
                    provider=provider,
                    shape=shape,
                    dtype=dtype,
                    device=device,
                    fn=lambda fn=fn, inp=inp: fn(inp),
                    gate=gate,
                    bytes_moved=spec.bytes_moved(shape, dtype),
                    flops=None if spec.flops is None else spec.flops(shape),
                    warmup=warmup,
                    repeats=repeats,
                )
                if "chunked" in spec.providers and provider in ("ours", *ALGORITHMS):
                    row.extra["algorithm"] = resolve_algorithm("auto" if provider == "ours" else provider, device)
                rows.append(row)
            del inp, expected
    return rows


def parse_tokens(text: str) -> tuple[int, ...]:
    """'1024,4k,32k' → (1024, 4096, 32768)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            n = int(part[:-1]) * 1024 if part.endswith("k") else int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--tokens {part!r} is not a token count (e.g. 1024 or 4k)") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"--tokens must be >= 1, got {n}")
        out.append(n)
    return tuple(out)


def add_roofline(rows: list[BenchRow], roof: Roofline) -> None:
    """Each gated row's share of the measured roofline: TFLOP/s over matmul for the LM-head ops, else GB/s over copy."""
    for r in rows:
        if not r.ok:
            continue
        if r.tflops is not None:
            r.extra["roofline"] = "matmul"
            r.extra["roofline_pct"] = 100 * r.tflops / roof.matmul_tflops
        elif r.gbps is not None:
            r.extra["roofline"] = "copy"
            r.extra["roofline_pct"] = 100 * r.gbps / roof.copy_gbps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops (default: all of {list(OPS)})")
    parser.add_argument(
        "--providers",
        default=None,
        help=f"comma-separated providers of {list(PROVIDERS)}, each op runs those it has "
        "(default: ours,reference, plus materialize for the linear ops, compiled on CUDA, liger where installed)",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated NxV, NxdxV or presets {list(LM_HEAD_PRESETS)}; each op runs those of its rank "
        f"(default: {DEFAULT_SHAPES})",
    )
    parser.add_argument(
        "--tokens",
        type=parse_tokens,
        default=None,
        help=f"comma-separated token counts N of the preset shapes, e.g. 1k,4k,32k (default: {DEFAULT_TOKENS})",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="logits dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-roofline", action="store_true", help="skip measuring the copy/matmul roofline")
    parser.add_argument(
        "--save",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write the result JSON (default path: bench/results/<device>-<date>.json)",
    )
    parser.add_argument("--compare", default=None, metavar="OLD.json", help="print speed-ups against a saved result")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, measure nothing")
    parser.add_argument(
        "--compile-report",
        action="store_true",
        help="instead of timing: compile every Triton kernel as its wrapper launches it for sm_90 (no GPU needed) and "
        "print registers, spills, shared memory and tensor-core use (bench.compile_report); --dtype restricts it",
    )


def main(args: argparse.Namespace) -> int:
    if args.compile_report:
        from bench import compile_report

        return compile_report.main(None if args.dtype is None else (DTYPES[args.dtype],))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    ops = [o for o in args.ops.split(",") if o]
    for o in ops:
        if o not in OPS:
            print(f"error: unknown op {o!r}; known: {list(OPS)}", file=sys.stderr)
            return 2
    providers = None if args.providers is None else [p for p in args.providers.split(",") if p]
    for p in providers or ():
        if not any(p in OPS[o].providers for o in ops):
            hint = " (pip install liger-kernel)" if p == "liger" else ""
            print(
                f"error: provider {p!r} is not available for ops {ops}{hint}; known: {list(PROVIDERS)}", file=sys.stderr
            )
            return 2
    if args.warmup < 0 or args.repeats < 1:
        print(f"error: need --warmup >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}", file=sys.stderr)
        return 2
    tokens = args.tokens or DEFAULT_TOKENS[device.type]
    try:
        shapes = parse_shapes(args.shapes or DEFAULT_SHAPES[device.type], tokens)
    except argparse.ArgumentTypeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.compare is not None:
        try:
            report.load_rows(args.compare)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.dry_run:
        for o in ops:
            names = providers or default_providers(OPS[o], device)
            runs = [s for s in shapes if len(s) == len(OPS[o].dims)]
            print(f"# dry run: {o} on {device.type} {dtype}, providers {names}, shapes {runs}")
        return 0
    cond = report.conditions(device)
    roof = None if args.no_roofline else roofline.measure(device, dtype)
    rows = run(ops, providers, shapes, dtype, device, warmup=args.warmup, repeats=args.repeats)
    if roof is not None:
        add_roofline(rows, roof)
    print(report.conditions_line(cond))
    if roof is not None:
        print(roof.line())
    print(format_table(rows))
    payload = {
        "bench": "kernels",
        "conditions": cond,
        "roofline": None if roof is None else roof.as_dict(),
        "rows": [r.as_dict() for r in rows],
    }
    if args.compare is not None:
        table, pairs = report.compare(payload["rows"], args.compare)
        print(table)
        payload["compare"] = {"old": str(args.compare), "pairs": pairs}
    if args.save is not None:
        print(f"# saved {report.save(payload, 'kernels', args.save or None)}")
    print(json.dumps(payload))
    # a reference that runs out of memory is a result; a wrong or crashing provider is a failure
    return 0 if all(r.ok or (r.error or "").startswith("out of memory") for r in rows) else 1
