"""`kernels.linear_chunked` (algorithm="chunked" of the LM-head ops) against the float64 gold.

Both ops, forward and backward, on the torch twin (default lane) and the Triton epilogue
(`interpreter` lane): every (loss_agg, kl_type, dual clip) config, odd N (1, 63, 257), V not a power
of two, chunks that do not divide N (`CHUNK_BYTES_CPU` lowered to 10 or 7 rows), with and without a
bias, a tied embedding, non-contiguous inputs, fp32 / bf16 / fp16, NaN-poisoned outputs
(tests/conftest.py), the no-grad forward and the scaling by the output gradient.

Tolerances: the `kernels.testing` entries, none loosened. Observed (this machine, torch 2.13 CPU,
triton 3.9 interpreter): loss and log-probs |err| ≤ 3e-6 for every dtype (float32 logits); gradient
error / largest gold gradient fp32 ≤ 3e-6, bf16 ≤ 7.3e-3 (dZ and the outputs rounded to bf16).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from gold import AGGS, CONFIGS, KLS, METRICS, config_id, gold_linear, gold_loss, loss_args
from gold import make_linear_inputs as make_inputs
from test_linear_flow_grpo_loss import split
from test_linear_token_logprobs import check as check_logprobs_against_gold

from kernels import LossConfig, linear_flow_grpo_loss, linear_token_logprobs
from kernels.testing import assert_close

lc = importlib.import_module("kernels.linear_chunked")
TORCH = pytest.param("torch", id="torch")
TRITON = pytest.param("triton", id="triton", marks=pytest.mark.interpreter)
IMPLS = pytest.mark.parametrize("impl", [TORCH, TRITON])
F32, BF16 = torch.float32, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])


@pytest.fixture
def chunk_of(monkeypatch):
    """chunk_of(rows, v): chunks of `rows` rows for a vocabulary of v (the CPU byte budget lowered)."""

    def set_rows(rows: int, v: int) -> None:
        monkeypatch.setattr(lc, "CHUNK_BYTES_CPU", rows * 4 * lc.padded_width(v))
        monkeypatch.setattr(lc, "CHUNK_MIN_ROWS_CPU", 1)
        assert lc.chunk_rows(10_000, v, torch.device("cpu")) == rows

    return set_rows


def grads_of(leaves):
    return [None if x is None else x.grad for x in leaves]


def check_loss(impl, inp, dtype, cfg, *, temperature=0.8, scale_out=1.0, leaves=None):
    hidden, weight, bias, args, kw = split(inp)
    kwargs = {**kw, **cfg, "temperature": temperature}
    if leaves is None:
        leaves = [None if x is None else x.clone().requires_grad_() for x in (hidden, weight, bias)]
    h, w, b = leaves
    out = linear_flow_grpo_loss(h, w, *args, bias=b, **loss_args(**kwargs), impl=impl, algorithm="chunked")
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    (out.loss * scale_out).backward()
    g_loss, g_metrics, g_grads = gold_linear(gold_loss, hidden, weight, bias, *args, **kwargs)
    assert_close(out.loss, g_loss, dtype=F32, name="loss")
    assert set(out.metrics) == set(METRICS)
    for key in METRICS:
        assert_close(out.metrics[key], g_metrics[key], dtype=F32, name=f"metric {key}")
    for name, leaf, gold in zip(("d hidden", "d weight", "d bias"), leaves, g_grads):
        if leaf is not None:
            gold = gold * scale_out
            assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape
            assert_close(leaf.grad, gold, dtype=dtype, name=name, scale=max(gold.abs().max().item(), 1e-6))
    return g_metrics


SHAPES = [(1, 32, 97), (63, 32, 1000), (257, 96, 1000), (63, 96, 5003)]
# the interpreter runs one program per row in numpy calls: smaller rows there (still several blocks per row)
INTERPRETED_SHAPES = [(1, 32, 97), (63, 32, 1000), (257, 32, 300)]
SHAPE_CASES = [pytest.param("torch", *s, id=f"torch-{s[0]}x{s[1]}x{s[2]}") for s in SHAPES] + [
    pytest.param("triton", *s, id=f"triton-{s[0]}x{s[1]}x{s[2]}", marks=pytest.mark.interpreter)
    for s in INTERPRETED_SHAPES
]


@DTYPES
@pytest.mark.parametrize(("impl", "n", "d", "v"), SHAPE_CASES)
def test_loss_odd_shapes_and_chunk_boundaries(impl, n, d, v, dtype, chunk_of):
    """10-row chunks: 63 = 6·10 + 3, 257 = 25·10 + 7; a bias on some shapes, not on others."""
    i = n % 7 + d % 5 + v % 3 + 4 * (dtype == BF16)
    chunk_of(10, v)
    inp = make_inputs(n, d, v, dtype, seed=i, temperature=(0.8, 1.0, 1.3)[i % 3], with_bias=dtype == F32)
    check_loss(impl, inp, dtype, CONFIGS[(5 * i) % len(CONFIGS)], temperature=(0.8, 1.0, 1.3)[i % 3])


# the interpreter lane: each (loss_agg, kl_type) once, dual clip and entropy term alternating
INTERPRETED_CONFIGS = [CONFIGS[2 * j + j % 2] for j in range(len(CONFIGS) // 2)]
CONFIG_CASES = [pytest.param("torch", c, id=f"torch-{config_id(c)}") for c in CONFIGS] + [
    pytest.param("triton", c, id=f"triton-{config_id(c)}", marks=pytest.mark.interpreter) for c in INTERPRETED_CONFIGS
]


@pytest.mark.parametrize(("impl", "cfg"), CONFIG_CASES)
def test_loss_every_config(impl, cfg, chunk_of):
    for configs in (CONFIGS, INTERPRETED_CONFIGS):
        assert {(c["loss_agg"], c["kl_type"]) for c in configs} == {(a, k) for a in AGGS for k in KLS}
    chunk_of(7, 150)
    metrics = check_loss(impl, make_inputs(63, 32, 150, F32, seed=1, temperature=0.8), F32, cfg)
    assert 0.1 < metrics["clipfrac"] < 0.9  # the inputs exercise both clip sides
    if cfg["clip_ratio_c"] is not None:
        assert metrics["clipfrac_lower"] > 0


@IMPLS
def test_loss_one_chunk_float16_and_output_gradient(impl):
    """All rows in one chunk (d weight written once, in the input dtype); loss·2.5 scales the gradients."""
    inp = make_inputs(63, 96, 1000, torch.float16, seed=2, temperature=0.9)
    check_loss(impl, inp, torch.float16, CONFIGS[7], temperature=0.9, scale_out=2.5)


@IMPLS
def test_loss_non_contiguous_inputs(impl, chunk_of):
    """hidden and weight as strided views, per-token inputs as every other element of a wider tensor."""
    chunk_of(10, 1000)
    inp = make_inputs(63, 32, 1000, BF16, seed=3, temperature=0.8)
    wide_h = torch.zeros(63, 80, dtype=BF16)
    wide_h[:, 5:37] = inp["hidden"]
    wide_w = torch.zeros(32, 1000, dtype=BF16)  # weight.T stored: weight is a transposed view
    wide_w.copy_(inp["weight"].T)
    leaves = [wide_h.clone().requires_grad_(), wide_w.clone().requires_grad_(), inp["bias"].clone().requires_grad_()]
    views = [leaves[0][:, 5:37], leaves[1].T, leaves[2]]
    assert not views[0].is_contiguous() and not views[1].is_contiguous()
    for k in ("old_logprobs", "advantages", "ref_logprobs"):
        strided = torch.zeros(126)
        strided[::2] = inp[k]
        inp[k] = strided[::2]
    hidden, weight, bias, args, kw = split(inp)
    cfg = {**kw, **CONFIGS[9], "temperature": 0.8}
    out = linear_flow_grpo_loss(*views[:2], *args, bias=views[2], **loss_args(**cfg), impl=impl, algorithm="chunked")
    out.loss.backward()
    g_loss, _, (g_h, g_w, g_b) = gold_linear(gold_loss, hidden, weight, bias, *args, **cfg)
    assert_close(out.loss, g_loss, dtype=F32, name="loss")
    assert_close(leaves[0].grad[:, 5:37], g_h, dtype=BF16, name="d hidden", scale=g_h.abs().max().item())
    assert torch.equal(leaves[0].grad[:, :5], torch.zeros(63, 5, dtype=BF16))
    assert_close(leaves[1].grad.T, g_w, dtype=BF16, name="d weight", scale=g_w.abs().max().item())
    assert_close(leaves[2].grad, g_b, dtype=BF16, name="d bias", scale=g_b.abs().max().item())


@IMPLS
def test_loss_tied_embedding(impl, chunk_of):
    """The head is the input embedding: its gradient is the lookup's plus the head's."""
    n, d, v = 63, 32, 300
    chunk_of(10, v)
    inp = make_inputs(n, d, v, F32, seed=8)
    _, _, _, (targets, old, adv, mask), kw = split(inp)
    ids = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(9))
    cfg = {**kw, **CONFIGS[4], "temperature": 0.9}
    emb = inp["weight"].clone().requires_grad_()
    hidden = torch.tanh(torch.nn.functional.embedding(ids, emb)) * 3
    out = linear_flow_grpo_loss(
        hidden, emb, targets, old, adv, mask, **loss_args(**cfg), impl=impl, algorithm="chunked"
    )
    out.loss.backward()
    w64 = inp["weight"].double().requires_grad_()
    h64 = torch.tanh(torch.nn.functional.embedding(ids, w64)) * 3
    g_loss, _, (g_h, g_w_head, _) = gold_linear(gold_loss, h64, w64, None, targets, old, adv, mask, **cfg)
    h64.backward(g_h)
    total = w64.grad + g_w_head
    assert_close(out.loss, g_loss, dtype=F32, name="loss")
    assert_close(emb.grad, total, dtype=F32, name="tied d weight", scale=total.abs().max().item())
    assert w64.grad.abs().max() > 0.1 * total.abs().max() and g_w_head.abs().max() > 0.1 * total.abs().max()


@IMPLS
def test_loss_without_grad_and_same_as_fused(impl, chunk_of):
    """Under no_grad only the stats are formed; loss and metrics equal the fused algorithm's."""
    chunk_of(10, 1000)
    hidden, weight, bias, args, kw = split(make_inputs(63, 32, 1000, F32, seed=5))
    cfg = loss_args(**kw, **CONFIGS[11], temperature=0.9)
    with torch.no_grad():
        a = linear_flow_grpo_loss(hidden, weight, *args, bias=bias, **cfg, impl=impl, algorithm="chunked")
    b = linear_flow_grpo_loss(hidden, weight, *args, bias=bias, **cfg, impl=impl, algorithm="fused")
    assert not a.loss.requires_grad
    assert_close(a.loss, b.loss.double(), dtype=F32, name="loss")
    for key in METRICS:
        assert_close(a.metrics[key], b.metrics[key], dtype=F32, name=key)


