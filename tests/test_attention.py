"""Packed attention: every backend against a float64 per-sequence gold (forward, backward, GQA, fp32 and bf16);
a packed forward equals separate forwards; ordinary (generation) calls stay sdpa; the backend is chosen once."""

from __future__ import annotations

import inspect
import itertools
import random

import pytest
import torch

from engine.attention import (
    ATTN_IMPLEMENTATION,
    BACKENDS,
    AttentionUnavailable,
    Packed,
    choose_backend,
    document_block_mask,
    enable_packed_attention,
    packed_attention_of,
    packed_backend,
    unavailable_reason,
)
from engine.model import build_random_model, hidden_states, lm_head_weight, load_planner, preset_config
from engine.packing import TrainSequence, pack
from kernels.reference import linear_token_logprobs
from kernels.testing import assert_close


def small_config(tie: bool = True):
    return preset_config("qwen2-test", tie_word_embeddings=tie)  # GQA, odd vocabulary, head_dim 16


def sequences(vocab: int, lengths: list[tuple[int, int]], seed: int = 0) -> list[TrainSequence]:
    rng = random.Random(seed)
    return [
        TrainSequence(
            [rng.randrange(vocab) for _ in range(p)],
            [rng.randrange(vocab) for _ in range(r)],
            [-1.0] * r,
            1.0,
            traj_id=i,
        )
        for i, (p, r) in enumerate(lengths)
    ]


LENGTHS = [(1, 1), (7, 3), (30, 33), (2, 1), (12, 19)]


def unpacked_reference(model, seqs):
    """Each sequence alone through the stock model: hidden states [L, d] and response log-probs."""
    hs, lps = [], []
    for s in seqs:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        p = len(s.prompt_ids)
        rows = h[p - 1 : p - 1 + len(s.response_ids)]
        hs.append(h)
        lps.append(linear_token_logprobs(rows, lm_head_weight(model), torch.tensor(s.response_ids)))
    return hs, lps


@pytest.mark.parametrize("source", ["tiny_dir", "gqa_untied"])
def test_packed_forward_matches_separate_forwards(source, tiny_model_dir):
    if source == "tiny_dir":
        model = load_planner(tiny_model_dir, dtype="float32")
    else:
        model = build_random_model(small_config(tie=False), dtype="float32", seed=1)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    seqs = sequences(model.config.vocab_size, LENGTHS)
    (mb,) = pack(seqs, 10_000)
    with torch.no_grad():
        packed = hidden_states(model, mb)
        ref_h, ref_lp = unpacked_reference(model, seqs)
        rows = packed.index_select(0, mb.loss_positions)
        packed_lp = linear_token_logprobs(rows, lm_head_weight(model), mb.targets)
    cu = mb.cu_seqlens_host
    rcu = mb.response_cu_seqlens.tolist()
    for k, i in enumerate(mb.seq_indices):
        # float32 on CPU: observed max |diff| ~1e-6 (different matmul shapes, same math).
        assert_close(packed[cu[k] : cu[k + 1]], ref_h[i].double(), dtype=torch.float32, name=f"hidden seq {i}")
        assert_close(packed_lp[rcu[k] : rcu[k + 1]], ref_lp[i].double(), dtype=torch.float32, name=f"logp seq {i}")


def test_packed_gradients_match_separate_forwards():
    model = build_random_model(small_config(), dtype="float32", seed=2)
    seqs = sequences(model.config.vocab_size, LENGTHS, seed=5)
    (mb,) = pack(seqs, 10_000)
    rows = hidden_states(model, mb).index_select(0, mb.loss_positions)
    linear_token_logprobs(rows, lm_head_weight(model), mb.targets).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, lps = unpacked_reference(model, seqs)
    torch.stack([lp.sum() for lp in lps]).sum().backward()
    for n, p in model.named_parameters():
        # Relative to the tensor's largest gradient; observed max |err| / max |g| ~1e-6 in float32.
        scale = p.grad.abs().max().item()
        assert_close(packed_grads[n], p.grad.double(), dtype=torch.float32, name=n, scale=scale)


