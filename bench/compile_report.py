"""Ahead-of-time compile report: every Triton kernel, as its wrapper launches it, compiled for sm_90.

`flowgrpo bench kernels --compile-report` needs no GPU. How it works:

1. Record. Each op's Triton launcher (`token_logprobs_fwd` / `_bwd`, `flow_grpo_loss_fwd`,
   `linear_token_logprobs_fwd` / `_bwd`, `linear_flow_grpo_loss_fwd`) runs on CPU tensors with
   every `@triton.jit` kernel of its module replaced by a recorder, which keeps the arguments,
   constexprs, `num_warps` and `num_stages` the launcher passed. The launch-config functions see
   a compiled (not interpreted) kernel and an H100/H200 with 132 SMs, so what is recorded is what
   the wrapper launches on that GPU.
2. Specialise. Triton's own binder for `GPUTarget("cuda", 90, 32)` turns each recorded launch into
   a signature, constexprs (including integer arguments equal to 1) and 16-byte divisibility
   attributes, exactly as a launch would; launches with the same compile key are compiled once.
3. Compile to a cubin with the ptxas Triton uses (`TRITON_PTXAS_PATH` selects another) and read
   registers and spill bytes from `ptxas -v`, shared memory from Triton's metadata, and from the PTX
   the use of tensor-core instructions (`wgmma` / `mma.sync`) and the share of vector global loads
   and stores (`ld_vec`, `st_vec`: vector / all instructions, static counts).

Cases: dtypes float32, bfloat16, float16. Logits ops: V = 2^k, 128 … 8192 (every block size
`token_logprobs.launch_config` can choose), plus Qwen's 151 936 and 151 665 (not a multiple of 8:
rows start at every 16-byte phase); `token_logprobs_fwd` with and without entropy, `token_logprobs_bwd`
with and without the entropy term, `flow_grpo_loss_fwd` with every (ref, dual clip, KL type) at
the largest block and with the default loss at the others. LM-head ops: N = 64 (many vocabulary
splits) and 16 384 (one split), d = 256 (as 1536 or 3584: a runtime integer, a multiple of 16),
V = 151 936, with and without bias; the backward with
every combination of gradients autograd can ask for (d hidden, d weight, d bias) and with and
without the entropy term. The chunked algorithm's epilogues (`kernels.linear_chunked`): 8 rows,
d = 256, V = 151 936 and 151 665, the loss epilogue with and without the gradient, with the entropy
term and for every (ref, dual clip), and the log-prob backward with and without it. Simplification: the loss flags are not crossed with the small logits
blocks (the flags change a per-row epilogue after the row loop; the loop is what the block sizes
change).

Limits checked (`check`): no spill in any bfloat16 configuration; no configuration above 228 KiB of
shared memory (the H100/H200 maximum per SM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import re
import tempfile
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

SMS = 132  # streaming multiprocessors of an H100 SXM / H200
SMEM_LIMIT = 228 * 1024
OP_MODULES = (
    "kernels.token_logprobs",
    "kernels.flow_grpo_loss",
    "kernels.linear_token_logprobs",
    "kernels.linear_flow_grpo_loss",
    "kernels.linear_chunked",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOGITS_N = 8
LOGITS_VS = (*(2**k for k in range(7, 14)), 151_936, 151_665)
# d enters the LM-head kernels only as a runtime integer: any multiple of 16 compiles the same kernel as
# Qwen2.5's 1536 / 3584, so a small one keeps the float32 d weight buffer the launcher allocates small.
LINEAR_D, LINEAR_V = 256, 151_936
LINEAR_NS = (64, 16_384)
CHUNKED_N, CHUNKED_VS = 8, (151_936, 151_665)
COLUMNS = (
    "kernel",
    "dtype",
    "case",
    "warps",
    "stages",
    "regs",
    "spill_st",
    "spill_ld",
    "smem",
    "tensor_cores",
    "ld_vec",
    "st_vec",
)


@dataclass
class Launch:
    """One kernel launch as a wrapper issued it."""

    kernel: Any  # the real triton.JITFunction
    args: tuple
    kwargs: dict
    case: str
    dtype: str  # the op's input dtype (bf16, fp16, fp32)


@dataclass
class CompileResult:
    kernel: str
    dtype: str
    case: str
    warps: int
    stages: int
    regs: int
    spill_st: int
    spill_ld: int
    smem: int  # bytes of shared memory per CTA (Triton's dynamic allocation)
    tensor_cores: str  # "wgmma", "mma", or "-"
    ld_vec: str = ""  # "vector/all" global load instructions in the PTX (vector: ld.global.v2 / .v4)
    st_vec: str = ""  # the same for global stores


class _TensorStub:
    """What Triton's binder reads of a tensor argument (dtype, address alignment), without holding its memory."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype, self._ptr = t.dtype, t.data_ptr()

    def data_ptr(self) -> int:
        return self._ptr


