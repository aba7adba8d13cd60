"""`kernels.linear_flow_grpo_loss` against a float64 gold: loss, every metric, d hidden, d weight, d bias.

The gold (`gold_linear(gold_loss, ...)`, tests/gold.py) materialises the float64 logits
hidden @ weight.T + bias of the same (bf16-exact) values, runs the float64 Flow-GRPO gold
(`gold_loss`, shared with tests/test_flow_grpo_loss.py) on them and differentiates through the
product with float64 autograd.
Inputs exercise every branch (both clip sides, the dual clip, advantages 0 and of both signs, the
k3 clamp, an empty and a fully masked sequence); every (loss_agg, kl_type, dual clip) config runs
on both paths. Outputs are NaN-poisoned before the kernels write them (tests/conftest.py).

Tolerances (the `kernels.testing` entries, none loosened): the loss and metrics are float32
results for every input dtype (float32 entry; observed |err| ≤ 5.9e-6 on the loss and ≤ 6.2e-6 on
metrics, both paths). Gradients are written in the input dtype and compared with its entry scaled
by the largest gold gradient (the aggregation weights make them O(1/N)): observed error / scale
fp32 ≤ 9.1e-6; bf16 ≤ 3.5e-3 on the torch path and ≤ 8.1e-3 under the interpreter (dZ cut to bf16
before the dots, as on the tensor cores, and truncating casts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gold import AGGS, CONFIGS, METRICS, config_id, gold_linear, gold_loss, loss_args, make_linear_inputs
from test_linear_token_logprobs import force_small_blocks

from kernels import LossConfig, LossOutput, flow_grpo_loss, linear_chunked, linear_flow_grpo_loss, reference
from kernels.testing import assert_close

REPO = Path(__file__).resolve().parents[1]
TORCH = pytest.param("torch", id="torch")
TRITON = pytest.param("triton", id="triton", marks=pytest.mark.interpreter)
F32, BF16 = torch.float32, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
PER_TOKEN = ("targets", "old_logprobs", "advantages", "loss_mask")


@pytest.fixture(autouse=True)
def _fused_algorithm(monkeypatch):
    """This file tests the fused algorithm (tests/test_linear_chunked.py the chunked one): "auto" is fused here."""
    monkeypatch.setitem(linear_chunked.DEFAULT_ALGORITHM, "cpu", "fused")


def split(inp):
    """(hidden, weight, bias, positional per-token inputs, keyword inputs) of `make_linear_inputs`."""
    return (
        inp["hidden"],
        inp["weight"],
        inp["bias"],
        [inp[k] for k in PER_TOKEN],
        {"cu_seqlens": inp["cu_seqlens"], "ref_logprobs": inp["ref_logprobs"]},
    )


def check(impl, n, d, v, dtype, cfg, *, temperature=0.8, seed=0, with_bias=True, device="cpu"):
    hidden, weight, bias, args, kw = split(make_linear_inputs(n, d, v, dtype, seed, temperature, device, with_bias))
    kwargs = {**kw, **cfg, "temperature": temperature}
    leaves = [None if x is None else x.clone().requires_grad_() for x in (hidden, weight, bias)]
    h, w, b = leaves
    out = linear_flow_grpo_loss(h, w, *args, bias=b, **loss_args(**kwargs), impl=impl)
    assert isinstance(out, LossOutput) and out.loss.dim() == 0 and out.loss.dtype == torch.float32
    out.loss.backward()
    g_loss, g_metrics, g_grads = gold_linear(gold_loss, hidden, weight, bias, *args, **kwargs)
    assert_close(out.loss, g_loss, dtype=F32, name="loss")
    assert set(out.metrics) == set(METRICS)
    for key in METRICS:
        assert isinstance(out.metrics[key], float), key
        assert_close(out.metrics[key], g_metrics[key], dtype=F32, name=f"metric {key}")
    for name, leaf, gold in zip(("d hidden", "d weight", "d bias"), leaves, g_grads):
        if leaf is not None:
            assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape
            assert_close(leaf.grad, gold, dtype=dtype, name=name, scale=max(gold.abs().max().item(), 1e-6))
    return g_metrics


SHAPES = [(n, d, v) for n in (1, 63, 257) for d in (32, 96) for v in (97, 1000, 5003)]
SHAPE_IDS = [f"{n}x{d}x{v}" for n, d, v in SHAPES]


def shape_case(n, d, v, dtype):
    """A config (cycling through all of them), a temperature and whether there is a bias, per shape."""
    i = SHAPES.index((n, d, v)) + (dtype == BF16) * len(SHAPES)
    return CONFIGS[i % len(CONFIGS)], (0.8, 1.0, 1.3)[i % 3], i % 4 != 3


@DTYPES
@pytest.mark.parametrize(("n", "d", "v"), SHAPES, ids=SHAPE_IDS)
def test_torch_path_odd_shapes(n, d, v, dtype):
    cfg, temperature, with_bias = shape_case(n, d, v, dtype)
    check("torch", n, d, v, dtype, cfg, temperature=temperature, with_bias=with_bias)


@DTYPES
@pytest.mark.parametrize("cfg", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_torch_path_every_config(cfg, dtype):
    metrics = check("torch", 257, 32, 1000, dtype, cfg)
    # the inputs really exercise the branches
    assert 0.1 < metrics["clipfrac"] < 0.9
    assert metrics["num_seqs"] <= 4  # of 6 sequences: an empty and a fully masked one do not count
    if cfg["clip_ratio_c"] is not None:
        assert metrics["clipfrac_lower"] > 0


@pytest.mark.interpreter
@DTYPES
@pytest.mark.parametrize(("n", "d", "v"), SHAPES, ids=SHAPE_IDS)
def test_triton_odd_shapes(n, d, v, dtype):
    cfg, temperature, with_bias = shape_case(n, d, v, dtype)
    check("triton", n, d, v, dtype, cfg, temperature=temperature, with_bias=with_bias)


@pytest.mark.interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_triton_every_config(cfg):
    check("triton", 63, 32, 300, F32, cfg)


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_float16(impl):
    check(impl, 63, 96, 1000, torch.float16, CONFIGS[7])


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_many_blocks_match_gold(impl, monkeypatch):
    force_small_blocks(monkeypatch)
    check(impl, 63, 32, 1000, BF16, CONFIGS[13])


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_same_as_flow_grpo_loss_on_materialised_logits(impl):
    """The API promise: `.loss`, `.metrics` and the gradients of `flow_grpo_loss(hidden @ weight.T + bias)`."""
    hidden, weight, bias, args, kw = split(make_linear_inputs(63, 32, 1000, F32, seed=3))
    cfg = {**CONFIGS[11], "temperature": 0.9}
    outs, grads = [], []
    for fn in (
        lambda h, w, b: linear_flow_grpo_loss(h, w, *args, bias=b, **loss_args(**kw, **cfg), impl=impl),
        lambda h, w, b: flow_grpo_loss(torch.nn.functional.linear(h, w, b), *args, **loss_args(**kw, **cfg), impl=impl),
    ):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        out = fn(*leaves)
        out.loss.backward()
        outs.append(out)
        grads.append([x.grad for x in leaves])
    assert_close(outs[0].loss, outs[1].loss.double(), dtype=F32, name="loss")
    for key in METRICS:
        assert_close(outs[0].metrics[key], outs[1].metrics[key], dtype=F32, name=key)
    for a, e in zip(*grads):
        assert_close(a, e.double(), dtype=F32, scale=e.abs().max().item())


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("impl", [TORCH, TRITON])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_all_masked_batch_is_zero_not_nan(impl, agg):
    hidden, weight, bias, (targets, old, adv, _), kw = split(make_linear_inputs(63, 32, 97, F32, seed=4))
    old = old.clone()
    old[:5] = -200.0  # huge ratios on unmasked tokens must not leak in as inf·0
    mask = torch.zeros(63, dtype=torch.bool)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = linear_flow_grpo_loss(
        leaves[0], leaves[1], targets, old, adv, mask, bias=leaves[2],
        **loss_args(**kw, loss_agg=agg, kl_coef=0.1, entropy_coef=0.01, clip_ratio_c=3.0), impl=impl,
    )  # fmt: skip
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(torch.equal(x.grad, torch.zeros_like(x)) for x in leaves)
    assert out.metrics == dict.fromkeys(METRICS, 0.0)


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_fully_masked_sequences_do_not_count(impl):
    """Two sequences with masked tokens, two without: seq-mean divides by 2, not 4."""
    hidden, weight, bias, (targets, old, adv, _), kw = split(make_linear_inputs(40, 32, 97, F32, seed=6))
    kw["cu_seqlens"] = torch.tensor([0, 10, 20, 30, 40], dtype=torch.int32)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[2:7] = True
    mask[31:33] = True
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        out = linear_flow_grpo_loss(
            hidden, weight, targets, old, adv, mask, bias=bias, **loss_args(**kw, loss_agg=agg), impl=impl
        )
        g_loss, g_metrics, _ = gold_linear(gold_loss, hidden, weight, bias, targets, old, adv, mask, **kw, loss_agg=agg)
        assert out.metrics["num_seqs"] == 2.0 == g_metrics["num_seqs"]
        assert_close(out.loss, g_loss, dtype=F32, name=agg)


@pytest.mark.parametrize("impl", [TORCH, TRITON])
def test_tied_embedding_gradients_accumulate(impl):
    """The head is the input embedding: its gradient is the embedding's plus the head's."""
    n, d, v = 63, 32, 300
    inp = make_linear_inputs(n, d, v, F32, seed=8)
    _, _, _, (targets, old, adv, mask), kw = split(inp)
    ids = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(9))
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(10)) / d**0.5

    def run(emb_weight, loss_fn):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, emb_weight) @ mix.to(emb_weight.dtype)) * 3
        return loss_fn(hidden, emb_weight)

    emb = torch.nn.Embedding(v, d)
    with torch.no_grad():
        emb.weight.copy_(inp["weight"])
    cfg = {**kw, **CONFIGS[4], "temperature": 0.9}
    out = run(
        emb.weight, lambda h, w: linear_flow_grpo_loss(h, w, targets, old, adv, mask, **loss_args(**cfg), impl=impl)
    )
    out.loss.backward()

    w64 = inp["weight"].double().requires_grad_()

    def gold_fn(h, w):
        g_loss, _, (g_h, g_w, _) = gold_linear(gold_loss, h, w, None, targets, old, adv, mask, **cfg)
        # float64 autograd through the head (g_w) and, via hidden, through the embedding lookup
        return g_loss, g_h, g_w

    h64 = torch.tanh(torch.nn.functional.embedding(ids, w64) @ mix.double()) * 3
    g_loss, g_h, g_w_head = gold_fn(h64, w64)
    h64.backward(g_h)
    total = w64.grad + g_w_head
    assert_close(out.loss, g_loss, dtype=F32, name="loss")
    assert_close(emb.weight.grad, total, dtype=F32, name="tied d weight", scale=total.abs().max().item())
    # both parts are present: the lookup's rows and the head's
    assert w64.grad.abs().max() > 0.1 * total.abs().max() and g_w_head.abs().max() > 0.1 * total.abs().max()


def test_autocast_does_not_lower_the_products():
    """The trainer calls the loss under autocast: the chunked products stay float32."""
    hidden, weight, bias, args, kw = split(make_linear_inputs(63, 96, 1000, F32, seed=12))
    plain = linear_flow_grpo_loss(hidden, weight, *args, bias=bias, **loss_args(**kw, kl_coef=0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = linear_flow_grpo_loss(hidden, weight, *args, bias=bias, **loss_args(**kw, kl_coef=0.1))
    assert torch.equal(plain.loss, cast.loss) and plain.metrics == cast.metrics


def test_auto_is_the_torch_path_on_cpu():
    hidden, weight, bias, args, kw = split(make_linear_inputs(63, 32, 97, F32))
    a = linear_flow_grpo_loss(hidden, weight, *args, bias=bias, **loss_args(**kw, kl_coef=0.1), impl="auto")
    b = linear_flow_grpo_loss(hidden, weight, *args, bias=bias, **loss_args(**kw, kl_coef=0.1), impl="torch")
    assert torch.equal(a.loss, b.loss) and a.metrics == b.metrics


@pytest.mark.parametrize("cfg", CONFIGS[::5], ids=[config_id(c) for c in CONFIGS[::5]])
def test_reference_agrees_with_gold(cfg):
    hidden, weight, bias, args, kw = split(make_linear_inputs(63, 32, 97, F32, seed=13))
    leaves = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    ref = reference.linear_flow_grpo_loss(
        leaves[0], leaves[1], *args, bias=leaves[2], **loss_args(**kw, **cfg, temperature=0.8)
    )
    ref.loss.backward()
    g_loss, g_metrics, g_grads = gold_linear(gold_loss, hidden, weight, bias, *args, **kw, **cfg, temperature=0.8)
    # the reference's aggregation weights are float32: 6e-8 relative
    assert_close(ref.loss, g_loss, dtype=F32, name="reference loss")
    for leaf, gold in zip(leaves, g_grads):
        assert_close(leaf.grad, gold, dtype=F32, name="reference grad", scale=gold.abs().max().item())
    for key in METRICS:
        assert_close(ref.metrics[key], g_metrics[key], dtype=F32, name=f"reference {key}")


MEMORY_SCRIPT = r"""
import json, re, sys
import torch
import kernels
from kernels import reference

