"""`kernels.token_logprobs` against a float64 gold, forward and backward, on both paths.

The gold (`gold_logprobs`, tests/gold.py) is float64 autograd over `log_softmax` of the same logit values (bf16 logits are upcast
exactly), written here from the definition, independently of the kernels and the reference.
Paths: the chunked torch path (default lane) and the Triton kernels (`interpreter` lane: run with
TRITON_INTERPRET=1 on CPU, compiled on CUDA). Outputs are NaN-poisoned before the kernels write
them (tests/conftest.py), so an unwritten element fails the finiteness check of `assert_close`.

Tolerances: log-probs and entropies are float32 outputs computed with float32 accumulation for
every input dtype, so they use the float32 entry (observed over the test shapes, fp32/bf16/fp16:
|err| ≤ 2.5e-6 on logp, ≤ 4.7e-6 on entropy (torch path; 8e-7 Triton) with H up to ~10).
Gradients are written in the logits dtype and use its entry (observed fp32 ≤ 7e-6 abs at |grad| up
to ~5; fp16 ≤ 1.8e-3; bf16 one rounding, 2^-8 relative, on the torch path and up to 2^-7 under the
interpreter, whose fp32→bf16 conversion truncates instead of rounding: ≤ 2.1e-2 abs at |grad| ≈ 3).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from gold import gold_logprobs

from kernels import reference, token_logprobs, utils
from kernels.testing import AllocationTracker, assert_close

REPO = Path(__file__).resolve().parents[1]
TORCH = pytest.param("torch", id="torch")
TRITON = pytest.param("triton", id="triton", marks=pytest.mark.interpreter)
F32, BF16 = torch.float32, torch.bfloat16


def make(n, v, dtype, seed=0, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return logits, targets


def check(impl, n, v, dtype, temperature, return_entropy, seed=0, device="cpu"):
    logits, targets = make(n, v, dtype, seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    grad_logp = torch.randn(n, generator=g).to(device)
    grad_ent = torch.randn(n, generator=g).to(device) if return_entropy else None
    x = logits.clone().requires_grad_()
    out = token_logprobs(x, targets, temperature=temperature, return_entropy=return_entropy, impl=impl)
    logp, ent = out if return_entropy else (out, None)
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    obj = (grad_logp * logp).sum() + ((grad_ent * ent).sum() if return_entropy else 0.0)
    obj.backward()
    g_logp, g_ent, g_grad = gold_logprobs(logits, targets, temperature, grad_logp, grad_ent)
    assert_close(logp, g_logp, dtype=F32, name="logp")
    if return_entropy:
        assert ent.dtype == torch.float32
        assert_close(ent, g_ent, dtype=F32, name="entropy")
    assert x.grad.dtype == dtype
    assert_close(x.grad, g_grad, dtype=dtype, name="d logits")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("v", [1, 97, 1000, 50257])
@pytest.mark.parametrize("n", [1, 63, 257])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_torch_path_matches_gold_logprobs(n, v, dtype, temperature):
    check("torch", n, v, dtype, temperature, return_entropy=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("v", [1, 97, 1000])
@pytest.mark.parametrize("n", [1, 63, 257])
def test_triton_matches_gold_logprobs(n, v, dtype):
    check("triton", n, v, dtype, 0.7, return_entropy=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_triton_large_vocab(dtype):
    check("triton", 3, 50257, dtype, 1.3, return_entropy=True)


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_without_entropy(impl):
    check(impl, 63, 1000, F32, 1.0, return_entropy=False)
    check(impl, 63, 97, BF16, 0.5, return_entropy=False)


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_float16_logits(impl):
    check(impl, 63, 1000, torch.float16, 0.7, return_entropy=True)


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_masked_vocabulary_entries(impl):
    """-inf logits (a masked vocabulary) are allowed where they are not the target."""
    logits, targets = make(63, 300, F32, seed=3)
    logits[:, 200:] = float("-inf")
    logits[5, :] = float("-inf")
    logits[5, 7] = 1.0  # a one-hot row: logp = 0, entropy = 0
    targets = targets % 200
    targets[5] = 7
    gl, gh = torch.randn(63), torch.randn(63)
    x = logits.clone().requires_grad_()
    logp, ent = token_logprobs(x, targets, temperature=0.9, return_entropy=True, impl=impl)
    ((gl * logp).sum() + (gh * ent).sum()).backward()
    g_logp, g_ent, g_grad = gold_logprobs(logits, targets, 0.9, gl, gh)
    assert_close(logp, g_logp, dtype=F32, name="logp")
    assert_close(ent, g_ent, dtype=F32, name="entropy")
    assert_close(x.grad, g_grad, dtype=F32, name="d logits")
    assert logp[5].item() == 0.0 and abs(ent[5].item()) < 1e-6
    assert (x.grad[:, 200:] == 0).all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_inplace_backward_overwrites_logits_with_the_gradient(impl, dtype):
    logits, targets = make(63, 1000, dtype, seed=5)
    gl, gh = torch.randn(63), torch.randn(63)
    base = logits.clone().requires_grad_()
    x = base * 1  # a non-leaf whose buffer the backward may reuse (as the output of an LM head would be)
    logp, ent = token_logprobs(x, targets, temperature=0.8, return_entropy=True, impl=impl, inplace_backward=True)
    ((gl * logp).sum() + (gh * ent).sum()).backward()
    _, _, g_grad = gold_logprobs(logits, targets, 0.8, gl, gh)
    assert_close(base.grad, g_grad, dtype=dtype, name="d logits (in place)")
    assert torch.equal(x.detach(), base.grad), "the gradient must live in the logits buffer"


def test_auto_is_the_torch_path_on_cpu():
    logits, targets = make(63, 97, F32)
    a = token_logprobs(logits, targets, return_entropy=True, impl="auto")
    b = token_logprobs(logits, targets, return_entropy=True, impl="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_no_grad_forward(impl):
    logits, targets = make(63, 97, BF16)
    with torch.no_grad():
        logp = token_logprobs(logits, targets, impl=impl)
    assert_close(logp, gold_logprobs(logits, targets, 1.0)[0], dtype=F32, name="logp")


def test_reference_agrees_with_gold_logprobs():
    logits, targets = make(63, 1000, F32)
    logp, ent = reference.token_logprobs(logits.double(), targets, temperature=0.7, return_entropy=True)
    g_logp, g_ent, _ = gold_logprobs(logits, targets, 0.7)
    assert logp.dtype == torch.float64
    assert_close(logp, g_logp, dtype=torch.float64, name="reference logp")
    assert_close(ent, g_ent, dtype=torch.float64, name="reference entropy")


def test_torch_path_memory_is_bounded_by_the_chunk(monkeypatch):
    """Extra memory of the torch path is a few [rows, V] chunks, not N·V; the reference's is N·V-sized."""
    n, v = 257, 1000
    chunk = 16 * v * 4
    monkeypatch.setattr(utils, "TORCH_CHUNK_BYTES", chunk)
    logits, targets = make(n, v, BF16)
    gl, gh = torch.randn(n), torch.randn(n)
    peaks = {}
    for name, fn in (("ours", lambda x: token_logprobs(x, targets, return_entropy=True, impl="torch")),
                     ("reference", lambda x: reference.token_logprobs(x, targets, return_entropy=True))):  # fmt: skip
        x = logits.clone().requires_grad_()
        with AllocationTracker() as tracker:
            logp, ent = fn(x)
            ((gl * logp).sum() + (gh * ent).sum()).backward()
        peaks[name] = tracker.peak_bytes
    grad_bytes = n * v * 2  # the bf16 d logits itself
    assert peaks["ours"] - grad_bytes <= 2 * chunk + 64 * n * 4, peaks
    assert peaks["reference"] - grad_bytes >= 2 * n * v * 4, peaks  # the probe sees [N, V] float32 buffers