class _Recorder:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, kernel: Any, sink: list[Launch], case: list[str]) -> None:
        self.kernel, self.sink, self.case = kernel, sink, case

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            args = tuple(_TensorStub(a) if isinstance(a, torch.Tensor) else a for a in args)
            self.sink.append(Launch(self.kernel, args, kwargs, self.case[0], self.case[1]))

        return launch


@contextlib.contextmanager
def recording() -> Iterator[tuple[list[Launch], list[str]]]:
    """Replace every Triton kernel of the op modules by a recorder; fake a 132-SM CUDA device's properties."""
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile report needs compiled kernels: unset TRITON_INTERPRET before importing kernels")
    sink: list[Launch] = []
    case = ["", ""]  # (shape, dtype) of the launches being recorded
    saved: list[tuple[Any, str, Any]] = []
    for name in OP_MODULES:
        module = importlib.import_module(name)  # the module (the package attribute of that name is the op)
        for attr, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.JITFunction) and attr.endswith("_kernel"):
                saved.append((module, attr, value))
                setattr(module, attr, _Recorder(value, sink, case))
    props = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=SMS)
    try:
        yield sink, case
    finally:
        torch.cuda.get_device_properties = props
        for module, attr, value in saved:
            setattr(module, attr, value)


def _empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def record_launches(dtypes: tuple[torch.dtype, ...] | None = None) -> list[Launch]:
    """Run every launcher over the cases of the module docstring (inputs of `dtypes`, default all) and
    return what they launched."""
    from kernels import LossConfig
    from kernels.flow_grpo_loss import flow_grpo_loss_fwd
    from kernels.linear_chunked import (
        linear_flow_grpo_loss_chunked_fwd,
        linear_token_logprobs_chunked_bwd,
        linear_token_logprobs_chunked_fwd,
    )
    from kernels.linear_flow_grpo_loss import linear_flow_grpo_loss_fwd
    from kernels.linear_token_logprobs import linear_token_logprobs_bwd, linear_token_logprobs_fwd
    from kernels.token_logprobs import token_logprobs_bwd, token_logprobs_fwd

    losses = [
        LossConfig(kl_type=kl, kl_coef=0.01 if ref else 0.0, clip_ratio_c=c)
        for ref in (True, False)
        for c in (None, 3.0)
        for kl in ("k1", "k2", "k3")
    ]
    with recording() as (sink, case):
        for dname, dtype in DTYPES.items():
            if dtypes is not None and dtype not in dtypes:
                continue
            n = LOGITS_N
            per_token = [_empty(n) for _ in range(6)]
            lse, ent, g, h, old, w = per_token
            targets = torch.zeros(n, dtype=torch.long)
            case[1] = dname
            for v in LOGITS_VS:
                logits = _empty(n, v, dtype=dtype)
                case[0] = f"V={v}"
                for with_entropy in (True, False):
                    token_logprobs_fwd(logits, targets, with_entropy=with_entropy)
                for hh in (h, None):
                    token_logprobs_bwd(logits, targets, lse, ent, g, hh)
                for loss in losses if v >= LOGITS_VS[-3] else losses[:1]:
                    ref = old if loss.kl_coef else None
                    flow_grpo_loss_fwd(logits, targets, old, old, ref, w, loss)
            for n in LINEAR_NS:
                hidden, weight, bias = _empty(n, LINEAR_D, dtype=dtype), _empty(LINEAR_V, LINEAR_D, dtype=dtype), None
                targets = torch.zeros(n, dtype=torch.long)
                lse, ent, g, h, old, w = (_empty(n) for _ in range(6))
                for bias in (_empty(LINEAR_V, dtype=dtype), None):
                    case[0] = f"N={n} d={LINEAR_D} V={LINEAR_V}{' bias' if bias is not None else ''}"
                    for with_entropy in (True, False):
                        linear_token_logprobs_fwd(hidden, weight, bias, targets, with_entropy=with_entropy)
                    for loss in losses[:: 3 if n == LINEAR_NS[0] else 6]:
                        ref = old if loss.kl_coef else None
                        linear_flow_grpo_loss_fwd(hidden, weight, bias, targets, old, old, ref, w, loss)
                    if n != LINEAR_NS[-1]:
                        continue  # the backward's grid and arguments do not depend on splits
                    for needs in _needs(bias is not None):
                        for hh in (h, None):
                            linear_token_logprobs_bwd(
                                hidden, weight, bias, targets, lse, ent, g, hh, temperature=1.0, needs=needs
                            )
            _record_chunked(dtype, losses, case, linear_flow_grpo_loss_chunked_fwd, linear_token_logprobs_chunked_fwd,
                            linear_token_logprobs_chunked_bwd)  # fmt: skip
    for launch in sink:
        launch.case = f"{launch.case} {_flags(launch.kwargs)}".strip()
    return sink