torch.set_num_threads(1)  # RSS does not depend on it; time on a shared machine does

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

fn = {"fused": lambda *a, **k: kernels.linear_flow_grpo_loss(*a, **k, impl="torch", algorithm="fused"),
      "chunked": lambda *a, **k: kernels.linear_flow_grpo_loss(*a, **k, impl="torch", algorithm="chunked"),
      "reference": reference.linear_flow_grpo_loss}[sys.argv[1]]

def step(n, d, v):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) * (2 / d**0.5)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    old = -torch.rand(n, generator=g) * 12  # ratios of every size: both clip sides are taken
    args = (targets, old, torch.randn(n, generator=g), torch.rand(n, generator=g) > 0.1)
    kw = dict(cu_seqlens=torch.tensor([0, n // 3, n], dtype=torch.int32), ref_logprobs=old + 0.1,
              config=kernels.LossConfig(kl_coef=0.001, entropy_coef=0.01, clip_ratio_c=3.0))
    return lambda: fn(h, w, *args, **kw).loss.backward()

step(64, 64, 1000)()  # warm-up: thread pools and allocator arenas exist before the measurement
run = step(4096, 64, 32000)  # inputs (and the storage of their grads, once allocated) are not counted
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
before = status("VmRSS")
run()
print(json.dumps({"added": status("VmHWM") - before}))
"""


def peak_rss_added(provider):
    r = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, provider], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["added"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_torch_path_peak_resident_memory():
    """N = 4096, V = 32000, d = 64 on CPU: float32 logits alone would be 0.5 GB (524 MB).

    Peak RSS added by forward + backward (VmHWM after a reset, minus VmRSS before), measured in a
    fresh process on the 2-core dev machine (torch 2.13.0+cpu, one thread): ours 26-72 MiB over four
    runs (8 MiB logits blocks, a few alive at once, the float32 d weight of 8 MiB and d hidden of
    1 MiB, and whatever the allocator keeps), the eager reference 2.5 GiB. The chunked algorithm
    (`kernels.linear_chunked`, 32 MiB logits chunks, the chunk and p alive at once): 106 MiB (fused
    50 MiB in the same session). The bound of 128 MiB is a quarter of the float32 logits.
    """
    for algorithm in ("fused", "chunked"):
        ours = peak_rss_added(algorithm)
        assert ours < 128 << 20, f"{algorithm}: peak RSS added {ours / 2**20:.1f} MiB"
    ref = peak_rss_added("reference")  # the measure sees the [N, V] buffers: it can fail
    assert ref > 524 << 20, f"reference peak RSS added {ref / 2**20:.1f} MiB"


@pytest.mark.parametrize("impl", [TORCH, TRITON])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
class TestBadInput:
    def call(self, impl, **overrides):
        inp = make_linear_inputs(63, 32, 97, F32, seed=10)
        options = {k: overrides.pop(k) for k in list(overrides) if k not in inp}  # loss hyperparameters
        inp.update(overrides)
        hidden, weight, bias, args, kw = split(inp)
        return linear_flow_grpo_loss(hidden, weight, *args, bias=bias, **loss_args(**kw, **options), impl=impl)

    def test_nan_hidden_names_the_rows(self, impl):
        hidden = make_linear_inputs(63, 32, 97, F32, seed=10)["hidden"].clone()
        hidden[[7, 21], 3] = float("nan")
        with pytest.raises(ValueError, match=r"hidden contains non-finite values .* 2 row\(s\), e.g. rows \[7, 21\]"):
            self.call(impl, hidden=hidden)

    def test_targets_out_of_range(self, impl):
        targets = make_linear_inputs(63, 32, 97, F32, seed=10)["targets"].clone()
        targets[9] = 97
        with pytest.raises(ValueError, match=r"targets out of range \[0, V\) = \[0, 97\) at rows \[9\]"):
            self.call(impl, targets=targets)

    def test_nan_per_token_inputs_on_masked_tokens(self, impl):
        inp = make_linear_inputs(63, 32, 97, F32, seed=10)
        first = int(inp["loss_mask"].nonzero()[0])
        old = inp["old_logprobs"].clone()
        old[first] = float("nan")
        with pytest.raises(
            ValueError, match=rf"non-finite values in \['old_logprobs'\] at masked tokens, e.g. rows \[{first}\]"
        ):
            self.call(impl, old_logprobs=old)

    def test_shapes_and_dtypes(self, impl):
        inp = make_linear_inputs(63, 32, 97, F32, seed=10)
        with pytest.raises(ValueError, match=r"old_logprobs must have shape \[N\] = \(63,\)"):
            self.call(impl, old_logprobs=torch.zeros(62))
        with pytest.raises(ValueError, match=r"loss_mask must have shape \[N\]"):
            self.call(impl, loss_mask=torch.ones(64, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"weight \(the LM head\) must be 2-D \[V, d\] with d = 32"):
            self.call(impl, weight=inp["weight"][:, :31])
        with pytest.raises(TypeError, match=r"weight is bfloat16 but hidden is float32"):
            self.call(impl, weight=inp["weight"].bfloat16())
        with pytest.raises(ValueError, match=r"hidden must be 2-D \[N, d\]"):
            self.call(impl, hidden=inp["hidden"][0])

    def test_values_and_hyperparameters(self, impl):
        with pytest.raises(ValueError, match="cu_seqlens must start at 0, end at N"):
            self.call(impl, cu_seqlens=torch.tensor([0, 62], dtype=torch.int32))
        with pytest.raises(ValueError, match="loss_mask must contain only 0 and 1"):
            self.call(impl, loss_mask=torch.full((63,), 0.5))
        with pytest.raises(ValueError, match="kl_coef != 0 needs ref_logprobs"):
            self.call(impl, ref_logprobs=None, kl_coef=0.1)
        with pytest.raises(ValueError, match="loss_agg must be one of"):
            self.call(impl, loss_agg="seq-sum")
        with pytest.raises(ValueError, match="temperature must be"):
            self.call(impl, temperature=-1.0)


@pytest.mark.gpu
@DTYPES
@pytest.mark.parametrize("cfg", CONFIGS[::6], ids=[config_id(c) for c in CONFIGS[::6]])
def test_gpu_compiled_kernels(cfg, dtype):
    """The compiled Triton path on CUDA (impl="auto") at the Qwen2.5-1.5B head shape."""
    check("auto", 2053, 1536, 151_936, dtype, cfg, temperature=0.9, device="cuda")


@pytest.mark.gpu
def test_gpu_memory_at_7b_shape():
    """bf16, 16k tokens, the 7B head: forward + backward never hold [N, V] (5 GB of bf16 logits).

    Expected extra: d weight in float32 (2.2 GB) and bf16 (1.1 GB), d hidden (0.35 GB), O(N) stats.
    """
    n, d, v = 16_384, 3584, 152_064
    g = torch.Generator(device="cuda").manual_seed(2)
    h = torch.randn(n, d, generator=g, device="cuda").to(BF16).requires_grad_()
    w = (torch.randn(v, d, generator=g, device="cuda") * (2.0 / d**0.5)).to(BF16).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device="cuda")
    old = -torch.rand(n, generator=g, device="cuda") * 12
    adv = torch.randn(n, generator=g, device="cuda")
    mask = torch.rand(n, generator=g, device="cuda") > 0.1
    cu = torch.tensor([0, 5000, 11000, n], dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = linear_flow_grpo_loss(
        h, w, targets, old, adv, mask, LossConfig(kl_coef=0.001), cu_seqlens=cu, ref_logprobs=old + 0.1
    )
    out.loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 4 << 30, f"{extra / 2**30:.2f} GiB"
    assert torch.isfinite(out.loss) and torch.isfinite(w.grad.float()).all() and torch.isfinite(h.grad.float()).all()


COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
try:
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
except ImportError as e:
    print("SKIP", e); sys.exit(0)
from kernels.linear_flow_grpo_loss import _linear_flow_grpo_loss_fwd_kernel
from kernels.linear_token_logprobs import (
    _linear_token_logprobs_bwd_kernel, _linear_token_logprobs_fwd_kernel, _linear_token_logprobs_reduce_kernel,
)

target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)

def ptx(fn, signature, constexprs, num_warps, num_stages=3):
    div = {(i,): [["tt.divisibility", 16]] for i, (k, t) in enumerate(signature.items())
           if t.startswith("*") or k in ("D", "stride_h", "stride_w")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=div)
    opts = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    stages = {}
    backend.add_stages(stages, opts, src.language)
    ctx = ir.context(); ir.load_dialects(ctx); backend.load_dialects(ctx)
    mod = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx)
    for name in ("ttir", "ttgir", "llir", "ptx"):
        mod = stages[name](mod, {})
    return mod

import torch
from bench.compile_report import recording
from kernels.linear_token_logprobs import linear_launch

def launched(dtype, backward):  # (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages) of linear_launch on a 132-SM GPU
    with recording():
        c = linear_launch(16384, 151936, dtype, torch.device("cuda"), False, backward=backward)
    return c.block_n, c.block_v, c.block_d, c.num_warps, c.num_stages

for dt, dtype, prec in (("bf16", torch.bfloat16, "tf32"), ("fp32", torch.float32, "ieee")):
    bn, bv, bd, warps, stages = launched(dtype, False)
    common = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "targets_ptr": "*i64"}
    for has_bias in (True, False) if dt == "bf16" else (False,):
        out = ptx(_linear_token_logprobs_fwd_kernel, {**common, "part_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32",
            "stride_h": "i64", "stride_w": "i64", "inv_t": "fp32", "blocks_per_split": "i32", "HAS_BIAS": "constexpr",
            "DOT_PRECISION": "constexpr", "UPCAST": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
            "BLOCK_D": "constexpr"}, {"HAS_BIAS": has_bias, "DOT_PRECISION": prec, "UPCAST": False, "BLOCK_N": bn,
            "BLOCK_V": bv, "BLOCK_D": bd}, warps, stages)
        if dt == "bf16":
            assert "wgmma" in out, "the forward logits tile does not use Hopper tensor cores (wgmma)"
    variants = ((True, True, True, True), (False, True, True, False)) if dt == "bf16" else ((True, True, True, False),)
    bn, bv, bd, warps, stages = launched(dtype, True)
    for has_h, dh, dw, db in variants:
        out = ptx(_linear_token_logprobs_bwd_kernel, {**common, "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "g_ptr": "*fp32",
            "hc_ptr": "*fp32", "dh_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32",
            "stride_h": "i32", "stride_w": "i32", "inv_t": "fp32", "HAS_BIAS": "constexpr", "HAS_H": "constexpr",
            "COMPUTE_DH": "constexpr", "COMPUTE_DW": "constexpr", "COMPUTE_DB": "constexpr", "DOT_PRECISION": "constexpr",
            "UPCAST": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_D": "constexpr", "GROUP_N": "constexpr"},
            {"HAS_BIAS": db, "HAS_H": has_h, "COMPUTE_DH": dh, "COMPUTE_DW": dw, "COMPUTE_DB": db, "DOT_PRECISION": prec,
             "UPCAST": False, "BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd, "GROUP_N": 8}, warps, stages)
        assert "red.global" in out or "atom.global" in out, "d hidden / d weight are not accumulated atomically"
        if dt == "bf16":
            assert "wgmma" in out or "mma.sync" in out, "the backward dots do not use tensor cores"
ptx(_linear_token_logprobs_reduce_kernel, {"part_ptr": "*fp32", "targets_ptr": "*i32", "logp_ptr": "*fp32",
    "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "N": "i32", "V": "i32", "SPLITS": "i32", "WITH_ENTROPY": "constexpr",
    "BLOCK_N": "constexpr"}, {"WITH_ENTROPY": True, "BLOCK_N": 128}, 4)
for ref, dual, kl in ((True, True, 3), (False, False, 1)):
    ptx(_linear_flow_grpo_loss_fwd_kernel, {"part_ptr": "*fp32", "targets_ptr": "*i64", "old_ptr": "*fp32", "adv_ptr": "*fp32",
        "ref_ptr": "*fp32", "w_ptr": "*fp32", "stats_ptr": "*fp32", "N": "i32", "V": "i32", "SPLITS": "i32",
        "clip_low": "fp32", "clip_high": "fp32", "clip_ratio_c": "fp32", "kl_coef": "fp32", "entropy_coef": "fp32",
        "HAS_REF": "constexpr", "DUAL_CLIP": "constexpr", "KL_TYPE": "constexpr", "BLOCK_N": "constexpr"},
        {"HAS_REF": ref, "DUAL_CLIP": dual, "KL_TYPE": kl, "BLOCK_N": 128}, 4)
print("OK")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler: lower every kernel variant to H100 PTX
    at the GPU launch parameters (Triton's staged compiler; no GPU, no ptxas), and check that the
    bf16 logits tiles run on tensor cores (wgmma) and the gradients are accumulated atomically."""
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, cwd=REPO, env=env, check=False
    )
    if r.stdout.startswith("SKIP"):
        pytest.skip(f"this Triton has no staged compiler API: {r.stdout}")
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]