@pytest.mark.parametrize("impl", [TORCH, TRITON])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
class TestBadInput:
    def test_nan_and_inf_logits_name_the_rows(self, impl):
        logits, targets = make(63, 97, F32)
        logits[3, 10] = float("nan")
        logits[40, 0] = float("inf")
        with pytest.raises(ValueError, match=r"non-finite values \(NaN or \+inf\) in 2 row\(s\), e.g. rows \[3, 40\]"):
            token_logprobs(logits, targets, impl=impl)

    def test_bf16_nan(self, impl):
        logits, targets = make(4, 97, BF16)
        logits[2, 96] = float("nan")
        with pytest.raises(ValueError, match=r"rows \[2\] \(\['NaN'\]\)"):
            token_logprobs(logits, targets, return_entropy=True, impl=impl)

    def test_target_logit_minus_inf(self, impl):
        logits, targets = make(8, 97, F32)
        logits[6, targets[6]] = float("-inf")
        with pytest.raises(ValueError, match=r"target's logit is -inf at rows \[6\]"):
            token_logprobs(logits, targets, impl=impl)

    @pytest.mark.parametrize("bad", [-1, 97, 10**6])
    def test_targets_out_of_range(self, impl, bad):
        logits, targets = make(8, 97, F32)
        targets[4] = bad
        with pytest.raises(
            ValueError, match=rf"targets out of range \[0, V\) = \[0, 97\) at rows \[4\] \(values \[{bad}\]\)"
        ):
            token_logprobs(logits, targets, impl=impl)

    def test_shapes_and_dtypes(self, impl):
        logits, targets = make(8, 97, F32)
        with pytest.raises(ValueError, match=r"logits must be 2-D \[N, V\]"):
            token_logprobs(logits[0], targets, impl=impl)
        with pytest.raises(ValueError, match=r"logits must be 2-D \[N, V\]"):
            token_logprobs(logits.view(2, 4, 97), targets, impl=impl)
        with pytest.raises(ValueError, match=r"targets must have shape \[N\] = \(8,\)"):
            token_logprobs(logits, targets[:5], impl=impl)
        with pytest.raises(TypeError, match="targets must be an integer tensor"):
            token_logprobs(logits, targets.float(), impl=impl)
        with pytest.raises(TypeError, match="logits dtype must be one of"):
            token_logprobs(logits.long(), targets, impl=impl)
        with pytest.raises(TypeError, match=r"for float64 use kernels\.reference"):
            token_logprobs(logits.double(), targets, impl=impl)
        with pytest.raises(ValueError, match=r"empty \(N = 0 tokens\)"):
            token_logprobs(logits[:0], targets[:0], impl=impl)
        with pytest.raises(ValueError, match="empty vocabulary"):
            token_logprobs(logits[:, :0], targets, impl=impl)
        for t in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
                token_logprobs(logits, targets, temperature=t, impl=impl)

    def test_non_contiguous_logits_are_fine(self, impl):
        logits, targets = make(8, 194, F32)
        strided = logits[:, ::2]
        assert_close(
            token_logprobs(strided, targets % 97, impl=impl), gold_logprobs(strided, targets % 97, 1.0)[0], dtype=F32
        )


