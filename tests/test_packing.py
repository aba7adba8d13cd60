"""Packing planner turns into padding-free micro-batches: round trip, budget, boundaries, loss rows."""

from __future__ import annotations

import random

import pytest
import torch

from engine.packing import MicroBatch, TrainSequence, pack, unpack_responses, unpack_tokens


def random_sequences(n: int, seed: int, max_prompt: int = 40, max_response: int = 25) -> list[TrainSequence]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(1, max_prompt), rng.randint(1, max_response)
        out.append(
            TrainSequence(
                prompt_ids=[rng.randrange(1000) for _ in range(p)],
                response_ids=[rng.randrange(1000) for _ in range(r)],
                rollout_logprobs=[-rng.random() * 5 for _ in range(r)],
                advantage=rng.uniform(-2, 2),
                traj_id=i // 2,
                turn=i % 2,
            )
        )
    return out


@pytest.mark.parametrize("budget", [65, 100, 257, 10_000])
def test_pack_round_trip_and_layout(budget):
    seqs = random_sequences(37, seed=budget)
    mbs = pack(seqs, budget)
    seen = sorted(i for mb in mbs for i in mb.seq_indices)
    assert seen == list(range(len(seqs))), "every sequence lands in exactly one micro-batch"
    for mb in mbs:
        assert mb.num_tokens <= budget
        assert mb.input_ids.dtype == torch.long and mb.position_ids.dtype == torch.long
        assert mb.cu_seqlens.dtype == torch.int32 and mb.response_cu_seqlens.dtype == torch.int32
        # No padding: T is exactly the sum of the sequence lengths.
        assert mb.num_tokens == sum(len(seqs[i]) for i in mb.seq_indices)
        assert mb.cu_seqlens.tolist() == list(mb.cu_seqlens_host)
        assert mb.max_seqlen == max(len(seqs[i]) for i in mb.seq_indices)
        # Tokens come back out exactly.
        for i, (prompt, response) in zip(mb.seq_indices, unpack_tokens(mb)):
            assert prompt == seqs[i].prompt_ids and response == seqs[i].response_ids
        # Positions restart at 0 at every sequence start.
        cu = mb.cu_seqlens_host
        for k in range(mb.num_seqs):
            assert mb.position_ids[cu[k] : cu[k + 1]].tolist() == list(range(cu[k + 1] - cu[k]))
    # Per-response-token values map back to their sequences.
    back = unpack_responses(mbs, [mb.rollout_logprobs for mb in mbs], len(seqs))
    for s, v in zip(seqs, back):
        assert torch.equal(v, torch.tensor(s.rollout_logprobs, dtype=torch.float32))
    adv = unpack_responses(mbs, [mb.advantages for mb in mbs], len(seqs))
    for s, v in zip(seqs, adv):
        assert torch.equal(v, torch.full((len(s.response_ids),), s.advantage, dtype=torch.float32))


def test_loss_positions_are_exactly_the_rows_predicting_response_tokens():
    seqs = random_sequences(9, seed=3)
    for mb in pack(seqs, 120):
        cu = mb.cu_seqlens_host
        expected = []
        for k, p in enumerate(mb.prompt_lens):
            r = mb.response_lens[k]
            expected += range(cu[k] + p - 1, cu[k] + p - 1 + r)
        assert mb.loss_positions.tolist() == expected
        # The row at loss_positions predicts the next token, which is the response target.
        assert torch.equal(mb.input_ids[mb.loss_positions + 1], mb.targets)
        # No row predicting a prompt token is ever selected (prompt positions never reach the LM head).
        prompt_rows = {cu[k] + j for k, p in enumerate(mb.prompt_lens) for j in range(p - 1)}
        assert not prompt_rows & set(mb.loss_positions.tolist())
        assert mb.num_response_tokens == sum(mb.response_lens)
        assert mb.seq_of_token.tolist() == [k for k, r in enumerate(mb.response_lens) for _ in range(r)]
        rcu = mb.response_cu_seqlens.tolist()
        assert [rcu[k + 1] - rcu[k] for k in range(mb.num_seqs)] == list(mb.response_lens)


def test_first_fit_decreasing_fills_bins():
    seqs = [TrainSequence([1] * (n - 1), [2], [-1.0], 0.0) for n in (6, 4, 5, 5, 3, 7)]
    mbs = pack(seqs, 10)
    # 7+3, 6+4, 5+5: a perfect fit exists and FFD finds it.
    assert len(mbs) == 3 and all(mb.num_tokens == 10 for mb in mbs)


def test_single_token_prompt_and_response():
    mbs = pack([TrainSequence([5], [6], [-0.5], 1.0)], 2)
    (mb,) = mbs
    assert mb.loss_positions.tolist() == [0] and mb.targets.tolist() == [6]


def test_sequence_over_budget_names_the_knob():
    seqs = random_sequences(4, seed=1)
    longest = max(len(s) for s in seqs)
    with pytest.raises(
        ValueError, match=r"micro_batch_tokens=10\b.*Raise micro_batch_tokens to at least " + str(longest)
    ):
        pack(seqs, 10)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="no sequences"):
        pack([], 100)
    with pytest.raises(ValueError, match="empty prompt"):
        TrainSequence([], [1], [-1.0], 0.0)
    with pytest.raises(ValueError, match="empty response"):
        TrainSequence([1], [], [], 0.0)
    with pytest.raises(ValueError, match="2 response tokens but 1 rollout log-probs"):
        TrainSequence([1], [2, 3], [-1.0], 0.0)
    with pytest.raises(ValueError, match="advantage"):
        TrainSequence([1], [2], [-1.0], float("nan"))
    with pytest.raises(ValueError, match="non-finite rollout log-prob"):
        TrainSequence([1], [2], [float("nan")], 0.0)


def test_micro_batch_to_moves_tensors_and_keeps_host_fields():
    (mb,) = pack(random_sequences(3, seed=0), 1000)
    moved = mb.to("cpu")
    assert isinstance(moved, MicroBatch) and moved.seq_indices == mb.seq_indices
    assert torch.equal(moved.input_ids, mb.input_ids)
