"""Packed attention: a packed forward equals separate forwards; ordinary (generation) calls stay sdpa."""

from __future__ import annotations

import random

import pytest
import torch

from engine.attention import ATTN_IMPLEMENTATION, enable_packed_attention, packed_backend
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
def test_packed_forward_on_cuda_bf16():
    device = torch.device("cuda")
    model = build_random_model(small_config(), dtype="bfloat16", device=device, seed=3)
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
    print("packed backend:", packed_backend(device, torch.bfloat16))
