"""`flowgrpo bench kernels --compile-report`: every kernel compiled for sm_90 as its wrapper launches it.

The report runs in a subprocess without TRITON_INTERPRET (the kernels must be compiled ones; this
test process interprets them). `test_bf16_configs_within_limits` compiles every bfloat16
configuration the wrappers launch (bench/compile_report.py lists the cases) and fails on a spill or
on more than 228 KiB of shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compile_report import CompileResult, check

REPO = Path(__file__).resolve().parents[1]

RECORD_SCRIPT = r"""
import json
import torch
from bench import compile_report as cr
from kernels.linear_token_logprobs import linear_launch

launches = cr.record_launches((torch.bfloat16,))
with cr.recording():  # the same 132-SM device properties the recorded launches saw
    cfg = linear_launch(16384, cr.LINEAR_V, torch.bfloat16, torch.device("cuda"), False)
print(json.dumps({
    "launched": sorted({(l.kernel.__name__, l.kwargs.get("num_warps"), l.kwargs.get("num_stages"),
                         l.kwargs.get("BLOCK_N"), l.kwargs.get("BLOCK_V"), l.kwargs.get("BLOCK_D"))
                        for l in launches if l.kernel.__name__.startswith("_linear_token_logprobs_")
                        and l.kernel.__name__ != "_linear_token_logprobs_reduce_kernel"}),
    "linear_launch": [cfg.num_warps, cfg.num_stages, cfg.block_n, cfg.block_v, cfg.block_d],
}))
"""


def run_script(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, check=False, timeout=timeout
    )


def needs_cuda_backend():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90).path  # noqa: B018  (raises when Triton has no ptxas)
    except Exception as e:  # any failure means: this Triton cannot compile for CUDA here
        pytest.skip(f"this Triton cannot compile for sm_90 here: {e}")


def test_records_what_the_wrapper_launches():
    """The recorded launch parameters of the LM-head kernels are linear_launch's GPU choice (bf16: 8 warps,
    3 stages, 128×128×64 tiles), not values written again in a test."""
    needs_cuda_backend()
    r = run_script(["-c", RECORD_SCRIPT], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    warps, stages, bn, bv, bd = out["linear_launch"]
    assert (warps, stages, bn, bv, bd) == (8, 3, 128, 128, 64)
    assert {tuple(x) for x in out["launched"]} == {
        ("_linear_token_logprobs_fwd_kernel", warps, stages, bn, bv, bd),
        ("_linear_token_logprobs_bwd_kernel", warps, stages, bn, bv, bd),
    }


FP32_BWD_SCRIPT = r"""
import json, importlib
import torch
from bench import compile_report as cr

ltl = importlib.import_module("kernels.linear_token_logprobs")
n, d, v = 16384, cr.LINEAR_D, cr.LINEAR_V
with cr.recording() as (sink, case):
    case[:] = [f"N={n} d={d} V={v}", "fp32"]
    hidden, weight = torch.empty(n, d), torch.empty(v, d)
    lse, ent, g, h = (torch.empty(n) for _ in range(4))
    ltl.linear_token_logprobs_bwd(
        hidden, weight, None, torch.zeros(n, dtype=torch.long), lse, ent, g, h, temperature=1.0, needs=(True, True, False)
    )
print(json.dumps([c.__dict__ for c in cr.compile_all(sink)]))
"""


def test_fp32_lm_head_backward_does_not_spill():
    """The float32 LM-head backward as its wrapper launches it (d hidden, d weight and the entropy term)
    compiles for sm_90 without spills (it spilled 2672 B at 64×128×32 tiles; ~20 s of ptxas)."""
    needs_cuda_backend()
    r = run_script(["-c", FP32_BWD_SCRIPT], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (c,) = json.loads(r.stdout.strip().splitlines()[-1])
    assert c["kernel"] == "_linear_token_logprobs_bwd_kernel" and c["dtype"] == "fp32"
    assert c["spill_st"] == c["spill_ld"] == 0, c


SMALL_V_SCRIPT = r"""
import json
import torch
from bench import compile_report as cr
from kernels import LossConfig
from kernels.linear_chunked import (
    linear_flow_grpo_loss_chunked_fwd,
    linear_token_logprobs_chunked_bwd,
    linear_token_logprobs_chunked_fwd,
)

with cr.recording() as (sink, case):
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        case[1] = name
        cr._record_chunked(dtype, [LossConfig()], case, linear_flow_grpo_loss_chunked_fwd,
                           linear_token_logprobs_chunked_fwd, linear_token_logprobs_chunked_bwd, vs=(1, 7))
print(json.dumps([[c.kernel, c.dtype, c.case] for c in cr.compile_all(sink)]))
"""


def test_chunked_epilogues_compile_at_tiny_vocabularies():
    """The chunked algorithm's epilogues compile for sm_90 at V = 1 (Triton passes an integer 1 as a constant,
    which `tl.multiple_of` rejected) and V = 7 (less than one 16-byte vector of bf16), bf16 and fp32."""
    needs_cuda_backend()
    r = run_script(["-c", SMALL_V_SCRIPT], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    compiled = json.loads(r.stdout.strip().splitlines()[-1])
    kernels = {k for k, _, _ in compiled}
    assert {"_linear_chunked_loss_fwd_kernel", "_linear_chunked_logprobs_bwd_kernel"} <= kernels
    assert {(k, dt, "V=1" in case) for k, dt, case in compiled} >= {
        ("_linear_chunked_loss_fwd_kernel", dt, one) for dt in ("bf16", "fp32") for one in (True, False)
    }


def result(**kw) -> CompileResult:
    base = {
        "kernel": "_k",
        "dtype": "bf16",
        "case": "c",
        "warps": 8,
        "stages": 3,
        "regs": 128,
        "spill_st": 0,
        "spill_ld": 0,
        "smem": 96 * 1024,
        "tensor_cores": "wgmma",
    }
    return CompileResult(**{**base, **kw})


def test_check_names_spills_in_bf16_and_shared_memory_over_the_limit():
    assert check([result(), result(dtype="fp32", spill_st=64, spill_ld=64), result(smem=228 * 1024)]) == []
    problems = check([result(spill_st=8), result(dtype="fp16", smem=228 * 1024 + 1)])
    assert len(problems) == 2
    assert "spills 8 B stores" in problems[0] and "> 228 KiB" in problems[1]


@pytest.mark.slow
def test_bf16_configs_within_limits():
    """Compile every bfloat16 configuration (138 kernels with Triton 3.9, several minutes on 2 cores)."""
    needs_cuda_backend()
    r = run_script(["-m", "engine.cli", "bench", "kernels", "--compile-report", "--dtype", "bfloat16"], timeout=3600)
    lines = r.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), r.stderr[-3000:]
    rep = json.loads(lines[-1])["compile_report"]
    results = [CompileResult(**c) for c in rep["configs"]]
    assert {c.kernel for c in results} >= {
        "_token_logprobs_fwd_kernel",
        "_token_logprobs_bwd_kernel",
        "_flow_grpo_loss_fwd_kernel",
        "_linear_token_logprobs_fwd_kernel",
        "_linear_token_logprobs_bwd_kernel",
        "_linear_token_logprobs_reduce_kernel",
        "_linear_flow_grpo_loss_fwd_kernel",
    }
    assert all(c.dtype == "bf16" for c in results)
    assert any(c.tensor_cores == "wgmma" for c in results if c.kernel.startswith("_linear_token_logprobs_fwd"))
    assert check(results) == rep["problems"] == [], "\n".join(rep["problems"])
    assert r.returncode == 0