def test_without_cu_seqlens_it_is_exactly_sdpa(tiny_model_dir):
    """Generation and ordinary calls on a model switched to packed attention behave exactly as sdpa."""
    from transformers import AutoModelForCausalLM

    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    packed = load_planner(tiny_model_dir, dtype="float32")
    ids = torch.randint(3, sdpa.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on the second row
    with torch.no_grad():
        a = sdpa(input_ids=ids, attention_mask=mask).logits
        b = packed(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    ga = sdpa.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    gb = packed.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ga, gb)


def test_enable_is_idempotent_and_backend_is_named():
    model = build_random_model(small_config(), dtype="float32")
    enable_packed_attention(model)
    enable_packed_attention(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert packed_backend("cpu", torch.bfloat16) == "sdpa_per_sequence"


def test_cu_seqlens_must_cover_the_row():
    model = build_random_model(small_config(), dtype="float32")
    (mb,) = pack(sequences(model.config.vocab_size, [(3, 2), (4, 4)]), 100)
    bad = mb.__class__(**{**mb.__dict__, "input_ids": mb.input_ids[:-1], "position_ids": mb.position_ids[:-1]})
    with pytest.raises(ValueError, match="cu_seqlens cover"):
        hidden_states(model, bad)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["auto", *BACKENDS])
def test_packed_forward_on_cuda_bf16(attention):
    device = torch.device("cuda")
    why = attention != "auto" and unavailable_reason(attention, device, torch.bfloat16)
    if why:
        pytest.skip(f"{attention}: {why}")
    model = build_random_model(small_config(), dtype="bfloat16", device=device, seed=3, attention=attention)
    seqs = sequences(model.config.vocab_size, LENGTHS, seed=7)
    (mb,) = pack(seqs, 10_000)
    mb = mb.to(device)
    with torch.no_grad():
        packed = hidden_states(model, mb).float()
        cu = mb.cu_seqlens_host
        for k, i in enumerate(mb.seq_indices):
            s = seqs[i]
            ids = torch.tensor([s.prompt_ids + s.response_ids], device=device)
            ref = model.model(input_ids=ids, use_cache=False).last_hidden_state[0].float()
            # bf16 activations through 2 layers; flash-attn and sdpa round differently: observed ≤ 3e-2.
            torch.testing.assert_close(packed[cu[k] : cu[k + 1]], ref, atol=6e-2, rtol=3e-2)
    print("packed backend:", packed_attention_of(model).name)


# --- each backend alone against a float64 gold ------------------------------------------------------------

PACKS = [[1, 63, 257], [300, 257, 1], [63, 1, 1, 257, 63]]  # odd lengths; [300, ...] gives full flex tiles
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M's attention: 9 query heads over 3 KV heads


def gold_attention(q, k, v, bounds, scale):
    """float64 causal softmax attention within each [a, b) of `bounds`; q [1, H, T, D], k/v [1, Hkv, T, D] -> [1, T, H, D]."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    outs = []
    for a, b in itertools.pairwise(bounds):
        kk = k[0, :, a:b].repeat_interleave(groups, dim=0)
        vv = v[0, :, a:b].repeat_interleave(groups, dim=0)
        s = q[0, :, a:b] @ kk.transpose(-1, -2) * scale
        causal = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril()
        outs.append(s.masked_fill(~causal, float("-inf")).softmax(-1) @ vv)
    return torch.cat(outs, dim=1).transpose(0, 1).unsqueeze(0)


def qkv(lengths, dtype, device, heads=HEADS, kv_heads=KV_HEADS, seed=0, grad=True):
    """Inputs laid out as transformers hands them over: [1, T, H, D] storage viewed as [1, H, T, D] (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (
        torch.randn(1, t, h, HEAD_DIM, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
        for h in (heads, kv_heads, kv_heads)
    )
    if grad:
        for x in (q, k, v):
            x.requires_grad_(True)
    bounds = [0, *itertools.accumulate(lengths)]
    return q, k, v, bounds


def run_backend(name, q, k, v, bounds, trainable=True):
    backend = choose_backend(q.device, q.dtype, name, trainable=trainable)
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    extra = backend.prepare(bounds, q.device)
    max_len = max(b - a for a, b in itertools.pairwise(bounds))
    p = Packed(cu, bounds, max_len, HEAD_DIM**-0.5, 0.0, block_mask=extra.get("flex_block_mask"))
    return backend.run(q, k, v, p)


def check_against_gold(name, lengths, dtype, device, backward, heads=HEADS, kv_heads=KV_HEADS):
    q, k, v, bounds = qkv(lengths, dtype, device, heads, kv_heads, grad=backward)
    out = run_backend(name, q, k, v, bounds, trainable=backward)
    gq, gk, gv = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    gold = gold_attention(gq, gk, gv, bounds, HEAD_DIM**-0.5)
    # Attention outputs are convex combinations of values of order one: the table's order-one tolerances.
    # Observed max |err| on CPU (torch 2.13): fp32 1.1e-6 (sdpa), 1.0e-6 (flex); bf16 8.3e-3 (sdpa), 1.2e-2 (flex),
    # the output's own bf16 rounding of values up to ~4 (a 1-token sequence returns its value row), within rtol.
    assert_close(out, gold, dtype=dtype, name=f"{name} out")
    if not backward:
        return
    up = torch.randn(gold.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(gold.device)
    (out.double() * up).sum().backward()
    (gold * up).sum().backward()
    for x, g, n in ((q, gq, "dq"), (k, gk, "dk"), (v, gv, "dv")):
        # dk/dv sum over the 3 query heads of a group and over up to 257 queries: relative to the largest
        # gradient (at least 1: a lone token's dq is exactly 0). Observed max |err| / scale on CPU, sdpa:
        # fp32 dq 4.1e-7, dk 5.3e-7, dv 3.3e-7; bf16 dq 4.3e-3, dk 9.7e-3, dv 5.3e-3.
        scale = max(g.grad.abs().max().item(), 1.0)
        assert_close(x.grad, g.grad, dtype=dtype, name=f"{name} {n}", scale=scale)


CPU_TRAINABLE = [b for b in BACKENDS if not unavailable_reason(b, "cpu", torch.float32)]
CPU_INFERENCE = [b for b in BACKENDS if not unavailable_reason(b, "cpu", torch.float32, trainable=False)]


def test_backends_available_on_cpu():
    # torch 2.13 on CPU: FlexAttention has no backward, varlen_attn and flash-attn are CUDA kernels.
    assert CPU_TRAINABLE == ["sdpa_per_sequence"]
    assert CPU_INFERENCE == ["flex", "sdpa_per_sequence"]
    assert "needs CUDA" in unavailable_reason("varlen_attn", "cpu", torch.bfloat16)
    # torch's varlen_attn is found and its keywords read from its signature (2.13: window_size, scale, enable_gqa)
    from engine.attention import _torch_varlen

    fn, extra, why = _torch_varlen()
    assert fn is not None and not why
    has_gqa_flag = "enable_gqa" in inspect.signature(fn).parameters  # 2.13 has it; 2.11 does not need it
    assert extra == ({"enable_gqa": True} if has_gqa_flag else {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", PACKS, ids=lambda x: "-".join(map(str, x)))
@pytest.mark.parametrize("name", CPU_INFERENCE)
def test_backend_matches_gold_on_cpu(name, lengths, dtype):
    check_against_gold(name, lengths, dtype, "cpu", backward=name in CPU_TRAINABLE)


def test_no_gqa_and_one_token_pack():
    check_against_gold("sdpa_per_sequence", [1], torch.float32, "cpu", backward=True, heads=4, kv_heads=4)
    check_against_gold("flex", [1], torch.float32, "cpu", backward=False, heads=4, kv_heads=4)


@pytest.mark.parametrize("lengths", [*PACKS, [128, 128, 129], [1000]], ids=lambda x: "-".join(map(str, x)))
def test_document_block_mask_equals_torchs(lengths):
    """The block mask built from the bounds equals torch's `create_block_mask` of the same mask_mod (dense form),
    and every tile it marks full is full."""
    from torch.nn.attention.flex_attention import create_block_mask

    bounds = [0, *itertools.accumulate(lengths)]
    ours = document_block_mask(bounds, "cpu")
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def mask_mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    t = bounds[-1]
    theirs = create_block_mask(mask_mod, None, None, t, t, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    dense = mask_mod(0, 0, torch.arange(t)[:, None], torch.arange(t)[None, :])
    n = ours.full_kv_num_blocks[0, 0]
    for i in range(len(n)):
        for j in ours.full_kv_indices[0, 0, i, : n[i]].tolist():
            assert dense[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].all(), (i, j)
    if lengths == [300, 257, 1]:
        assert int(n.sum()) > 0  # the test above saw full tiles


@pytest.mark.slow
def test_compiled_flex_matches_gold_on_cpu(monkeypatch):
    """FlexAttention through torch.compile (what CUDA runs) on CPU, forward: ~50 s of compilation on a busy 2-core machine."""
    from torch.nn.attention.flex_attention import flex_attention

    import engine.attention as attention

    # static shapes: torch 2.13's CPU template fails to compile the dynamic-shape kernel CUDA uses (module doc)
    compiled = torch.compile(flex_attention, dynamic=False)
    monkeypatch.setattr(attention, "_flex", lambda _: compiled)
    check_against_gold("flex", [1, 63, 257], torch.float32, "cpu", backward=False)


# --- choosing, forcing, reporting -------------------------------------------------------------------------


def test_forcing_an_unavailable_backend_is_one_line():
    with pytest.raises(AttentionUnavailable) as e:
        choose_backend("cpu", torch.float32, "varlen_attn")
    msg = str(e.value)
    assert "\n" not in msg and "needs CUDA" in msg and "available here: ['sdpa_per_sequence']" in msg
    with pytest.raises(AttentionUnavailable, match="no backward on CPU"):
        build_random_model(small_config(), dtype="float32", attention="flex")
    with pytest.raises(AttentionUnavailable, match="unknown attention backend 'fast'"):
        choose_backend("cpu", torch.float32, "fast")


def test_backend_is_chosen_once_and_kept(monkeypatch):
    import engine.attention as attention

    model = build_random_model(small_config(), dtype="float32")
    chosen = packed_attention_of(model)
    assert chosen.name == "sdpa_per_sequence" and chosen.requested == "auto"
    assert enable_packed_attention(model) is chosen  # "auto" again keeps the choice
    layers = [m for m in model.modules() if hasattr(m, "packed_attention")]
    assert len(layers) == 1 + model.config.num_hidden_layers and all(m.packed_attention is chosen for m in layers)

    def no_retest(*args, **kwargs):
        raise AssertionError("availability re-tested during a forward")

    monkeypatch.setattr(attention, "unavailable_reason", no_retest)
    (mb,) = pack(sequences(model.config.vocab_size, [(3, 2), (4, 4)]), 100)
    with torch.no_grad():
        assert hidden_states(model, mb).shape == (mb.input_ids.shape[0], model.config.hidden_size)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_forced_flex_model_matches_sdpa_model(arch):
    """A whole model with `attention="flex"` (inference: no trainable parameters on CPU) gives the hidden states
    of the per-sequence SDPA backend: the block mask travels through transformers' layers to every layer."""
    if arch == "qwen2":
        config = small_config()
    else:
        from transformers import LlamaConfig

        config = LlamaConfig(
            vocab_size=211,
            hidden_size=144,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=16,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )  # SmolLM2's 9 query / 3 KV heads
    model = build_random_model(config, dtype="float32", seed=4)
    model.requires_grad_(False)
    seqs = sequences(model.config.vocab_size, [(1, 1), (40, 23), (200, 57), (2, 1)], seed=3)
    (mb,) = pack(seqs, 10_000)
    ref = hidden_states(model, mb)
    assert enable_packed_attention(model, "flex").name == "flex"
    flex = hidden_states(model, mb)
    # float32 through 2 layers, two exact algorithms: observed max |diff| ~1e-6.
    assert_close(flex, ref.double(), dtype=torch.float32, name="flex hidden")
    assert enable_packed_attention(model, "sdpa_per_sequence").name == "sdpa_per_sequence"


CUDA_CASES = [(lengths, torch.bfloat16) for lengths in PACKS] + [(PACKS[0], torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("lengths", "dtype"), CUDA_CASES, ids=lambda x: "-".join(map(str, x)) if isinstance(x, list) else str(x)
)
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_matches_gold_on_cuda(name, lengths, dtype):
    """bf16 (the training dtype) on three packed lengths, one after another (FlexAttention's one dynamic-shape
    kernel serves all three), and float32 once (the half-precision-only varlen kernels skip it)."""
    why = unavailable_reason(name, "cuda", dtype)
    if why:
        pytest.skip(f"{name}: {why}")
    check_against_gold(name, lengths, dtype, "cuda", backward=True)


@pytest.mark.gpu
def test_auto_on_cuda_bf16_is_a_varlen_kernel():
    """On a GPU with torch >= 2.11 (built with Flash Attention) auto never falls back to SDPA per sequence."""
    name = packed_backend("cuda", torch.bfloat16)
    assert name in ("flash_attn_varlen", "varlen_attn"), (
        name,
        unavailable_reason("varlen_attn", "cuda", torch.bfloat16),
    )
    assert packed_backend("cuda", torch.float32) == "flex"


def test_attention_option_reaches_the_model_config_and_an_unavailable_one_stops_the_run_first(tmp_path):
    import argparse
    import dataclasses

    from engine.loop import TrainLoop
    from engine.presets import ModelConfig, preset
    from engine.train import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert config_from_args(p.parse_args([])).model.attention == "auto"
    cfg = config_from_args(p.parse_args(["--attention", "varlen_attn", "--run-dir", str(tmp_path / "run")]))
    assert cfg.model.attention == "varlen_attn"
    with pytest.raises(ValueError, match="model attention must be one of"):
        ModelConfig(attention="fast")
    # refused in one line before any data, tokenizer or model is built: the run directory stays empty
    with pytest.raises(AttentionUnavailable, match="'varlen_attn' is unavailable on cpu float32: needs CUDA"):
        TrainLoop(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device="cpu")))
    assert not (tmp_path / "run" / "model").exists()
    flex = preset("tiny", run_dir=str(tmp_path / "r2"))
    with pytest.raises(AttentionUnavailable, match="no backward on CPU"):
        TrainLoop(dataclasses.replace(flex, model=dataclasses.replace(flex.model, device="cpu", attention="flex")))