def check_logprobs(impl, n, d, v, dtype, **kw):
    check_logprobs_against_gold(impl, n, d, v, dtype, algorithm="chunked", **kw)


@DTYPES
@pytest.mark.parametrize(("impl", "n", "d", "v"), SHAPE_CASES)
def test_logprobs_odd_shapes_and_chunk_boundaries(impl, n, d, v, dtype, chunk_of):
    i = n % 7 + d % 5 + v % 3 + 4 * (dtype == BF16)
    chunk_of(10, v)
    check_logprobs(impl, n, d, v, dtype, temperature=(0.7, 1.0, 1.3)[i % 3], with_bias=dtype == BF16, seed=i)


@IMPLS
def test_logprobs_without_entropy_one_chunk(impl):
    check_logprobs(impl, 63, 32, 1000, F32, return_entropy=False)
    check_logprobs(impl, 63, 96, 97, BF16, return_entropy=False, temperature=0.5)


def test_algorithm_choice():
    cpu = torch.device("cpu")
    assert lc.resolve_algorithm("auto", cpu) == lc.DEFAULT_ALGORITHM["cpu"]
    assert lc.resolve_algorithm("chunked", cpu) == "chunked" and lc.resolve_algorithm("fused", cpu) == "fused"
    hidden, weight, _, args, _ = split(make_inputs(8, 32, 97, F32))
    with pytest.raises(ValueError, match=r"^algorithm must be one of \('auto', 'fused', 'chunked'\), got 'chunk'$"):
        linear_flow_grpo_loss(hidden, weight, *args, LossConfig(), algorithm="chunk")
    with pytest.raises(ValueError, match=r"^algorithm must be one of"):
        linear_token_logprobs(hidden, weight, args[0], algorithm="materialize")


