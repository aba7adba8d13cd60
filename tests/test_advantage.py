"""Flow-GRPO advantages: group normalisation, zero-variance and singleton groups, broadcast to turns."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from engine.advantage import EPS, group_advantages, train_sequences
from engine.packing import pack, unpack_responses


def gold(rewards: list[float], groups: list) -> list[float]:
    """The definition written out in float64 Python: (R - mean) / (unbiased std + eps)."""
    out = [0.0] * len(rewards)
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        xs = [rewards[i] for i in idx]
        if len(xs) < 2 or max(xs) == min(xs):
            continue
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
        for i in idx:
            out[i] = (rewards[i] - m) / (sd + EPS)
    return out


def test_group_normalised_advantages_match_definition():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.2, 0.9, 0.4, 0.3, 0.3, 0.3]
    groups = ["q0"] * 4 + ["q1"] * 4 + ["q2"] * 3
    adv, stats = group_advantages(rewards, groups)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(
        adv.double(), torch.tensor(gold(rewards, groups), dtype=torch.float64), atol=1e-6, rtol=1e-6
    )
    # Each non-degenerate group has mean 0 and unbiased std ~1 (up to eps).
    for g in ("q0", "q1"):
        a = adv[[i for i, x in enumerate(groups) if x == g]].double()
        assert abs(a.mean().item()) < 1e-6 and abs(a.std().item() - 1) < 1e-4
    assert stats.num_groups == 3 and stats.num_zero_var_groups == 1 and stats.num_singleton_groups == 0
    assert stats.as_metrics()["adv/num_zero_var_groups"] == 1.0


def test_zero_variance_and_singleton_groups_give_zero_never_nan():
    # 0.1 * 3 / 3 != 0.1 in floating point: equality of rewards, not std == 0, decides zero variance.
    rewards = [0.1, 0.1, 0.1, 7.0, 1.0, 2.0]
    groups = [0, 0, 0, 1, 2, 2]
    adv, stats = group_advantages(rewards, groups)
    assert torch.isfinite(adv).all()
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adv[4] < 0 < adv[5]
    assert stats.num_zero_var_groups == 1 and stats.num_singleton_groups == 1 and stats.num_groups == 3


def test_bad_rewards_are_rejected():
    with pytest.raises(ValueError, match="non-finite reward for trajectories \\[1\\]"):
        group_advantages([1.0, float("nan")], [0, 0])
    with pytest.raises(ValueError, match="2 rewards but 3 group ids"):
        group_advantages([1.0, 0.0], [0, 0, 1])
    with pytest.raises(ValueError, match="no rewards"):
        group_advantages([], [])


@dataclass
class Turn:
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]


def test_advantage_is_broadcast_to_every_token_of_every_turn():
    trajectories = [
        [Turn([1, 2, 3], [4, 5], [-0.1, -0.2]), Turn([1, 2, 3, 4, 5, 6], [7], [-0.3])],
        [Turn([1, 2], [9, 9, 9], [-1.0, -1.0, -1.0])],
        [],  # a trajectory whose planner never produced a turn still counts in its group's statistics
        [{"prompt_ids": [8], "response_ids": [3, 2], "response_logprobs": [-0.5, -0.6]}] * 3,
    ]
    rewards = [1.0, 0.0, 0.0, 1.0]
    groups = ["a", "a", "b", "b"]
    adv, _ = group_advantages(rewards, groups)
    seqs = train_sequences(trajectories, adv, groups)
    assert len(seqs) == 2 + 1 + 0 + 3
    assert [(s.traj_id, s.turn, s.group_id) for s in seqs] == [
        (0, 0, 0),
        (0, 1, 0),
        (1, 0, 0),
        (3, 0, 1),
        (3, 1, 1),
        (3, 2, 1),
    ]
    mbs = pack(seqs, 12)
    per_seq = unpack_responses(mbs, [mb.advantages for mb in mbs], len(seqs))
    for s, a in zip(seqs, per_seq):
        assert torch.equal(a, torch.full((len(s.response_ids),), adv[s.traj_id].item()))
    assert seqs[0].advantage > 0 > seqs[2].advantage
    assert seqs[3].advantage == pytest.approx(adv[3].item())


def test_train_sequences_checks_lengths():
    with pytest.raises(ValueError, match="2 trajectories but 1 advantages"):
        train_sequences([[], []], [0.0])
