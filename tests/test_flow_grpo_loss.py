"""`kernels.flow_grpo_loss` against a float64 gold: loss, every metric and d logits, on both paths.

The gold (`gold_loss`, tests/gold.py) is float64 autograd over the DESIGN.md "Loss" formulas, with
the aggregation weights computed by a plain Python loop over the sequences, independently of the
kernels and of `kernels.reference` (which is checked against it too). Gradient conventions are
autograd's: no gradient where the clipped term strictly dominates, where the dual clip is active,
or where the k3 clamp is active.

Inputs are built so that every branch is taken: ratios spread over [0.2, 5] (both clip sides and
the dual clip at c = 3), advantages of both signs and exactly 0, ref log-probs ±2 nats away
(k3 clamp active on some tokens), packed sequences of which one is fully masked and one empty.

Tolerances: the loss, metrics and log-prob-derived values are float32 results for every input
dtype (float32 entry; observed |err| ≤ 1.6e-6 on the loss, ≤ 5.7e-6 on metrics). Gradients are
written in the logits dtype and compared with its entry, scaled by the largest gold gradient (the
aggregation weights make them of order 1/N): observed error relative to that scale fp32 ≤ 9e-7,
fp16 ≤ 3.4e-4, bf16 ≤ 6.2e-3 (bf16 rounding; truncation under the interpreter).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gold import AGGS, CONFIGS, METRICS, config_id, gold_loss, loss_args, make_inputs

from kernels import LossOutput, flow_grpo_loss, reference, utils
from kernels.testing import AllocationTracker, assert_close

REPO = Path(__file__).resolve().parents[1]

TORCH = pytest.param("torch", id="torch")
TRITON = pytest.param("triton", id="triton", marks=pytest.mark.interpreter)
F32, BF16 = torch.float32, torch.bfloat16


def check(impl, n, v, dtype, cfg, *, temperature=0.8, seed=0, inplace=False, device="cpu"):
    inp = make_inputs(n, v, dtype, seed, temperature, device)
    logits = inp.pop("logits")
    kwargs = {**cfg, "temperature": temperature}
    base = logits.clone().requires_grad_()
    x = base * 1 if inplace else base
    out = flow_grpo_loss(x, **inp, **loss_args(**kwargs), impl=impl, inplace_backward=inplace)
    assert isinstance(out, LossOutput) and out.loss.dim() == 0 and out.loss.dtype == torch.float32
    out.loss.backward()
    g_loss, g_metrics, g_grad = gold_loss(logits, **inp, **kwargs)
    assert_close(out.loss, g_loss, dtype=F32, name="loss")
    assert set(out.metrics) == set(METRICS)
    for key in METRICS:
        assert isinstance(out.metrics[key], float), key
        assert_close(out.metrics[key], g_metrics[key], dtype=F32, name=f"metric {key}")
    assert base.grad.dtype == dtype
    assert_close(base.grad, g_grad, dtype=dtype, name="d logits", scale=max(g_grad.abs().max().item(), 1e-6))
    if inplace:
        assert torch.equal(x.detach(), base.grad), "the gradient must live in the logits buffer"
    return g_metrics


SHAPES = [(n, v) for n in (1, 63, 257) for v in (1, 97, 1000, 50257)]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "v"), SHAPES, ids=[f"{n}x{v}" for n, v in SHAPES])
def test_torch_path_odd_shapes(n, v, dtype):
    cfg = CONFIGS[SHAPES.index((n, v)) % len(CONFIGS)]
    check("torch", n, v, dtype, cfg)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_torch_path_every_config(cfg, dtype):
    metrics = check("torch", 257, 1000, dtype, cfg)
    # the inputs really exercise the branches
    assert 0.1 < metrics["clipfrac"] < 0.9
    assert metrics["num_seqs"] <= 4  # of 6 sequences: an empty and a fully masked one do not count
    if cfg["clip_ratio_c"] is not None:
        assert metrics["clipfrac_lower"] > 0


TRITON_SHAPES = [(n, v) for n in (1, 63, 257) for v in (1, 97, 1000)] + [(5, 50257)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "v"), TRITON_SHAPES, ids=[f"{n}x{v}" for n, v in TRITON_SHAPES])
def test_triton_odd_shapes(n, v, dtype):
    i = TRITON_SHAPES.index((n, v)) + (dtype == BF16) * len(TRITON_SHAPES)
    check("triton", n, v, dtype, CONFIGS[i % len(CONFIGS)], temperature=1.3)


@pytest.mark.interpreter
def test_triton_qwen_vocabulary_in_place():
    """Qwen's 151 665-entry vocabulary (not a multiple of the 8-element vector: consecutive rows start at
    different 16-byte phases, each split into head, vector body and tail), d logits in place."""
    check("triton", 3, 151_665, BF16, CONFIGS[3], temperature=0.9, inplace=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_triton_every_config(cfg):
    check("triton", 63, 97, F32, cfg)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_inplace_backward(impl, dtype):
    check(impl, 63, 1000, dtype, CONFIGS[5], inplace=True)


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_float16_logits(impl):
    check(impl, 63, 1000, torch.float16, CONFIGS[7])


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_temperature_one_no_ref_defaults(impl):
    inp = make_inputs(63, 97, F32, seed=2)
    inp.pop("ref_logprobs")
    logits = inp.pop("logits").requires_grad_()
    out = flow_grpo_loss(logits, **inp, impl=impl)
    out.loss.backward()
    g_loss, _, g_grad = gold_loss(logits, **inp)
    assert_close(out.loss, g_loss, dtype=F32, name="loss")
    assert out.metrics["kl"] == 0.0
    assert_close(logits.grad, g_grad, dtype=F32, scale=g_grad.abs().max().item())


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("impl", [TORCH, TRITON])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_all_masked_batch_is_zero_not_nan(impl, agg):
    inp = make_inputs(63, 97, F32, seed=4)
    inp["loss_mask"] = torch.zeros(63, dtype=torch.bool)
    inp["old_logprobs"][:5] = -200.0  # huge ratios on unmasked tokens must not leak in as inf·0
    logits = inp.pop("logits").requires_grad_()
    out = flow_grpo_loss(
        logits, **inp, **loss_args(loss_agg=agg, kl_coef=0.1, entropy_coef=0.01, clip_ratio_c=3.0), impl=impl
    )
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert out.metrics == dict.fromkeys(METRICS, 0.0)


@pytest.mark.parametrize("impl", [TORCH, TRITON, "reference"])
def test_log_ratio_is_clamped_at_20_as_verl(impl):
    """|logp − old| beyond 20: ratio = e^{±20} exactly and no gradient through the ratio (verl's clamp)."""
    inp = make_inputs(63, 97, F32, seed=9)
    inp.pop("ref_logprobs")
    inp["loss_mask"] = torch.ones(63, dtype=torch.bool)
    logits = inp.pop("logits").requires_grad_()
    with torch.no_grad():
        logp = torch.log_softmax(logits.double() / 0.8, -1).gather(1, inp["targets"].long()[:, None])[:, 0]
    inp["old_logprobs"][:4] = (logp[:4] - 25.0).float()  # ratio e^25 unclamped
    inp["old_logprobs"][4:8] = (logp[4:8] + 25.0).float()  # ratio e^-25 unclamped
    inp["advantages"][:8] = torch.tensor([1.0, -1.0] * 4)
    args = loss_args(temperature=0.8)
    op = reference.flow_grpo_loss if impl == "reference" else lambda *a, **k: flow_grpo_loss(*a, **k, impl=impl)
    out = op(logits, **inp, **args)
    out.loss.backward()
    g_loss, _, g_grad = gold_loss(logits, **inp, temperature=0.8)
    assert_close(out.loss, g_loss, dtype=F32, scale=abs(g_loss.item()), name="loss")
    assert out.metrics["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-5)
    assert_close(logits.grad, g_grad, dtype=F32, scale=g_grad.abs().max().item(), name="d logits")
    # A < 0 with the ratio past e^20: the unclipped pg = -A e^20 wins, yet no gradient flows through the clamp
    assert torch.equal(logits.grad[[1, 3]], torch.zeros_like(logits.grad[[1, 3]]))
    assert logits.grad[8:].abs().max() > 0


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_fully_masked_sequences_do_not_count(impl):
    """Two sequences with masked tokens, two without: seq-mean divides by 2, not 4."""
    inp = make_inputs(40, 97, F32, seed=6)
    inp["cu_seqlens"] = torch.tensor([0, 10, 20, 30, 40], dtype=torch.int32)
    inp["loss_mask"] = torch.zeros(40, dtype=torch.bool)
    inp["loss_mask"][2:7] = True
    inp["loss_mask"][31:33] = True
    logits = inp.pop("logits")
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        out = flow_grpo_loss(logits, **inp, **loss_args(loss_agg=agg), impl=impl)
        g_loss, g_metrics, _ = gold_loss(logits, **inp, loss_agg=agg)
        assert out.metrics["num_seqs"] == 2.0 == g_metrics["num_seqs"]
        assert_close(out.loss, g_loss, dtype=F32, name=agg)


def test_mask_dtypes_are_equivalent():
    inp = make_inputs(63, 97, F32, seed=7)
    mask = inp.pop("loss_mask")
    outs = [
        flow_grpo_loss(**inp, loss_mask=m, **loss_args(loss_agg="seq-mean-token-mean"))
        for m in (mask, mask.int(), mask.float())
    ]
    assert all(torch.equal(o.loss, outs[0].loss) and o.metrics == outs[0].metrics for o in outs)


def test_auto_is_the_torch_path_on_cpu():
    inp = make_inputs(63, 97, F32)
    a = flow_grpo_loss(**inp, **loss_args(kl_coef=0.1), impl="auto")
    b = flow_grpo_loss(**inp, **loss_args(kl_coef=0.1), impl="torch")
    assert torch.equal(a.loss, b.loss) and a.metrics == b.metrics


@pytest.mark.parametrize("cfg", CONFIGS[::5], ids=[config_id(c) for c in CONFIGS[::5]])
def test_reference_agrees_with_gold(cfg):
    inp = make_inputs(63, 97, F32, seed=8)
    logits = inp.pop("logits").double().requires_grad_()
    ref = reference.flow_grpo_loss(logits, **inp, **loss_args(**cfg, temperature=0.8))
    ref.loss.backward()
    g_loss, g_metrics, g_grad = gold_loss(logits, **inp, **cfg, temperature=0.8)
    # the reference's aggregation weights are float32: 6e-8 relative
    assert_close(ref.loss, g_loss, dtype=F32, name="reference loss")
    assert_close(logits.grad, g_grad, dtype=F32, name="reference grad", scale=g_grad.abs().max().item())
    for key in METRICS:
        assert_close(ref.metrics[key], g_metrics[key], dtype=F32, name=f"reference {key}")


def test_torch_path_memory_is_bounded_by_the_chunk(monkeypatch):
    """Forward + backward of the torch path allocate d logits plus a few [rows, V] chunks, never N·V float32."""
    n, v = 257, 1000
    chunk = 16 * v * 4
    monkeypatch.setattr(utils, "TORCH_CHUNK_BYTES", chunk)
    for dtype, inplace in ((BF16, False), (F32, True)):
        inp = make_inputs(n, v, dtype, seed=9)
        logits = inp.pop("logits")
        peaks = {}
        for name, fn in (
            ("ours", lambda x: flow_grpo_loss(x, **inp, **loss_args(kl_coef=0.1, entropy_coef=0.01), impl="torch", inplace_backward=inplace)),  # noqa: B023
            ("reference", lambda x: reference.flow_grpo_loss(x, **inp, **loss_args(kl_coef=0.1, entropy_coef=0.01))),  # noqa: B023
        ):  # fmt: skip
            leaf = logits.clone().requires_grad_()
            with AllocationTracker() as tracker:
                x = leaf * 1  # the buffer the in-place backward may overwrite
                fn(x).loss.backward()
            peaks[name] = tracker.peak_bytes
        # allocated regardless of the loss: x (N·V) and its gradient flowing into the leaf (N·V)
        outside = 2 * n * v * dtype.itemsize
        grad_buffer = 0 if inplace else n * v * dtype.itemsize
        assert peaks["ours"] - outside - grad_buffer <= 2 * chunk + 64 * n * 4, (dtype, peaks)
        assert peaks["reference"] - outside >= 2 * n * v * 4, (dtype, peaks)


@pytest.mark.parametrize("impl", [TORCH, TRITON])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
class TestBadInput:
    def call(self, impl, **overrides):
        inp = make_inputs(63, 97, F32, seed=10)
        inp.update(overrides)
        return flow_grpo_loss(**loss_args(**inp), impl=impl)

    def test_nan_logits_name_the_rows(self, impl):
        logits = make_inputs(63, 97, F32, seed=10)["logits"]
        logits[[7, 21], 3] = float("nan")
        with pytest.raises(
            ValueError, match=r"logits contain non-finite values \(NaN or \+inf\) in 2 row\(s\), e.g. rows \[7, 21\]"
        ):
            self.call(impl, logits=logits)

    def test_inf_logits(self, impl):
        logits = make_inputs(63, 97, F32, seed=10)["logits"]
        logits[50, 0] = float("inf")
        with pytest.raises(ValueError, match=r"rows \[50\] \(\['\+inf'\]\)"):
            self.call(impl, logits=logits)

    def test_targets_out_of_range(self, impl):
        targets = make_inputs(63, 97, F32, seed=10)["targets"]
        targets[9] = 97
        with pytest.raises(ValueError, match=r"targets out of range \[0, V\) = \[0, 97\) at rows \[9\]"):
            self.call(impl, targets=targets)

    def test_nan_per_token_inputs_on_masked_tokens(self, impl):
        inp = make_inputs(63, 97, F32, seed=10)
        first = int(inp["loss_mask"].nonzero()[0])
        old = inp["old_logprobs"].clone()
        old[first] = float("nan")
        with pytest.raises(
            ValueError, match=rf"non-finite values in \['old_logprobs'\] at masked tokens, e.g. rows \[{first}\]"
        ):
            self.call(impl, old_logprobs=old)
        unmasked = int((~inp["loss_mask"]).nonzero()[0])
        adv = inp["advantages"].clone()
        adv[unmasked] = float("nan")  # ignored where the mask is 0
        assert torch.isfinite(self.call(impl, advantages=adv).loss)

    def test_shapes(self, impl):
        with pytest.raises(ValueError, match=r"old_logprobs must have shape \[N\] = \(63,\)"):
            self.call(impl, old_logprobs=torch.zeros(62))
        with pytest.raises(ValueError, match=r"advantages must have shape \[N\] = \(63,\)"):
            self.call(impl, advantages=torch.zeros(63, 1))
        with pytest.raises(ValueError, match=r"ref_logprobs must have shape \[N\]"):
            self.call(impl, ref_logprobs=torch.zeros(64))
        with pytest.raises(ValueError, match=r"loss_mask must have shape \[N\]"):
            self.call(impl, loss_mask=torch.ones(64, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"targets must have shape \[N\]"):
            self.call(impl, targets=torch.zeros(63, 1, dtype=torch.long))
        with pytest.raises(ValueError, match=r"logits must be 2-D"):
            self.call(impl, logits=torch.zeros(63))

    def test_dtypes(self, impl):
        with pytest.raises(TypeError, match="old_logprobs must be a floating-point tensor"):
            self.call(impl, old_logprobs=torch.zeros(63, dtype=torch.long))
        with pytest.raises(TypeError, match="targets must be an integer tensor"):
            self.call(impl, targets=torch.zeros(63))
        with pytest.raises(TypeError, match="cu_seqlens must be int32"):
            self.call(impl, cu_seqlens=torch.tensor([0.0, 63.0]))
        with pytest.raises(TypeError, match="logits dtype must be one of"):
            self.call(impl, logits=torch.zeros(63, 97, dtype=torch.float64))

    def test_cu_seqlens_values(self, impl):
        for cu in ([1, 63], [0, 62], [0, 40, 30, 63]):
            with pytest.raises(ValueError, match="cu_seqlens must start at 0, end at N"):
                self.call(impl, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
        with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D \[S\+1\]"):
            self.call(impl, cu_seqlens=torch.tensor([0], dtype=torch.int32))

    def test_loss_mask_values(self, impl):
        with pytest.raises(ValueError, match="loss_mask must contain only 0 and 1"):
            self.call(impl, loss_mask=torch.full((63,), 0.5))

    def test_hyperparameters(self, impl):
        with pytest.raises(ValueError, match="kl_coef != 0 needs ref_logprobs"):
            self.call(impl, ref_logprobs=None, kl_coef=0.1)
        with pytest.raises(ValueError, match="kl_type must be one of"):
            self.call(impl, kl_type="k4")
        with pytest.raises(ValueError, match="loss_agg must be one of"):
            self.call(impl, loss_agg="seq-sum")
        with pytest.raises(ValueError, match=r"clip_ratio_c .* must be a finite number > 1"):
            self.call(impl, clip_ratio_c=0.9)
        with pytest.raises(ValueError, match="clip_low must be in"):
            self.call(impl, clip_low=1.5)
        with pytest.raises(ValueError, match="temperature must be"):
            self.call(impl, temperature=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg", CONFIGS[::4], ids=[config_id(c) for c in CONFIGS[::4]])
def test_gpu_compiled_kernels(cfg, dtype):
    """The compiled Triton path on CUDA (impl="auto") at a Qwen-sized vocabulary, in place and not."""
    for inplace in (False, True):
        check("auto", 1031, 151_936, dtype, cfg, temperature=0.9, device="cuda", inplace=inplace)


COMPILE_SCRIPT = r"""
import json, sys
import torch
try:
    from triton.backends.nvidia.compiler import get_ptxas
    get_ptxas(90).path
except Exception as e:
    print("SKIP", e); sys.exit(0)
from bench import compile_report as cr
from kernels import LossConfig
from kernels.flow_grpo_loss import flow_grpo_loss_fwd
from kernels.token_logprobs import token_logprobs_bwd, token_logprobs_fwd

n = 8
lse, ent, g, h, old, w = (torch.empty(n) for _ in range(6))
t = torch.zeros(n, dtype=torch.long)
with cr.recording() as (sink, case):
    for dname, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        case[1] = dname
        # rows that are not 16-byte multiples: each row starts at another alignment
        logits = torch.empty(n, 1000, dtype=dtype)
        case[0] = "V=1000"
        token_logprobs_fwd(logits, t, with_entropy=True)
        token_logprobs_bwd(logits, t, lse, ent, g, h)
        logits = torch.empty(n, 151_665, dtype=dtype)
        case[0] = "V=151665"
        for we in (True, False):
            token_logprobs_fwd(logits, t, with_entropy=we)
        for hh in (h, None):
            token_logprobs_bwd(logits, t, lse, ent, g, hh)
        token_logprobs_bwd(logits, t, lse, ent, g, h, inplace=True)
        for ref, dual, kl in ((True, 3.0, "k1"), (True, None, "k2"), (True, 3.0, "k3"), (False, None, "k3")):
            cfg = LossConfig(kl_type=kl, kl_coef=0.01 if ref else 0.0, clip_ratio_c=dual)
            flow_grpo_loss_fwd(logits, t, old, old, old if ref else None, w, cfg)
print(json.dumps([r.__dict__ for r in cr.compile_all(sink)]))
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler: compile every logits kernel variant as its
    wrapper launches it for sm_90 (`bench.compile_report`, ptxas; no GPU) at V = 151 665 (Qwen's
    tokenizer: rows are not 16-byte multiples) and V = 1000, and check that the logits are read and
    d logits written with vector instructions (ld.global.v4 / st.global.v4: the aligned body of each
    row), with no spills."""
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, cwd=REPO, env=env, check=False
    )
    if r.stdout.startswith("SKIP"):
        pytest.skip(f"this Triton cannot compile for sm_90 here: {r.stdout}")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert {(c["kernel"], c["dtype"]) for c in results} == {
        (k, dt)
        for k in ("_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_flow_grpo_loss_fwd_kernel")
        for dt in ("bf16", "fp32")
    }
    for c in results:
        where = f"{c['kernel']} {c['dtype']} {c['case']}"
        assert c["spill_st"] == c["spill_ld"] == 0, where
        assert int(c["ld_vec"].split("/")[0]) >= 1, f"{where}: logits loads are not vectorised ({c['ld_vec']})"
        if c["kernel"] == "_token_logprobs_bwd_kernel":
            assert int(c["st_vec"].split("/")[0]) >= 1, f"{where}: d logits stores are not vectorised ({c['st_vec']})"