def _record_chunked(dtype, losses, case, loss_fwd, logprobs_fwd, logprobs_bwd, vs=CHUNKED_VS) -> None:
    """The chunked algorithm's epilogues (`kernels.linear_chunked`): N = CHUNKED_N rows (one chunk; the
    grid is one program per row of a chunk, so N changes nothing compiled), d = LINEAR_D, V = 151 936 and
    151 665; the loss with and without the gradient, with the entropy term, and every (ref, dual clip)."""
    from kernels import LossConfig

    n = CHUNKED_N
    lse, ent, g, h, old, w = (_empty(n) for _ in range(6))
    targets = torch.zeros(n, dtype=torch.long)
    for v in vs:
        hidden, weight = _empty(n, LINEAR_D, dtype=dtype), _empty(v, LINEAR_D, dtype=dtype)
        case[0] = f"chunked N={n} d={LINEAR_D} V={v}"
        for loss in [*losses[::3], LossConfig(entropy_coef=0.01)]:
            ref = old if loss.kl_coef else None
            for needs in ((True, True, False), (False, False, False)):
                loss_fwd(hidden, weight, None, targets, old, old, ref, w, loss, needs=needs, impl="triton")
        logprobs_fwd(hidden, weight, None, targets, impl="triton")
        for hh in (h, None):
            logprobs_bwd(hidden, weight, None, targets, lse, ent, g, hh, temperature=1.0, needs=(True, True, False),
                         impl="triton")  # fmt: skip


def _needs(has_bias: bool) -> list[tuple[bool, bool, bool]]:
    """Every non-empty set of gradients autograd can ask of (hidden, weight, bias)."""
    combos = [
        (a, b, c) for a in (True, False) for b in (True, False) for c in ((True, False) if has_bias else (False,))
    ]
    return [x for x in combos if any(x)]


def _flags(kwargs: dict) -> str:
    skip = {"num_warps", "num_stages", "BLOCK_N", "BLOCK_V", "BLOCK_D", "GROUP_N", "DOT_PRECISION", "UPCAST"}
    return " ".join(f"{k}={_short(v)}" for k, v in kwargs.items() if k not in skip)