def test_unknown_impl():
    logits, targets = make(8, 97, F32)
    with pytest.raises(ValueError, match="impl must be one of"):
        token_logprobs(logits, targets, impl="cuda")


def test_triton_on_cpu_without_interpreter_says_how_to_run_it():
    code = (
        "import torch, kernels\n"
        "try:\n"
        "    kernels.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), impl='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, check=False)
    assert r.returncode == 0, r.stderr
    assert "ERR impl='triton' got tensors on cpu" in r.stdout
    assert "CUDA device" in r.stdout and "TRITON_INTERPRET=1" in r.stdout


@pytest.mark.interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the interpreter lane compiles the kernels")
def test_an_interpreter_that_cannot_run_the_kernels_is_refused_in_one_line(monkeypatch):
    """This environment's interpreter runs the loop-bound probe; one that fails it (Triton 3.6.0 with NumPy
    2.4.6, torch 2.11.0: every interpreted kernel raised TypeError deep in the interpreter) is refused in one
    line naming the fix, before any kernel runs."""
    from kernels import validation

    validation.check_interpreter.cache_clear()
    validation.check_interpreter()

    class FailingProbe:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

            return launch

    monkeypatch.setattr(validation, "_loop_bound_probe", FailingProbe())
    validation.check_interpreter.cache_clear()
    logits, targets = make(8, 97, F32)
    with pytest.raises(
        RuntimeError, match=r"^the Triton \S+ interpreter cannot run these kernels with NumPy .*numpy<2\.4"
    ):
        token_logprobs(logits, targets, impl="triton")
    validation.check_interpreter.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_gpu_compiled_kernels(dtype):
    """The compiled Triton kernels on CUDA (impl="auto" picks them) at a Qwen-sized vocabulary."""
    n, v = 1031, 151_936
    logits, targets = make(n, v, dtype, device="cuda")
    g = torch.Generator().manual_seed(9)
    gl, gh = torch.randn(n, generator=g).cuda(), torch.randn(n, generator=g).cuda()
    x = logits.clone().requires_grad_()
    logp, ent = token_logprobs(x, targets, temperature=0.9, return_entropy=True, impl="auto")
    ((gl * logp).sum() + (gh * ent).sum()).backward()
    g_logp, g_ent, g_grad = gold_logprobs(logits, targets, 0.9, gl, gh)
    assert_close(logp, g_logp, dtype=F32, name="logp")
    assert_close(ent, g_ent, dtype=F32, name="entropy")
    assert_close(x.grad, g_grad, dtype=dtype, name="d logits")


@pytest.mark.gpu
def test_gpu_row_offsets_beyond_2_31():
    """N·V > 2^31 elements: the last rows must be addressed with 64-bit offsets (bf16, 5 GB logits)."""
    n, v = 16_384, 152_064
    logits = torch.randn(n, v, device="cuda", dtype=BF16)
    targets = torch.randint(0, v, (n,), device="cuda")
    x = logits.clone().requires_grad_()
    logp = token_logprobs(x, targets, impl="triton")
    gl = torch.zeros(n, device="cuda")
    gl[-4:] = 1.0
    logp.backward(gl)
    rows = slice(n - 4, n)
    g_logp, _, g_grad = gold_logprobs(logits[rows], targets[rows], 1.0, gl[rows])
    assert_close(logp[rows], g_logp, dtype=F32, name="logp (last rows)")
    assert_close(x.grad[rows], g_grad, dtype=BF16, name="d logits (last rows)")
    assert (x.grad[: n - 4] == 0).all()


@triton.jit
def _segments_kernel(x_ptr, out_ptr, stride, V, VEC: tl.constexpr):
    row = tl.program_id(0)
    head, body = utils.row_segments(x_ptr + row * stride, V, VEC)
    tl.store(out_ptr + row * 2, head)
    tl.store(out_ptr + row * 2 + 1, body)
    cols, mask = utils.edge_columns(head, body, V, VEC)
    tl.store(out_ptr + 2 * tl.num_programs(0) + row * 2 * VEC + tl.arange(0, 2 * VEC), tl.where(mask, cols, -1))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("v", "pad", "offset"), [(1, 0, 0), (5, 2, 1), (97, 0, 0), (1003, 13, 3), (151_665, 0, 0)])
