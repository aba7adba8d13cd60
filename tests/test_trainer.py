"""The Flow-GRPO trainer: exact gradient accumulation, zero-advantage steps, TIS, the reference policy."""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch

import kernels
from engine.model import (
    body_params,
    build_random_model,
    forward_flops,
    hidden_states,
    lm_head_weight,
    load_planner,
    preset_config,
)
from engine.packing import TrainSequence, pack, unpack_responses
from engine.preflight import UsageError
from engine.trainer import Trainer, TrainerConfig, flops_per_token, loss_functions
from kernels import LossConfig, reference
from kernels.testing import assert_close


def small_model(seed: int = 0, tie: bool = True, dtype: str = "float32"):
    return build_random_model(preset_config("qwen2-test", tie_word_embeddings=tie), dtype=dtype, seed=seed)


def make_sequences(n: int, seed: int, vocab: int = 211, adv: list[float] | None = None) -> list[TrainSequence]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(1, 20), rng.randint(1, 14)
        out.append(
            TrainSequence(
                [rng.randrange(vocab) for _ in range(p)],
                [rng.randrange(vocab) for _ in range(r)],
                [-rng.random() * 6 for _ in range(r)],
                adv[i] if adv is not None else rng.uniform(-1.5, 1.5),
                traj_id=i,
            )
        )
    return out


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return other


def prepared_batch(trainer: Trainer, seqs: list[TrainSequence], old_noise: list[torch.Tensor]):
    """prepare + old/ref log-probs, with a fixed per-sequence offset on the old log-probs (ratio != 1)."""
    batch = trainer.prepare(seqs)
    trainer.compute_old_logprobs(batch)
    trainer.compute_ref_logprobs(batch)
    batch.old_logprobs = [
        [old + torch.cat([old_noise[i] for i in mb.seq_indices]) for mb, old in zip(mini, olds)]
        for mini, olds in zip(batch.mini_batches, batch.old_logprobs)
    ]
    return batch


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def gold_gradients(model64, seqs, old, ref, cfg: TrainerConfig) -> dict[str, torch.Tensor]:
    """float64, one sequence at a time through the stock model, one reference loss over the whole batch."""
    rows, targets = [], []
    for s in seqs:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        h = model64.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        p = len(s.prompt_ids)
        rows.append(h[p - 1 : p - 1 + len(s.response_ids)])
        targets += s.response_ids
    lens = [len(s.response_ids) for s in seqs]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    out = reference.linear_flow_grpo_loss(
        torch.cat(rows),
        lm_head_weight(model64),
        torch.tensor(targets),
        torch.cat(old).double(),
        torch.cat([torch.full((n,), s.advantage, dtype=torch.float64) for s, n in zip(seqs, lens)]),
        torch.ones(sum(lens), dtype=torch.bool),
        cfg.loss,
        cu_seqlens=cu,
        ref_logprobs=None if ref is None else torch.cat(ref).double(),
    )
    out.loss.backward()
    return grads(model64)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_reproduce_the_whole_batch_gradient(loss_agg):
    base = small_model(seed=1)
    ref_model = perturbed(base, seed=2)
    seqs = make_sequences(9, seed=3)
    noise = [
        torch.randn(len(s.response_ids), generator=torch.Generator().manual_seed(10 + i)) * 0.3
        for i, s in enumerate(seqs)
    ]
    cfg = dict(loss_impl="reference", kl_coef=0.05, entropy_coef=0.01, clip_ratio_c=3.0, loss_agg=loss_agg)

    one = Trainer(copy.deepcopy(base), TrainerConfig(micro_batch_tokens=4096, **cfg), ref_model=ref_model)
    b1 = prepared_batch(one, seqs, noise)
    assert len(b1.micro_batches) == 1
    one.accumulate_gradients(b1)
    g1 = grads(one.model)

    many = Trainer(copy.deepcopy(base), TrainerConfig(micro_batch_tokens=40, **cfg), ref_model=ref_model)
    b2 = prepared_batch(many, seqs, noise)
    assert len(b2.micro_batches) >= 5
    acc = many.accumulate_gradients(b2)
    g2 = grads(many.model)
    assert acc["clipfrac"] > 0, "the test must exercise the clipped branch"

    old = unpack_responses(b2.micro_batches, b2.old_logprobs[0], len(seqs))
    ref = unpack_responses(b2.micro_batches, b2.ref_logprobs[0], len(seqs))
    gold = gold_gradients(copy.deepcopy(base).double(), seqs, old, ref, TrainerConfig(**cfg))
    for n in g1:
        # Tolerances relative to the tensor's largest gradient: observed max |err| / max |g| ~1.2e-6
        # (float32 vs the float64 gold); a 1e-4 mis-scaling of one micro-batch fails this.
        scale = gold[n].abs().max().item()
        assert_close(g2[n], g1[n].double(), dtype=torch.float32, name=f"{loss_agg} many-vs-one {n}", scale=scale)
        assert_close(g2[n], gold[n], dtype=torch.float32, name=f"{loss_agg} many-vs-gold {n}", scale=scale)