def _short(v: Any) -> str:
    return {True: "1", False: "0"}.get(v, str(v)) if isinstance(v, bool) else str(v)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(launch: Launch, target: Any, backend: Any) -> CompileResult:
    """Compile one recorded launch as Triton would specialise it, and read what ptxas reports."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, _ = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, None)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), knobs.nvidia.scope():
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
        )
    text = log.getvalue()
    used = _PTXAS_USED.search(text)
    spill = _PTXAS_SPILL.search(text)
    if used is None or spill is None:
        raise RuntimeError(f"no ptxas -v report for {kernel.__name__} ({launch.case}); ptxas said: {text[-500:]}")
    ptx = compiled.asm["ptx"]
    tensor_cores = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "-"
    ld_vec, st_vec = (_vector_share(ptx, op) for op in ("ld", "st"))
    return CompileResult(
        kernel=kernel.__name__,
        dtype=launch.dtype,
        case=launch.case,
        warps=options.num_warps,
        stages=options.num_stages,
        regs=int(used.group(1)),
        spill_st=int(spill.group(1)),
        spill_ld=int(spill.group(2)),
        smem=int(compiled.metadata.shared),
        tensor_cores=tensor_cores,
        ld_vec=ld_vec,
        st_vec=st_vec,
    )


def _vector_share(ptx: str, op: str) -> str:
    """Vector / all global `op` (ld or st) instructions of the PTX, static counts ("4/7")."""
    forms = re.findall(rf"\b{op}\.global((?:\.[a-z0-9]+)*)", ptx)
    vector = sum(1 for f in forms if re.search(r"\.v[248]\b", f))
    return f"{vector}/{len(forms)}"


def compile_all(launches: list[Launch], progress: Callable[[str], None] | None = None) -> list[CompileResult]:
    """Compile each distinct launch once for GPUTarget("cuda", 90, 32)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    seen: set[tuple] = set()
    out: list[CompileResult] = []
    # a fresh cache: ptxas must run (its -v report is the source of registers and spills)
    with tempfile.TemporaryDirectory(prefix="flowgrpo-compile-report-") as cache_dir, knobs.cache.scope():
        knobs.cache.dir = cache_dir
        for i, launch in enumerate(launches):
            key = _key(launch, backend)
            if key in seen:
                continue
            seen.add(key)
            if progress is not None:
                progress(f"[{i + 1}/{len(launches)}] {launch.kernel.__name__} {launch.case}")
            out.append(compile_launch(launch, target, backend))
    return out


def _key(launch: Launch, backend: Any) -> tuple:
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    _, specialization, _ = binder(*launch.args, **launch.kwargs)
    opts = {k: launch.kwargs.get(k) for k in ("num_warps", "num_stages")}
    return (kernel.__name__, tuple(map(str, specialization)), tuple(sorted(opts.items())))


def check(results: list[CompileResult]) -> list[str]:
    """The violated limits, one line each: a spill in a bfloat16 configuration, more than 228 KiB of shared memory."""
    problems = []
    for r in results:
        where = f"{r.kernel} [{r.dtype}, {r.case}, warps={r.warps}, stages={r.stages}]"
        if r.dtype == "bf16" and (r.spill_st or r.spill_ld):
            problems.append(f"{where}: spills {r.spill_st} B stores / {r.spill_ld} B loads")
        if r.smem > SMEM_LIMIT:
            problems.append(f"{where}: {r.smem / 1024:.1f} KiB shared memory > {SMEM_LIMIT // 1024} KiB")
    return problems


def format_table(results: list[CompileResult]) -> str:
    rows = [[f"{r.smem / 1024:.1f}K" if c == "smem" else str(getattr(r, c)) for c in COLUMNS] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def ptxas_version() -> str:
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(90).path
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return f"{path}: {out.splitlines()[-1] if out else 'unknown'}"


def report(
    dtypes: tuple[torch.dtype, ...] | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Record, compile and check (inputs of `dtypes`, default all); the JSON-able result."""
    import triton

    results = compile_all(record_launches(dtypes), progress)
    return {
        "target": "cuda sm_90 (warp 32)",
        "triton": triton.__version__,
        "ptxas": ptxas_version(),
        "configs": [dataclasses.asdict(r) for r in results],
        "problems": check(results),
    }


def main(dtypes: tuple[torch.dtype, ...] | None = None) -> int:
    """Print the table, the problems and a last-line JSON; exit status 1 when a limit is violated."""
    import json
    import sys

    result = report(dtypes, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"compile report: {result['target']}, triton {result['triton']}, ptxas {result['ptxas']}")
    print(format_table([CompileResult(**c) for c in result["configs"]]))
    for line in result["problems"]:
        print(f"LIMIT: {line}")
    print(json.dumps({"compile_report": result}))
    return 1 if result["problems"] else 0
