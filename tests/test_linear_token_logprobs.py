"""`kernels.linear_token_logprobs` against a float64 gold, forward and backward, on both paths.

The gold (`gold_linear(gold_logprobs, ...)`, tests/gold.py) materialises the float64 logits
hidden @ weight.T + bias of the same (bf16-exact) values and differentiates through them with
float64 autograd. Paths: the chunked torch path (default lane) and the Triton kernels
(`interpreter` lane). Outputs are NaN-poisoned before the kernels write them (tests/conftest.py).

Tolerances (the `kernels.testing` entries, none loosened): log-probs and entropies are float32
results for every input dtype (float32 entry; observed |err| ≤ 3.7e-6 over the test shapes, both
paths, logits of std 2 and |logp| up to ~22). Gradients are written in the input dtype and compared
with its entry scaled by the largest gold gradient: observed error / scale fp32 ≤ 2.0e-6; bf16
≤ 3.1e-3 on the torch path (one rounding of the output) and ≤ 6.9e-3 under the interpreter (dZ is
also cut to bf16 before the dots, as on the tensor cores, and the interpreter's casts truncate).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gold import gold_linear, gold_logprobs, make_linear_inputs

from kernels import linear_chunked, linear_token_logprobs, reference, utils
from kernels.testing import AllocationTracker, assert_close

ltl_module = importlib.import_module("kernels.linear_token_logprobs")
REPO = Path(__file__).resolve().parents[1]
TORCH = pytest.param("torch", id="torch")
TRITON = pytest.param("triton", id="triton", marks=pytest.mark.interpreter)
F32, BF16 = torch.float32, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])


@pytest.fixture(autouse=True)
def _fused_algorithm(monkeypatch):
    """This file tests the fused algorithm (tests/test_linear_chunked.py the chunked one): "auto" is fused here."""
    monkeypatch.setitem(linear_chunked.DEFAULT_ALGORITHM, "cpu", "fused")


def check(
    impl,
    n,
    d,
    v,
    dtype,
    *,
    temperature=0.8,
    return_entropy=True,
    with_bias=True,
    seed=0,
    device="cpu",
    algorithm="auto",
):
    """linear_token_logprobs (values and the three gradients) against the float64 gold."""
    inp = make_linear_inputs(n, d, v, dtype, seed, temperature, device, with_bias)
    hidden, weight, bias, targets = inp["hidden"], inp["weight"], inp["bias"], inp["targets"]
    g = torch.Generator().manual_seed(seed + 1)
    grad_logp = torch.randn(n, generator=g).to(device)
    grad_ent = torch.randn(n, generator=g).to(device) if return_entropy else None
    leaves = [None if x is None else x.clone().requires_grad_() for x in (hidden, weight, bias)]
    h, w, b = leaves
    out = linear_token_logprobs(
        h, w, targets, bias=b, temperature=temperature, return_entropy=return_entropy, impl=impl, algorithm=algorithm
    )
    logp, ent = out if return_entropy else (out, None)
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    obj = (grad_logp * logp).sum() + ((grad_ent * ent).sum() if return_entropy else 0.0)
    obj.backward()
    g_logp, g_ent, g_grads = gold_linear(gold_logprobs, hidden, weight, bias, targets, temperature, grad_logp, grad_ent)
    assert_close(logp, g_logp, dtype=F32, name="logp")
    if return_entropy:
        assert_close(ent, g_ent, dtype=F32, name="entropy")
    for name, leaf, gold in zip(("d hidden", "d weight", "d bias"), leaves, g_grads):
        if leaf is None:
            continue
        assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape
        assert_close(leaf.grad, gold, dtype=dtype, name=name, scale=max(gold.abs().max().item(), 1e-6))


SHAPES = [(n, d, v) for n in (1, 63, 257) for d in (32, 96) for v in (97, 1000, 5003)]


@DTYPES
@pytest.mark.parametrize(("n", "d", "v"), SHAPES, ids=[f"{n}x{d}x{v}" for n, d, v in SHAPES])
def test_torch_path_matches_gold(n, d, v, dtype):
    i = SHAPES.index((n, d, v))
    check("torch", n, d, v, dtype, temperature=(1.0, 0.7)[i % 2], with_bias=i % 3 != 0)


@pytest.mark.interpreter
@DTYPES
@pytest.mark.parametrize(("n", "d", "v"), SHAPES, ids=[f"{n}x{d}x{v}" for n, d, v in SHAPES])
def test_triton_matches_gold(n, d, v, dtype):
    i = SHAPES.index((n, d, v))
    check("triton", n, d, v, dtype, temperature=(0.7, 1.3)[i % 2], with_bias=i % 3 != 1)


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_without_entropy(impl):
    check(impl, 63, 32, 1000, F32, return_entropy=False)
    check(impl, 63, 96, 97, BF16, return_entropy=False, temperature=0.5)


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_float16(impl):
    check(impl, 63, 96, 1000, torch.float16)


def force_small_blocks(monkeypatch):
    """Triton: one vocabulary block per forward split (the most splits to merge); torch: blocks of
    128 columns × 16 rows, so d weight / d bias are accumulated over several row blocks."""
    monkeypatch.setattr(utils, "TORCH_CHUNK_BYTES", 16 * 128 * 4)
    real = ltl_module.linear_launch

    def one_block_per_split(n, v, dtype, device, interpreted, **kwargs):
        cfg = real(n, v, dtype, device, interpreted, **kwargs)
        return ltl_module.LinearLaunch(**{**cfg.__dict__, "splits": -(-v // cfg.block_v), "blocks_per_split": 1})

    monkeypatch.setattr(ltl_module, "linear_launch", one_block_per_split)


@DTYPES
@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_many_blocks_match_gold(impl, dtype, monkeypatch):
    force_small_blocks(monkeypatch)
    assert ltl_module.torch_blocks(63, 1000, 32, torch.device("cpu")) == (16, 128)
    check(impl, 63, 32, 1000, dtype, temperature=0.9)


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_masked_vocabulary_entries(impl):
    """A -inf bias masks vocabulary entries: they get p = 0 and no gradient, and are allowed where not the target."""
    inp = make_linear_inputs(63, 32, 300, F32, seed=3)
    bias = inp["bias"].clone()
    bias[200:] = float("-inf")
    targets = inp["targets"] % 200
    gl, ge = torch.randn(63), torch.randn(63)
    h, w, b = (x.clone().requires_grad_() for x in (inp["hidden"], inp["weight"], bias))
    logp, ent = linear_token_logprobs(h, w, targets, bias=b, temperature=0.9, return_entropy=True, impl=impl)
    ((gl * logp).sum() + (ge * ent).sum()).backward()
    g_logp, g_ent, (g_h, g_w, g_b) = gold_linear(
        gold_logprobs, inp["hidden"], inp["weight"], bias, targets, 0.9, gl, ge
    )
    assert_close(logp, g_logp, dtype=F32, name="logp")
    assert_close(ent, g_ent, dtype=F32, name="entropy")
    assert_close(h.grad, g_h, dtype=F32, name="d hidden", scale=g_h.abs().max().item())
    assert_close(w.grad, g_w, dtype=F32, name="d weight", scale=g_w.abs().max().item())
    assert_close(b.grad, g_b, dtype=F32, name="d bias", scale=g_b.abs().max().item())
    assert (w.grad[200:] == 0).all() and (b.grad[200:] == 0).all()


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_only_some_inputs_require_grad(impl):
    inp = make_linear_inputs(63, 32, 97, F32, seed=4)
    w = inp["weight"].clone().requires_grad_()
    logp = linear_token_logprobs(inp["hidden"], w, inp["targets"], bias=inp["bias"], impl=impl)
    logp.sum().backward()
    _, _, (_, g_w, _) = gold_linear(
        gold_logprobs, inp["hidden"], inp["weight"], inp["bias"], inp["targets"], 1.0, torch.ones(63)
    )
    assert_close(w.grad, g_w, dtype=F32, name="d weight", scale=g_w.abs().max().item())


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_no_grad_forward_bf16(impl):
    inp = make_linear_inputs(63, 96, 1000, BF16, seed=5)
    with torch.no_grad():
        logp = linear_token_logprobs(inp["hidden"], inp["weight"], inp["targets"], bias=inp["bias"], impl=impl)
    g_logp, _, _ = gold_linear(gold_logprobs, inp["hidden"], inp["weight"], inp["bias"], inp["targets"], 1.0)
    assert_close(logp, g_logp, dtype=F32, name="logp")


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_strided_inputs(impl):
    """Row-strided hidden (a slice of a packed batch) and a column-strided weight view."""
    inp = make_linear_inputs(63, 32, 97, F32, seed=6)
    hidden = torch.zeros(63, 40)
    hidden[:, :32] = inp["hidden"]
    weight_t = inp["weight"].t().contiguous().t()  # stride (1, V): copied for the Triton path
    logp = linear_token_logprobs(hidden[:, :32], weight_t, inp["targets"], bias=inp["bias"], impl=impl)
    g_logp, _, _ = gold_linear(gold_logprobs, inp["hidden"], inp["weight"], inp["bias"], inp["targets"], 1.0)
    assert_close(logp, g_logp, dtype=F32, name="logp")


def test_auto_is_the_torch_path_on_cpu():
    inp = make_linear_inputs(63, 32, 97, F32)
    args = (inp["hidden"], inp["weight"], inp["targets"])
    a = linear_token_logprobs(*args, bias=inp["bias"], return_entropy=True, impl="auto")
    b = linear_token_logprobs(*args, bias=inp["bias"], return_entropy=True, impl="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_reference_agrees_with_gold():
    inp = make_linear_inputs(63, 32, 1000, F32)
    args = (inp["hidden"].double(), inp["weight"].double(), inp["targets"])
    logp, ent = reference.linear_token_logprobs(*args, bias=inp["bias"].double(), temperature=0.7, return_entropy=True)
    g_logp, g_ent, _ = gold_linear(gold_logprobs, inp["hidden"], inp["weight"], inp["bias"], inp["targets"], 0.7)
    assert_close(logp, g_logp, dtype=torch.float64, name="reference logp")
    assert_close(ent, g_ent, dtype=torch.float64, name="reference entropy")


def test_torch_path_memory_is_bounded_by_the_chunk(monkeypatch):
    """Forward + backward allocate a few float32 [rows, V] chunks plus O((N + V)·d), never N·V."""
    n, d, v = 257, 32, 1000
    chunk = 16 * v * 4
    monkeypatch.setattr(utils, "TORCH_CHUNK_BYTES", chunk)
    inp = make_linear_inputs(n, d, v, BF16, seed=7)
    gl, ge = torch.randn(n), torch.randn(n)
    peaks = {}
    for name, fn in (
        ("ours", lambda h, w, b: linear_token_logprobs(h, w, inp["targets"], bias=b, return_entropy=True, impl="torch")),
        ("reference", lambda h, w, b: reference.linear_token_logprobs(h, w, inp["targets"], bias=b, return_entropy=True)),
    ):  # fmt: skip
        h, w, b = (x.clone().requires_grad_() for x in (inp["hidden"], inp["weight"], inp["bias"]))
        with AllocationTracker() as tracker:
            logp, ent = fn(h, w, b)
            ((gl * logp).sum() + (ge * ent).sum()).backward()
        peaks[name] = tracker.peak_bytes
    # float32 copies of weight and bias, the float32 d weight / d bias accumulators and the bf16 grads
    params = (v * d + v) * (4 + 4 + 2) + n * d * (4 + 2)
    assert peaks["ours"] <= params + 3 * chunk + 64 * n * 4, peaks
    assert peaks["reference"] >= 2 * n * v * 4, peaks  # [N, V] float32 buffers


@pytest.mark.parametrize("impl", [TORCH, TRITON])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
class TestBadInput:
    def call(self, impl, **overrides):
        inp = make_linear_inputs(20, 32, 97, F32, seed=10)
        inp.update(overrides)
        return linear_token_logprobs(
            inp["hidden"], inp["weight"], inp["targets"], bias=inp["bias"], return_entropy=True, impl=impl
        )

    def test_nan_hidden_names_the_rows(self, impl):
        hidden = make_linear_inputs(20, 32, 97, F32, seed=10)["hidden"]
        hidden[[3, 17], 5] = float("nan")
        with pytest.raises(
            ValueError, match=r"hidden contains non-finite values \(NaN or inf\) in 2 row\(s\), e.g. rows \[3, 17\]"
        ):
            self.call(impl, hidden=hidden)

    def test_nan_weight_names_the_vocabulary_rows(self, impl):
        weight = make_linear_inputs(20, 32, 97, F32, seed=10)["weight"]
        weight[41, 0] = float("inf")
        with pytest.raises(
            ValueError, match=r"weight \(the LM head\) contains non-finite .* 1 vocabulary row\(s\), e.g. rows \[41\]"
        ):
            self.call(impl, weight=weight)

    def test_nan_bias(self, impl):
        bias = make_linear_inputs(20, 32, 97, F32, seed=10)["bias"]
        bias[7] = float("nan")
        with pytest.raises(ValueError, match=r"bias contains NaN or \+inf at 1 vocabulary entries, e.g. \[7\]"):
            self.call(impl, bias=bias)

    def test_target_masked_by_minus_inf_bias(self, impl):
        inp = make_linear_inputs(20, 32, 97, F32, seed=10)
        bias = inp["bias"].clone()
        bias[inp["targets"][6]] = float("-inf")
        bad = (inp["targets"] == inp["targets"][6]).nonzero().flatten().tolist()
        with pytest.raises(ValueError, match=re.escape(f"target's logit is -inf at rows {bad}")):
            self.call(impl, bias=bias)

    @pytest.mark.parametrize("bad", [-1, 97, 10**6])
    def test_targets_out_of_range(self, impl, bad):
        targets = make_linear_inputs(20, 32, 97, F32, seed=10)["targets"]
        targets[4] = bad
        with pytest.raises(
            ValueError, match=rf"targets out of range \[0, V\) = \[0, 97\) at rows \[4\] \(values \[{bad}\]\)"
        ):
            self.call(impl, targets=targets)

    def test_shapes(self, impl):
        inp = make_linear_inputs(20, 32, 97, F32, seed=10)
        with pytest.raises(ValueError, match=r"hidden must be 2-D \[N, d\]"):
            self.call(impl, hidden=inp["hidden"].view(2, 10, 32))
        with pytest.raises(ValueError, match=r"weight \(the LM head\) must be 2-D \[V, d\] with d = 32"):
            self.call(impl, weight=inp["weight"].t())
        with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \(97,\)"):
            self.call(impl, bias=inp["bias"][:50])
        with pytest.raises(ValueError, match=r"targets must have shape \[N\] = \(20,\)"):
            self.call(impl, targets=inp["targets"][:5])
        with pytest.raises(ValueError, match=r"hidden is empty \(N = 0 tokens\)"):
            self.call(impl, hidden=inp["hidden"][:0], targets=inp["targets"][:0])
        with pytest.raises(ValueError, match="empty vocabulary"):
            self.call(impl, weight=inp["weight"][:0], bias=None)

    def test_dtypes(self, impl):
        inp = make_linear_inputs(20, 32, 97, F32, seed=10)
        with pytest.raises(TypeError, match=r"weight is bfloat16 but hidden is float32: .* weight.to\(hidden.dtype\)"):
            self.call(impl, weight=inp["weight"].bfloat16())
        with pytest.raises(TypeError, match=r"bias is float16 but hidden is float32"):
            self.call(impl, bias=inp["bias"].half())
        with pytest.raises(TypeError, match=r"hidden dtype must be one of .*; for float64 use kernels\.reference"):
            self.call(impl, hidden=inp["hidden"].double(), weight=inp["weight"].double(), bias=None)
        with pytest.raises(TypeError, match="targets must be an integer tensor"):
            self.call(impl, targets=inp["targets"].float())
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            linear_token_logprobs(inp["hidden"], inp["weight"], inp["targets"], temperature=0.0, impl=impl)


def test_triton_on_cpu_without_interpreter_says_how_to_run_it():
    code = (
        "import torch, kernels\n"
        "try:\n"
        "    kernels.linear_token_logprobs(torch.randn(2, 8), torch.randn(5, 8), torch.tensor([0, 1]), impl='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, check=False)
    assert r.returncode == 0, r.stderr
    assert "ERR impl='triton' got tensors on cpu" in r.stdout


@pytest.mark.gpu
@DTYPES
def test_gpu_compiled_kernels(dtype):
    """The compiled Triton kernels on CUDA (impl="auto") at the Qwen2.5-1.5B head shape."""
    check("auto", 2053, 1536, 151_936, dtype, temperature=0.9, device="cuda")


@pytest.mark.gpu
def test_gpu_matches_the_torch_path_at_7b_shape():
    """bf16, 7B head (d 3584, V 152064), 4k tokens: Triton and the torch path on CUDA agree (no float64 gold: 2 GB)."""
    n, d, v = 4096, 3584, 152_064
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(n, d, generator=g, device="cuda").to(BF16)
    weight = (torch.randn(v, d, generator=g, device="cuda") * (2.0 / d**0.5)).to(BF16)
    targets = torch.randint(0, v, (n,), generator=g, device="cuda")
    gl = torch.randn(n, generator=g, device="cuda")
    out = {}
    for impl in ("triton", "torch"):
        h, w = (x.clone().requires_grad_() for x in (hidden, weight))
        logp, ent = linear_token_logprobs(h, w, targets, return_entropy=True, impl=impl)
        ((gl * logp).sum() + 0.1 * ent.sum()).backward()
        out[impl] = (logp, ent, h.grad, w.grad)
    for name, a, e in zip(("logp", "entropy", "d hidden", "d weight"), out["triton"], out["torch"]):
        scale = max(e.abs().max().item(), 1e-6) if name.startswith("d ") else 1.0
        assert_close(a, e.double(), dtype=BF16 if name.startswith("d ") else F32, name=name, scale=scale)


H200_SMS = 132


def test_ctas_per_sm_at_hopper_limits():
    """Programs per SM from registers / shared memory / warps (sm_90: 64 Ki registers allocated per warp
    in units of 256, 228 KiB shared memory with 1 KiB reserved per program, 64 warps)."""
    assert ltl_module.ctas_per_sm(255, 96 * 1024, 8) == 1  # the bf16 forward as compiled: registers bind
    assert ltl_module.ctas_per_sm(128, 96 * 1024, 8) == 2  # 4096 registers per warp: 16 warps
    assert ltl_module.ctas_per_sm(128, 120 * 1024, 8) == 1  # shared memory binds
    assert ltl_module.ctas_per_sm(114, 24 * 1024, 8) == 2  # the fp32 backward (114 → 120 registers)
    assert ltl_module.ctas_per_sm(32, 0, 4) == 16  # warps bind
    assert ltl_module.ctas_per_sm(16, 0, 1) == 32  # programs bind


def fake_h200(monkeypatch):
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device=None: type("P", (), {"multi_processor_count": H200_SMS})()
    )
    monkeypatch.setattr(ltl_module, "_FWD_OCCUPANCY", {})


@pytest.mark.parametrize("n", [2048, 3000, 4096, 6144, 8192, 16384, 65536])
def test_forward_grid_fills_an_h200(n, monkeypatch):
    """The bf16 forward (255 registers: one program per SM) on 132 SMs: the vocabulary splits make the
    modeled SM use (whole waves of programs) ≥ 99 % from 2k tokens on; sizing the grid for two programs
    per SM, as before, gave 69 % at 2k and 81 % at 8k (asserted below for 2k, so the model can fail)."""
    fake_h200(monkeypatch)
    v = 151_936
    cfg = ltl_module.linear_launch(n, v, BF16, torch.device("cuda"), False)
    n_blocks, v_blocks = -(-n // cfg.block_n), -(-v // cfg.block_v)
    assert cfg.splits * cfg.blocks_per_split >= v_blocks > (cfg.splits - 1) * cfg.blocks_per_split
    assert ltl_module.sm_use(n_blocks, cfg.splits, cfg.blocks_per_split, v_blocks, H200_SMS) >= 0.99
    if n == 2048:  # two programs per SM assumed: 17 splits of 70 blocks, 272 programs in 3 waves of 132
        assert ltl_module.sm_use(n_blocks, 17, 70, v_blocks, H200_SMS) < 0.7


def test_forward_grid_follows_the_compiled_kernels_occupancy(monkeypatch):
    """After a launch reports its registers and shared memory, the next grid is sized for them."""
    fake_h200(monkeypatch)
    dev = torch.device("cuda")
    before = ltl_module.linear_launch(2048, 151_936, BF16, dev, False)
    compiled = type("K", (), {"n_regs": 80, "metadata": type("M", (), {"shared": 24 * 1024})()})()
    ltl_module.record_fwd_occupancy(compiled, BF16, dev, before.num_warps)
    assert ltl_module.fwd_ctas_per_sm(BF16, dev, before.num_warps) == 3
    after = ltl_module.linear_launch(2048, 151_936, BF16, dev, False)
    assert (after.splits, after.blocks_per_split) != (before.splits, before.blocks_per_split)
    assert ltl_module.sm_use(16, after.splits, after.blocks_per_split, 1187, 3 * H200_SMS) >= 0.95
    assert ltl_module.sm_use(16, before.splits, before.blocks_per_split, 1187, 3 * H200_SMS) < 0.7
    ltl_module.record_fwd_occupancy(object(), BF16, dev, before.num_warps)  # no n_regs: nothing changes
    assert ltl_module.fwd_ctas_per_sm(BF16, dev, before.num_warps) == 3