def test_zero_advantages_leave_the_weights_unchanged():
    model = small_model(seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seqs = make_sequences(6, seed=5, adv=[0.0] * 6)
    trainer = Trainer(model, TrainerConfig(loss_impl="reference", kl_coef=0.0, lr=1e-2, micro_batch_tokens=50))
    metrics = trainer.update(seqs)
    assert metrics["actor/grad_norm"] == 0.0
    assert metrics["actor/zero_adv_seqs"] == 6.0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_update_moves_weights_along_the_advantage():
    model = small_model(seed=6)
    adv = [1.0, -1.0, 1.0, -1.0, 0.5, -0.5, 1.5]
    seqs = make_sequences(7, seed=7, adv=adv)
    trainer = Trainer(model, TrainerConfig(loss_impl="reference", kl_coef=0.001, lr=1e-4, micro_batch_tokens=64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def surrogate() -> float:
        mbs = pack(seqs, 64)
        lps = unpack_responses(mbs, trainer.compute_logprobs(mbs), len(seqs))
        return sum(s.advantage * lp.double().mean().item() for s, lp in zip(seqs, lps))

    start = surrogate()
    metrics = trainer.update(seqs)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == set(before), f"unchanged: {set(before) - set(changed)}"
    assert surrogate() > start, "one step must raise sum_i A_i * mean log p(response_i)"
    assert metrics["actor/optimizer_steps"] == 1.0 and metrics["actor/grad_norm"] > 0
    assert metrics["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-6), "first epoch: old == current policy"


def test_tis_folded_into_the_advantage_equals_explicit_weighting():
    g = torch.Generator().manual_seed(0)
    n, v = 37, 53
    logits = torch.randn(n, v, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    old = reference.token_logprobs(logits.detach(), targets) + torch.randn(n, generator=g, dtype=torch.float64) * 0.4
    rollout = old + torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    ref = old + torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.2
    cu = torch.tensor([0, 5, 6, 20, 37], dtype=torch.int32)
    w = torch.exp(old - rollout).clamp(max=1.5)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        for c in (None, 2.0):
            kw = dict(clip_low=0.2, clip_high=0.3, clip_ratio_c=c, kl_type="k3")
            folded = reference.flow_grpo_loss(
                logits,
                targets,
                old,
                adv * w,
                mask,
                LossConfig(kl_coef=0.1, entropy_coef=0.01, loss_agg=agg, **kw),
                cu_seqlens=cu,
                ref_logprobs=ref,
            ).loss
            (gf,) = torch.autograd.grad(folded, logits)
            logp, ent = reference.token_logprobs(logits, targets, return_entropy=True)
            t = reference.per_token_terms(logp, old, adv, ref_logprobs=ref, **kw)
            weights, _ = reference.aggregation_weights(mask, cu, agg)
            explicit = (weights.double() * (w * t["pg"] + 0.1 * t["kl"] - 0.01 * ent)).sum()
            (ge,) = torch.autograd.grad(explicit, logits)
            assert_close(folded, explicit, dtype=torch.float64, name=f"loss {agg} c={c}")
            assert_close(gf, ge, dtype=torch.float64, name=f"grad {agg} c={c}")


def test_trainer_applies_truncated_importance_weights():
    model = small_model(seed=8)
    seqs = make_sequences(5, seed=9)
    trainer = Trainer(model, TrainerConfig(loss_impl="reference", kl_coef=0.0, tis_cap=2.0, micro_batch_tokens=4096))
    batch = trainer.prepare(seqs)
    trainer.compute_old_logprobs(batch)
    (mb,), (old,), (adv,) = batch.mini_batches[0], batch.old_logprobs[0], batch.advantages[0]
    expected = mb.advantages * torch.exp(old - mb.rollout_logprobs).clamp(max=2.0)
    assert torch.equal(adv, expected)
    w = torch.exp(old - mb.rollout_logprobs).clamp(max=2.0)
    assert batch.metrics["actor/tis_weight_mean"] == pytest.approx(w.double().mean().item())
    assert batch.metrics["actor/tis_capped_frac"] == pytest.approx((w >= 2.0).double().mean().item())


def test_rollout_trainer_gap_metric():
    model = small_model(seed=10)
    seqs = make_sequences(4, seed=11)
    trainer = Trainer(model, TrainerConfig(loss_impl="reference", kl_coef=0.0, micro_batch_tokens=4096))
    mbs = pack(seqs, 4096)
    exact = unpack_responses(mbs, trainer.compute_logprobs(mbs), len(seqs))
    deltas = [torch.linspace(-0.3, 0.2, len(s.response_ids)) for s in seqs]
    shifted = [
        TrainSequence(s.prompt_ids, s.response_ids, (e + d).tolist(), s.advantage, traj_id=s.traj_id)
        for s, e, d in zip(seqs, exact, deltas)
    ]
    metrics = trainer.update(shifted)
    d = torch.cat(deltas).abs().double()
    assert metrics["training/rollout_logprob_diff_mean"] == pytest.approx(d.mean().item(), abs=1e-5)
    assert metrics["training/rollout_logprob_diff_max"] == pytest.approx(d.max().item(), abs=1e-5)


def test_prompt_positions_never_reach_the_lm_head():
    model = small_model(seed=12)
    seqs = make_sequences(8, seed=13)
    trainer = Trainer(model, TrainerConfig(loss_impl="reference", kl_coef=0.01, ppo_epochs=2, micro_batch_tokens=48))
    rows = []
    loss_fn, logprob_fn = trainer.loss_fn, trainer.logprob_fn

    def spy(fn):
        def wrapped(h, w, targets, *args, **kwargs):
            assert h.shape[0] == targets.shape[0]
            rows.append(h.shape[0])
            return fn(h, w, targets, *args, **kwargs)

        return wrapped

    trainer.loss_fn, trainer.logprob_fn = spy(loss_fn), spy(logprob_fn)
    metrics = trainer.update(seqs)
    responses = sum(len(s.response_ids) for s in seqs)
    prompts = sum(len(s.prompt_ids) for s in seqs)
    # old + ref log-probs, then 2 epochs of the loss: only response rows, every time.
    assert sum(rows) == 4 * responses
    assert metrics["actor/num_tokens"] == responses
    assert metrics["actor/num_packed_tokens"] == responses + prompts


def test_no_reference_copy_without_kl(monkeypatch):
    import engine.trainer as trainer_mod

    model = small_model(seed=14)

    def no_copy(*args, **kwargs):
        raise AssertionError("deepcopy called with kl_coef = 0")

    monkeypatch.setattr(trainer_mod.copy, "deepcopy", no_copy)
    t = Trainer(model, TrainerConfig(loss_impl="reference", kl_coef=0.0))
    assert t.ref_model is None
    with pytest.raises(ValueError, match="kl_coef = 0"):
        Trainer(model, TrainerConfig(loss_impl="reference", kl_coef=0.0), ref_model=model)
    monkeypatch.undo()

    t = Trainer(model, TrainerConfig(loss_impl="reference", kl_coef=0.001))
    assert t.ref_model is not model
    own = {id(p) for p in model.parameters()}
    for (n, p), (_, q) in zip(model.named_parameters(), t.ref_model.named_parameters()):
        assert id(q) not in own and not q.requires_grad and torch.equal(p, q), n
    t.update(make_sequences(3, seed=15))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), t.ref_model.parameters())), "ref stays frozen"


def test_mini_batches_and_ppo_epochs():
    model = small_model(seed=16)
    seqs = make_sequences(10, seed=17)
    trainer = Trainer(
        model,
        TrainerConfig(loss_impl="reference", kl_coef=0.0, lr=1e-3, ppo_epochs=2, mini_batches=2, micro_batch_tokens=64),
    )
    metrics = trainer.update(seqs)
    assert metrics["actor/num_mini_batches"] == 2 and metrics["actor/optimizer_steps"] == 4
    assert metrics["actor/ratio_max"] > 1.0, "later epochs/mini-batches see an updated policy"
    assert metrics["actor/num_seqs"] == 10


def test_tiny_model_directory_trains(tiny_model_dir):
    model = load_planner(tiny_model_dir, dtype="float32")
    seqs = make_sequences(4, seed=18, vocab=model.config.vocab_size)
    trainer = Trainer(model, TrainerConfig(loss_impl="reference", micro_batch_tokens=64))
    metrics = trainer.update(seqs)
    for k in ("actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/grad_norm", "perf/train_flops"):
        assert torch.isfinite(torch.tensor(metrics[k])), k
    assert "perf/mfu/actor" not in metrics, "no MFU without a known GPU peak"


def test_bfloat16_compute_with_float32_weights():
    model = small_model(seed=19)
    before = lm_head_weight(model).detach().clone()
    trainer = Trainer(
        model,
        TrainerConfig(loss_impl="reference", kl_coef=0.0, lr=1e-3, compute_dtype="bfloat16", micro_batch_tokens=64),
    )
    metrics = trainer.update(make_sequences(5, seed=20))
    assert next(model.parameters()).dtype == torch.float32
    assert torch.isfinite(torch.tensor(metrics["actor/loss"])) and metrics["actor/grad_norm"] > 0
    assert not torch.equal(lm_head_weight(model), before)


def test_gradient_checkpointing_gives_the_same_gradients():
    base = small_model(seed=21)
    seqs = make_sequences(6, seed=22)
    out = []
    for ckpt in (False, True):
        t = Trainer(
            copy.deepcopy(base),
            TrainerConfig(loss_impl="reference", kl_coef=0.0, gradient_checkpointing=ckpt, micro_batch_tokens=48),
        )
        b = t.prepare(seqs)
        t.compute_old_logprobs(b)
        t.accumulate_gradients(b)
        out.append(grads(t.model))
    for n in out[0]:
        assert torch.equal(out[0][n], out[1][n]), n


def test_fused_loss_impl_resolution():
    if hasattr(kernels, "linear_flow_grpo_loss"):
        loss, logprobs = loss_functions("fused", "chunked")
        assert loss.func is kernels.linear_flow_grpo_loss and logprobs.func is kernels.linear_token_logprobs
        assert loss.keywords == logprobs.keywords == {"algorithm": "chunked"}
        with pytest.raises(ValueError, match="lm_head_algorithm must be one of"):
            TrainerConfig(lm_head_algorithm="fast")
    else:
        with pytest.raises(RuntimeError, match="loss_impl='reference'"):
            loss_functions("fused")


def test_fused_matches_reference():
    if not hasattr(kernels, "linear_flow_grpo_loss") or not hasattr(kernels, "linear_token_logprobs"):
        pytest.skip("kernels.linear_flow_grpo_loss is not available yet")
    base = small_model(seed=23)
    seqs = make_sequences(6, seed=24)
    noise = [
        torch.randn(len(s.response_ids), generator=torch.Generator().manual_seed(i)) * 0.3 for i, s in enumerate(seqs)
    ]
    out = []
    for impl in ("reference", "fused"):
        t = Trainer(
            copy.deepcopy(base),
            TrainerConfig(loss_impl=impl, kl_coef=0.05, micro_batch_tokens=48),
            ref_model=perturbed(base, 3),
        )
        b = prepared_batch(t, seqs, noise)
        t.accumulate_gradients(b)
        out.append((grads(t.model), torch.cat([x for mini in b.old_logprobs for x in mini])))
    assert_close(out[1][1], out[0][1].double(), dtype=torch.float32, name="old logprobs")
    for n in out[0][0]:
        scale = max(1.0, out[0][0][n].abs().max().item())
        assert_close(out[1][0][n], out[0][0][n].double(), dtype=torch.float32, name=n, scale=scale)


def test_config_is_validated():
    with pytest.raises(ValueError, match="loss_agg"):
        TrainerConfig(loss_agg="mean")
    with pytest.raises(ValueError, match="kl_type"):
        TrainerConfig(kl_type="k4")
    with pytest.raises(ValueError, match="ppo_epochs"):
        TrainerConfig(ppo_epochs=0)
    with pytest.raises(ValueError, match="loss_impl"):
        TrainerConfig(loss_impl="triton")
    with pytest.raises(ValueError, match="dtype"):
        TrainerConfig(compute_dtype="fp8")
    trainer = Trainer(small_model(), TrainerConfig(loss_impl="reference", kl_coef=0.0, micro_batch_tokens=8))
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        trainer.update(make_sequences(3, seed=0))
    with pytest.raises(ValueError, match="no sequences"):
        trainer.update([])


@pytest.mark.gpu
def test_update_on_cuda_bf16_compute():
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=1031,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    )
    model = build_random_model(cfg, dtype="float32", device="cuda", seed=0)
    before = lm_head_weight(model).detach().clone()
    trainer = Trainer(
        model, TrainerConfig(loss_impl="reference", lr=1e-4, compute_dtype="bfloat16", micro_batch_tokens=256)
    )
    metrics = trainer.update(make_sequences(16, seed=1, vocab=1031))
    assert not torch.equal(lm_head_weight(model), before)
    assert torch.isfinite(torch.tensor(metrics["actor/loss"]))
    if "perf/mfu/actor" in metrics:
        assert 0 < metrics["perf/mfu/actor"] < 1
    mb = trainer.prepare(make_sequences(2, seed=2, vocab=1031)).micro_batches[0]
    assert hidden_states(model, mb).device.type == "cuda"


def test_forward_flops_match_the_counted_matmuls():
    from torch.utils.flop_counter import FlopCounterMode

    model = small_model(seed=25)
    cfg = model.config
    t = 37
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, cfg.vocab_size, (1, t)), use_cache=False)
    counted = counter.get_total_flops()  # linear layers and LM head (SDPA is not counted on CPU) ...
    # ... and, with transformers 5.17 (not 5.19), the rotary embedding's inv_freq @ positions matmul (2·8·37 = 592),
    # which forward_flops leaves out
    rotary = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("rotary_emb"))
    attention = 4 * cfg.head_dim * cfg.num_attention_heads * cfg.num_hidden_layers * t * (t + 1) / 2
    assert forward_flops(cfg, [t], t) - attention == counted - rotary
    assert flops_per_token(cfg) == 6 * body_params(cfg)