def test_row_segments_split_rows_at_16_byte_boundaries(v, pad, offset, dtype):
    """The vectorised body of every row starts on a 16-byte boundary and is whole vectors; head and tail
    (the edge lanes) are exactly the other columns, each shorter than a vector. The kernels' vector-load
    hints (`tl.multiple_of(row_ptr + head, 16)`) rest on this; the interpreter ignores hints, so it is
    checked here on the addresses themselves."""
    n = 6
    buf = torch.zeros(n, v + pad + offset, dtype=dtype)
    x = buf[:, offset : offset + v]
    vec = utils.vector_elems(dtype)
    out = torch.full((2 * n + n * 2 * vec,), -7, dtype=torch.int64)
    _segments_kernel[(n,)](x, out, x.stride(0), v, VEC=vec)
    item = x.element_size()
    for row in range(n):
        head, body = out[2 * row].item(), out[2 * row + 1].item()
        addr = x.data_ptr() + row * x.stride(0) * item
        assert 0 <= head < vec and body % vec == 0 and 0 <= v - head - body < vec, (row, head, body)
        if body:
            assert (addr + head * item) % 16 == 0, (row, head)
        edge = out[2 * n + row * 2 * vec : 2 * n + (row + 1) * 2 * vec]
        assert sorted(c for c in edge.tolist() if c >= 0) == [*range(head), *range(head + body, v)]


@pytest.mark.interpreter
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
@pytest.mark.parametrize(
    ("n", "v", "offset", "dtype"),
    [(5, 1003, 3, F32), (5, 1003, 3, BF16), (9, 1003, 0, BF16), (2, 151_665, 0, BF16)],
    ids=["1003+3-fp32", "1003+3-bf16", "1003-bf16", "151665-bf16"],
)
def test_triton_rows_at_any_alignment_match_gold(n, v, offset, dtype, inplace):
    """V not a multiple of the vector width (Qwen's 151 665 among them), rows starting at every 16-byte
    phase (a column offset into a wider buffer), several body blocks, head and tail: forward and backward
    against the gold, with d logits in a fresh buffer (other row phase) or in the logits buffer."""
    logits, targets = make(n, v, dtype, seed=v)
    buf = torch.zeros(n, v + offset + 5, dtype=dtype)
    buf[:, offset : offset + v] = logits
    leaf = buf.requires_grad_()
    cols = slice(offset, offset + v)
    x = (leaf * 1)[:, cols] if inplace else leaf[:, cols]  # in place: a non-leaf view the backward may reuse
    g = torch.Generator().manual_seed(1)
    gl, gh = torch.randn(n, generator=g), torch.randn(n, generator=g)
    lp, ent = token_logprobs(x, targets, temperature=0.9, return_entropy=True, impl="triton", inplace_backward=inplace)
    ((gl * lp).sum() + (gh * ent).sum()).backward()
    g_logp, g_ent, g_grad = gold_logprobs(logits, targets, 0.9, gl, gh)
    assert_close(lp, g_logp, dtype=F32, name="logp")
    assert_close(ent, g_ent, dtype=F32, name="entropy")
    assert_close(leaf.grad[:, cols], g_grad, dtype=dtype, name="d logits")
    assert (leaf.grad[:, :offset] == 0).all() and (leaf.grad[:, offset + v :] == 0).all()
    if inplace:
        assert torch.equal(x.detach(), leaf.grad[:, cols]), "the gradient must live in the logits buffer"
