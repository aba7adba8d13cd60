"""Every op, both implementations, every input non-contiguous: the result of contiguous inputs and the float64 gold.

Layouts: each per-token input (targets, old/ref log-probs, advantages, loss mask, cu_seqlens) and the
bias is every other element of a [n, 2] stack whose other column holds different valid values (so a
kernel that assumes unit stride reads wrong but in-range data and gives a wrong number, not an error);
logits and hidden are the first columns of a wider buffer (padded row stride) whose padding holds large
values; hidden and weight also come transposed (unit stride along the row, not along d); the upstream
gradients of `token_logprobs` / `linear_token_logprobs` (grad of logp and of the entropy) are strided too.
Forward values and every gradient are compared with the same call on contiguous copies and with the
float64 gold (tests/gold.py), at the `kernels.testing` tolerances; outputs are NaN-poisoned
(tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from gold import gold_linear, gold_logprobs, gold_loss, loss_args, make_inputs, make_linear_inputs

from kernels import flow_grpo_loss, linear_flow_grpo_loss, linear_token_logprobs, token_logprobs
from kernels.testing import assert_close

TORCH = pytest.param("torch", id="torch")
TRITON = pytest.param("triton", id="triton", marks=pytest.mark.interpreter)
IMPLS = pytest.mark.parametrize("impl", [TORCH, TRITON])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
F32 = torch.float32
N, D, V, T = 37, 40, 300, 0.8
# ref log-probs, both clip sides and the dual clip, an entropy term, and cu_seqlens in the aggregation
LOSS = {"loss_agg": "seq-mean-token-mean", "kl_type": "k3", "clip_ratio_c": 3.0, "entropy_coef": 0.01, "kl_coef": 0.05}
PER_TOKEN = ("targets", "old_logprobs", "advantages", "loss_mask")


def strided(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`x` [n] as column 0 of a [n, 2] stack (stride 2) whose column 1 is `other`."""
    out = torch.stack([x, other], 1)[:, 0]
    assert out.stride() == (2,) and torch.equal(out, x)
    return out