def test_presets_and_random_build():
    from engine.model import MODEL_SHAPES, num_parameters, preset_config

    counts = {
        name: num_parameters(build_random_model(preset_config(name), device="meta"))
        for name in MODEL_SHAPES
        if name.startswith("qwen2.5")
    }
    # The published sizes of Qwen2.5-1.5B (tied) and Qwen2.5-7B (untied).
    assert counts == {"qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512}
    assert preset_config("qwen2.5-1.5b").tie_word_embeddings and not preset_config("qwen2.5-7b").tie_word_embeddings
    with pytest.raises(ValueError, match="unknown architecture preset"):
        preset_config("llama")
    m = small_model(seed=26, dtype="bfloat16")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.model.rotary_emb.inv_freq.dtype == torch.float32
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.isfinite(m(input_ids=torch.arange(9)[None]).logits).all()


def test_load_planner_errors_name_the_path(tmp_path):
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        load_planner(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"has no config\.json"):
        load_planner(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(UsageError, match=r"has no \*.safetensors"):
        load_planner(tmp_path / "empty")


@pytest.mark.parametrize("impl,tis_cap", [("reference", None), ("reference", 1.5), ("fused", 1.5)])
def test_on_policy_old_logprobs_from_the_update_forward_equal_a_separate_pass(impl, tis_cap):
    """One optimizer step per rollout: the update's own forward gives the old log-probs; same step as a separate pass."""
    seqs = make_sequences(7, seed=21)
    cfg = TrainerConfig(loss_impl=impl, kl_coef=0.0, tis_cap=tis_cap, micro_batch_tokens=48, lr=1e-2)
    separate, fused = small_model(seed=20), small_model(seed=20)
    t_sep, t_fused = Trainer(separate, cfg), Trainer(fused, cfg)
    batch = t_sep.prepare(seqs)
    assert not t_sep.recompute_old(batch) and len(batch.micro_batches) > 1
    t_sep.compute_old_logprobs(batch)
    m_sep = {**t_sep.train(batch), **batch.metrics}
    m_fused = t_fused.update(seqs)
    assert m_fused["actor/old_logprob_fused"] == 1.0
    for key in (
        "actor/loss",
        "actor/pg_loss",
        "actor/ratio_max",
        "actor/grad_norm",
        "training/rollout_logprob_diff_mean",
    ):
        assert m_fused[key] == pytest.approx(m_sep[key], rel=1e-5, abs=1e-6), key
    if tis_cap is not None:
        assert m_fused["actor/tis_weight_mean"] == pytest.approx(m_sep["actor/tis_weight_mean"], rel=1e-6)
    for (name, a), b in zip(separate.named_parameters(), fused.parameters()):
        assert_close(b, a, dtype=torch.float32, name=name)


def test_several_optimizer_steps_keep_the_separate_old_logprob_pass():
    seqs = make_sequences(6, seed=22)
    trainer = Trainer(small_model(seed=23), TrainerConfig(loss_impl="reference", kl_coef=0.0, ppo_epochs=2))
    assert trainer.update(seqs)["actor/old_logprob_fused"] == 0.0
    with pytest.raises(ValueError, match="compute_old_logprobs"):
        trainer.accumulate_gradients(trainer.prepare(seqs))