def test_chunk_rows_budget(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(lc, "CHUNK_BYTES_CPU", 4 * 1008 * 37 + 5)  # rows of V' = 1008 (1000 padded to 16)
    monkeypatch.setattr(lc, "CHUNK_MIN_ROWS_CPU", 1)
    assert lc.chunk_rows(1000, 1000, cpu) == 37
    assert lc.chunk_rows(20, 1000, cpu) == 20  # never more than N
    assert lc.chunk_rows(20, 10**9, cpu) == 1  # at least one row
    monkeypatch.setattr(lc, "CHUNK_MIN_ROWS_CPU", 50)
    assert lc.chunk_rows(1000, 1000, cpu) == 50 and lc.chunk_rows(20, 1000, cpu) == 20


@pytest.mark.parametrize("v", [1, 97, 300, 1000, 5003])
def test_chunk_buffer_rows_start_aligned(v):
    """Every row of the chunk buffer starts 64-byte aligned for any V (the epilogue's 16-byte vectors), and a
    GEMM writes the padded view in place; the bf16 dZ view starts each row where its float32 row starts."""
    z = lc.chunk_buffer(7, v, torch.device("cpu"))
    assert z.shape == (7, v) and z.dtype == F32
    assert z.stride() == (lc.padded_width(v), 1) and lc.padded_width(v) % 16 == 0 and lc.padded_width(v) - v < 16
    assert all(z[i].data_ptr() % 64 == 0 for i in range(7))
    a, b = torch.randn(7, 5), torch.randn(v, 5)
    ptr = z.data_ptr()
    torch.mm(a, b.t(), out=z)
    assert z.data_ptr() == ptr
    assert_close(z, a.double() @ b.double().t(), dtype=F32, name="logits")
    dz = lc._dz_view(z, BF16)
    assert dz.shape == (7, v) and all(dz[i].data_ptr() == z[i].data_ptr() for i in range(7))


@IMPLS
def test_second_backward_is_refused(impl):
    """The gradient is formed in the forward and scaled in place by the backward: a second backward through
    the same forward (retain_graph) would scale it twice, so it is an error."""
    hidden, weight, _, args, _ = split(make_inputs(9, 32, 97, F32, seed=4))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_flow_grpo_loss(h, w, *args, LossConfig(), impl=impl, algorithm="chunked")
    out.loss.backward(retain_graph=True)
    first = w.grad.clone()
    with pytest.raises(RuntimeError, match=r"backward through the chunked LM-head loss ran twice"):
        out.loss.backward()
    assert torch.equal(w.grad, first)
