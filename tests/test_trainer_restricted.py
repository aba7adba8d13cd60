"""The trainer under a restricted action vocabulary (constrained decoding): exact log-probs and gradients."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from engine.model import build_random_model, lm_head_weight, preset_config
from engine.packing import TrainSequence
from engine.rollout.embedded import EmbeddedEngine
from engine.rollout.protocol import SamplingConfig
from engine.trainer import Trainer, TrainerConfig

ALLOWED = (3, 50, 77, 190, 200)


def small_model(seed: int = 0):
    return build_random_model(preset_config("qwen2-test"), dtype="float32", seed=seed)


def sequences(n: int, seed: int) -> list[TrainSequence]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(1, 12), rng.randint(1, 4)
        out.append(
            TrainSequence(
                [rng.randrange(211) for _ in range(p)],
                [rng.choice(ALLOWED) for _ in range(r)],
                [-rng.random() for _ in range(r)],
                rng.uniform(-1.5, 1.5),
                traj_id=i,
            )
        )
    return out


def gold_logprobs_and_grads(model64, seqs, temperature):
    """float64, one sequence at a time: logits masked to -inf outside ALLOWED, log_softmax, gather."""
    keep = torch.zeros(211, dtype=torch.bool)
    keep[list(ALLOWED)] = True
    lps, loss = [], 0.0
    n_tokens = sum(len(s.response_ids) for s in seqs)
    for s in seqs:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logits = model64(input_ids=ids).logits[0] / temperature
        p = len(s.prompt_ids)
        rows = logits[p - 1 : p - 1 + len(s.response_ids)].masked_fill(~keep, float("-inf"))
        lp = torch.log_softmax(rows, -1).gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)
        lps.append(lp)
        loss = loss + (-s.advantage * lp).sum() / n_tokens  # ratio 1 at old = logp: pg grad = -A ∇logp
    loss.backward()
    return lps, {n: p.grad.detach().clone() for n, p in model64.named_parameters()}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_restricted_logprobs_and_gradients_match_a_float64_gold(temperature):
    base = small_model(seed=4)
    seqs = sequences(7, seed=5)
    cfg = TrainerConfig(
        loss_impl="reference", kl_coef=0.0, allowed_token_ids=ALLOWED, temperature=temperature, micro_batch_tokens=24
    )
    trainer = Trainer(copy.deepcopy(base), cfg)
    batch = trainer.prepare(seqs)
    assert len(batch.micro_batches) > 1
    trainer.compute_old_logprobs(batch)
    gold_lp, gold_g = gold_logprobs_and_grads(copy.deepcopy(base).double(), seqs, temperature)
    for mb, old in zip(batch.micro_batches, batch.old_logprobs[0]):
        want = torch.cat([gold_lp[i] for i in mb.seq_indices])
        # float32 vs float64 gold: observed max |err| 1.5e-7
        torch.testing.assert_close(old.double(), want.detach(), atol=2e-6, rtol=0)
    trainer.compute_ref_logprobs(batch)
    trainer.accumulate_gradients(batch)
    weight = "model.embed_tokens.weight"
    for name, p in trainer.model.named_parameters():
        g, want = p.grad.double(), gold_g[name]
        # relative to the tensor's largest gradient: observed ~1e-6
        torch.testing.assert_close(g, want, atol=1e-5 * want.abs().max().item() + 1e-12, rtol=0)
    # the LM-head side only reaches the allowed rows: rows neither allowed nor in any prompt get no gradient
    used = {t for s in seqs for t in s.prompt_ids + s.response_ids[:-1]} | set(ALLOWED)
    untouched = [t for t in range(211) if t not in used]
    assert untouched and trainer.model.get_parameter(weight).grad[untouched].abs().max() == 0


def test_response_token_outside_the_action_set_is_a_clear_error():
    trainer = Trainer(small_model(), TrainerConfig(loss_impl="reference", kl_coef=0.0, allowed_token_ids=ALLOWED))
    bad = TrainSequence([1, 2], [4], [-0.5], 1.0, traj_id=3)
    with pytest.raises(ValueError, match=r"trajectory 3.*outside allowed_token_ids"):
        trainer.prepare([bad])
    with pytest.raises(ValueError, match="duplicates"):
        TrainerConfig(allowed_token_ids=(1, 1))
    with pytest.raises(ValueError, match="LM head"):
        Trainer(small_model(), TrainerConfig(loss_impl="reference", kl_coef=0.0, allowed_token_ids=(5, 500)))


def test_trainer_and_embedded_engine_agree_under_constrained_decoding(tiny_model_dir):
    """Samples from the real tiny model under allowed ids; the trainer's recomputed log-probs match the engine's."""
    engine = EmbeddedEngine.from_pretrained(tiny_model_dir, dtype="float32")
    tok = engine.tokenizer
    allowed = (tok.eos_token_id, 400, 401, 402)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"pick {i}"}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for i in range(6)
    ]
    s = SamplingConfig(max_new_tokens=3, temperature=1.0, seed=1, allowed_token_ids=allowed)
    gens = engine.generate(prompts, s)
    seqs = [TrainSequence(g.prompt_ids, g.token_ids, g.logprobs, 1.0 - i % 2, traj_id=i) for i, g in enumerate(gens)]
    trainer = Trainer(engine.model, TrainerConfig(loss_impl="reference", kl_coef=0.0, allowed_token_ids=allowed))
    batch = trainer.prepare(seqs)
    trainer.compute_old_logprobs(batch)
    assert batch.metrics["training/rollout_logprob_diff_max"] < 1e-5  # float32: observed ~5e-7
    full = Trainer(engine.model, TrainerConfig(loss_impl="reference", kl_coef=0.0))
    fb = full.prepare(seqs)
    full.compute_old_logprobs(fb)
    assert fb.metrics["training/rollout_logprob_diff_mean"] > 1.0, "without the restriction the log-probs differ"
    assert lm_head_weight(engine.model).shape[0] > max(allowed)