def decoy(name: str, x: torch.Tensor, v: int) -> torch.Tensor:
    """Values a unit-stride read would see instead of x's: valid, and different."""
    if name == "targets":
        return (x + 1 + x.numel() // 2) % v
    if name == "loss_mask":
        return ~x
    if name == "cu_seqlens":
        return x.flip(0)
    return x + 1.25


def padded(x: torch.Tensor, pad: int = 13) -> torch.Tensor:
    """`x` [n, k] as the first k columns of an [n, k + pad] buffer whose padding is 1e3."""
    buf = torch.full((x.shape[0], x.shape[1] + pad), 1e3, dtype=x.dtype)
    buf[:, : x.shape[1]] = x
    out = buf[:, : x.shape[1]]
    assert out.stride(0) == x.shape[1] + pad and torch.equal(out, x)
    return out


def transposed(x: torch.Tensor) -> torch.Tensor:
    """`x` [n, k] stored column-major (stride (1, n))."""
    out = x.t().contiguous().t()
    assert out.stride() == (1, x.shape[0]) and torch.equal(out, x)
    return out


def per_token_strided(inp: dict, v: int) -> dict:
    return {k: strided(inp[k], decoy(k, inp[k], v)) for k in (*PER_TOKEN, "cu_seqlens", "ref_logprobs")}


def close(actual, contiguous, gold, dtype, name, scale=1.0):
    assert_close(actual, contiguous, dtype=dtype, name=f"{name} vs contiguous", scale=scale)
    assert_close(actual, gold, dtype=dtype, name=f"{name} vs gold", scale=scale)


def grad_scale(g: torch.Tensor) -> float:
    return max(g.abs().max().item(), 1e-6)


@IMPLS
@DTYPES
def test_token_logprobs(impl, dtype):
    inp = make_inputs(N, V, dtype, seed=1, temperature=T)
    logits, targets = inp["logits"], inp["targets"]
    g = torch.Generator().manual_seed(2)
    grad_logp, grad_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    strided_args = (
        padded(logits),
        strided(targets, decoy("targets", targets, V)),
        strided(grad_logp, grad_logp + 1),
        strided(grad_ent, grad_ent - 1),
    )
    results = []
    for x, t, gl, ge in ((logits, targets, grad_logp, grad_ent), strided_args):
        leaf = x.detach().requires_grad_()
        logp, ent = token_logprobs(leaf, t, temperature=T, return_entropy=True, impl=impl)
        torch.autograd.backward([logp, ent], [gl, ge])
        results.append((logp, ent, leaf.grad))
    g_logp, g_ent, g_grad = gold_logprobs(logits, targets, T, grad_logp, grad_ent)
    (c_logp, c_ent, c_grad), (s_logp, s_ent, s_grad) = results
    close(s_logp, c_logp, g_logp, F32, "logp")
    close(s_ent, c_ent, g_ent, F32, "entropy")
    close(s_grad, c_grad, g_grad, dtype, "d logits", grad_scale(g_grad))


@IMPLS
@DTYPES
def test_flow_grpo_loss(impl, dtype):
    inp = make_inputs(N, V, dtype, seed=3, temperature=T)
    logits = inp.pop("logits")
    results = []
    for x, args in ((logits, inp), (padded(logits), per_token_strided(inp, V))):
        leaf = x.detach().requires_grad_()
        out = flow_grpo_loss(leaf, **args, **loss_args(**LOSS, temperature=T), impl=impl)
        out.loss.backward()
        results.append((out, leaf.grad))
    g_loss, g_metrics, g_grad = gold_loss(logits, **inp, **LOSS, temperature=T)
    (c_out, c_grad), (s_out, s_grad) = results
    close(s_out.loss, c_out.loss, g_loss, F32, "loss")
    for key, value in s_out.metrics.items():
        close(value, c_out.metrics[key], g_metrics[key], F32, f"metric {key}")
    close(s_grad, c_grad, g_grad, dtype, "d logits", grad_scale(g_grad))


LAYOUTS = pytest.mark.parametrize("layout", ["transposed", "padded"])


def linear_layout(layout: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """hidden, weight, bias in the layout: transposed (copied by the Triton path) or padded rows (read in place)."""
    if layout == "transposed":
        h, w = transposed(hidden), transposed(weight)
    else:
        h, w = padded(hidden), padded(weight, pad=7)
    return h, w, strided(bias, bias.flip(0))


def linear_grads(leaves, outputs, upstream=None):
    torch.autograd.backward(outputs, upstream)
    return [x.grad for x in leaves]


@IMPLS
@DTYPES
@LAYOUTS
def test_linear_token_logprobs(impl, dtype, layout):
    inp = make_linear_inputs(N, D, V, dtype, seed=4, temperature=T)
    hidden, weight, bias, targets = inp["hidden"], inp["weight"], inp["bias"], inp["targets"]
    g = torch.Generator().manual_seed(5)
    grad_logp, grad_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    strided_args = (
        *linear_layout(layout, hidden, weight, bias),
        strided(targets, decoy("targets", targets, V)),
        strided(grad_logp, grad_logp + 1),
        strided(grad_ent, grad_ent - 1),
    )
    results = []
    for h, w, b, t, gl, ge in ((hidden, weight, bias, targets, grad_logp, grad_ent), strided_args):
        leaves = [x.detach().requires_grad_() for x in (h, w, b)]
        logp, ent = linear_token_logprobs(
            leaves[0], leaves[1], t, bias=leaves[2], temperature=T, return_entropy=True, impl=impl
        )
        results.append((logp, ent, linear_grads(leaves, [logp, ent], [gl, ge])))
    g_logp, g_ent, g_grads = gold_linear(gold_logprobs, hidden, weight, bias, targets, T, grad_logp, grad_ent)
    (c_logp, c_ent, c_grads), (s_logp, s_ent, s_grads) = results
    close(s_logp, c_logp, g_logp, F32, "logp")
    close(s_ent, c_ent, g_ent, F32, "entropy")
    for name, s, c, gold in zip(("d hidden", "d weight", "d bias"), s_grads, c_grads, g_grads):
        close(s, c, gold, dtype, name, grad_scale(gold))


@IMPLS
@DTYPES
@LAYOUTS
def test_linear_flow_grpo_loss(impl, dtype, layout):
    inp = make_linear_inputs(N, D, V, dtype, seed=6, temperature=T)
    hidden, weight, bias = inp.pop("hidden"), inp.pop("weight"), inp.pop("bias")
    results = []
    for (h, w, b), args in (
        ((hidden, weight, bias), inp),
        (linear_layout(layout, hidden, weight, bias), per_token_strided(inp, V)),
    ):
        leaves = [x.detach().requires_grad_() for x in (h, w, b)]
        out = linear_flow_grpo_loss(
            leaves[0], leaves[1], bias=leaves[2], **args, **loss_args(**LOSS, temperature=T), impl=impl
        )
        results.append((out, linear_grads(leaves, [out.loss])))
    g_loss, g_metrics, g_grads = gold_linear(gold_loss, hidden, weight, bias, **inp, **LOSS, temperature=T)
    (c_out, c_grads), (s_out, s_grads) = results
    close(s_out.loss, c_out.loss, g_loss, F32, "loss")
    for key, value in s_out.metrics.items():
        close(value, c_out.metrics[key], g_metrics[key], F32, f"metric {key}")
    for name, s, c, gold in zip(("d hidden", "d weight", "d bias"), s_grads, c_grads, g_grads):
        close(s, c, gold, dtype, name, grad_scale(gold))
