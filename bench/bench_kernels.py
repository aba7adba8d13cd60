"""The kernel micro-benchmarks through pytest-benchmark: `pytest bench/ --benchmark-only`.

The same registry as `flowgrpo bench kernels` (`bench.kernels.OPS`): every op × provider available
here × one shape per op, on CUDA when present (bf16, a Qwen2.5-1.5B LM head at 4k tokens) and on CPU
otherwise (float32, small shapes, so the default `pytest` run also uses this file as a smoke test).
Before timing, each case passes the correctness gate against the reference; a failing provider
fails its test and is never timed. pytest-benchmark's table reports min/median/mean/IQR per case;
`--benchmark-json=FILE` keeps them. For the roofline ratio, memory and GB/s use `flowgrpo bench kernels`.
"""

from __future__ import annotations

import pytest
import torch

from bench import kernels as bk

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = {
    "token_logprobs": (4096, 151_936) if CUDA else (64, 4000),
    "flow_grpo_loss": (4096, 151_936) if CUDA else (64, 4000),
    "linear_token_logprobs": (4096, 1536, 151_936) if CUDA else (257, 64, 4000),
    "linear_flow_grpo_loss": (4096, 1536, 151_936) if CUDA else (257, 64, 4000),
}
CASES = [
    pytest.param(op, provider, id=f"{op}-{provider}")
    for op, spec in bk.OPS.items()
    for provider in bk.default_providers(spec, DEVICE)
]


@pytest.mark.parametrize(("op", "provider"), CASES)
def bench_kernel(benchmark, op: str, provider: str) -> None:
    spec = bk.OPS[op]
    shape = dict(zip(spec.dims, SHAPES[op]))
    inp = spec.make_inputs(shape, DTYPE, DEVICE)
    fn = spec.providers[provider]
    spec.compare(fn(inp), (spec.expected or spec.providers["reference"])(inp), DTYPE)  # the gate

    def call() -> None:
        fn(inp)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.extra_info.update(shape=shape, dtype=str(DTYPE), device=str(DEVICE))
    benchmark.pedantic(call, rounds=10 if CUDA else 3, warmup_rounds=2 if CUDA else 1)
