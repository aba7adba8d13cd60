"""Flow-GRPO advantages: group-normalised terminal rewards, broadcast to every planner turn.

For the G trajectories of one query (a group), trajectory i gets

    A_i = (R_i − mean R) / (std R + eps),   eps = 1e-6, std unbiased (torch.std's default, as verl)

computed in float64, where mean and std run over (`AdvantageConfig.grouping`):

- "trajectory": the G rewards of the group, one per trajectory (the paper's formula);
- "turn": the rewards of every planner turn of the group's trajectories, each turn carrying its
  trajectory's reward (AgentFlow's code: verl's GRPO estimator sees one sample per turn, grouped by
  query), so a trajectory with more turns weighs more in the baseline. Rewards {1 with 1 turn,
  0 with 3 turns}: turn grouping gives A = +1.5 / −0.5, trajectory grouping ±0.707. A trajectory
  with no turn (out of context before its first) is not a sample here.

A group of one sample (one trajectory; under "turn" grouping, one turn) has no baseline and gets
A = 0, counted in `num_singleton_groups`. verl instead takes mean 0 and std 1 there, giving A = R:
a lone success would be pushed up and a lone failure left alone, which GRPO's comparison within a
group does not justify; the task configuration refuses G < 2 anyway. A group whose samples all have
equal rewards (zero variance) gets A = 0 exactly, never NaN, and is counted in
`num_zero_var_groups`: with no KL or entropy term those trajectories contribute no gradient. The advantage of a
trajectory is the same for every planner token of every one of its turns (Flow-GRPO's broadcast);
`train_sequences` builds those turns into `TrainSequence`s.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine.packing import TrainSequence

EPS = 1e-6
GROUPINGS = ("trajectory", "turn")


@dataclass(frozen=True)
class AdvantageConfig:
    """How rewards become advantages (module doc)."""

    grouping: str = "trajectory"
    eps: float = EPS

    def __post_init__(self) -> None:
        if self.grouping not in GROUPINGS:
            raise ValueError(f"advantage grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if not self.eps > 0:
            raise ValueError(f"advantage eps must be > 0, got {self.eps}")


@dataclass(frozen=True)
class AdvantageStats:
    num_trajectories: int
    num_groups: int
    num_zero_var_groups: int
    num_singleton_groups: int
    reward_mean: float
    reward_std: float
    adv_abs_mean: float

    def as_metrics(self, prefix: str = "adv/") -> dict[str, float]:
        return {prefix + k: float(v) for k, v in asdict(self).items()}


def group_advantages(
    rewards: Sequence[float] | torch.Tensor,
    group_ids: Sequence[Hashable],
    *,
    eps: float = EPS,
    turns: Sequence[int] | None = None,
) -> tuple[torch.Tensor, AdvantageStats]:
    """Per-trajectory advantages (float32 [n]) and group statistics; `group_ids[i]` names trajectory i's query.

    `turns[i]`: trajectory i's number of planner turns, for "turn" grouping (each trajectory counts
    as that many samples); None is "trajectory" grouping (each counts once)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    n = r.numel()
    if n == 0:
        raise ValueError("no rewards: the step produced no trajectories")
    if len(group_ids) != n:
        raise ValueError(f"{n} rewards but {len(group_ids)} group ids")
    bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"non-finite reward for trajectories {bad[:8]}: the reward function must return finite numbers"
        )
    if turns is not None and (len(turns) != n or any(int(k) < 0 for k in turns)):
        raise ValueError(f"turns must give a count >= 0 for each of the {n} trajectories, got {list(turns)[:8]}")
    groups: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    adv = torch.zeros(n, dtype=torch.float64)
    zero_var = singleton = 0
    for members in groups.values():
        idx = torch.tensor(members)
        counts = (
            torch.ones(len(members), dtype=torch.long) if turns is None else torch.tensor([turns[i] for i in members])
        )
        x = torch.repeat_interleave(r[idx], counts)  # one sample per trajectory, or per planner turn
        if x.numel() <= 1:
            singleton += 1
            continue
        if bool((x == x[0]).all()):
            zero_var += 1
            continue
        adv[idx] = (r[idx] - x.mean()) / (x.std() + eps)
    stats = AdvantageStats(
        num_trajectories=n,
        num_groups=len(groups),
        num_zero_var_groups=zero_var,
        num_singleton_groups=singleton,
        reward_mean=r.mean().item(),
        reward_std=r.std().item() if n > 1 else 0.0,
        adv_abs_mean=adv.abs().mean().item(),
    )
    return adv.to(torch.float32), stats


def _turn_field(turn: Any, *names: str) -> Any:
    for name in names:
        if isinstance(turn, dict) and name in turn:
            return turn[name]
        if hasattr(turn, name):
            return getattr(turn, name)
    raise AttributeError(f"planner turn {type(turn).__name__} has none of the fields {names}")


def train_sequences(
    turns_per_trajectory: Sequence[Sequence[Any]],
    advantages: Sequence[float] | torch.Tensor,
    group_ids: Sequence[Hashable] | None = None,
) -> list[TrainSequence]:
    """One `TrainSequence` per planner turn, each carrying its trajectory's advantage (the broadcast).

    A turn is any object (or dict) with `prompt_ids`, `response_ids` and `response_logprobs`
    (`logprobs` is accepted too). Trajectory i's turns get traj_id=i, group_id = index of its group.
    """
    adv = torch.as_tensor(advantages, dtype=torch.float64).flatten().tolist()
    if len(adv) != len(turns_per_trajectory):
        raise ValueError(f"{len(turns_per_trajectory)} trajectories but {len(adv)} advantages")
    group_index: dict[Hashable, int] = {}
    out = []
    for i, turns in enumerate(turns_per_trajectory):
        g = group_index.setdefault(group_ids[i], len(group_index)) if group_ids is not None else -1
        if not math.isfinite(adv[i]):
            raise ValueError(f"trajectory {i}: advantage {adv[i]} is not finite")
        for k, turn in enumerate(turns):
            out.append(
                TrainSequence(
                    prompt_ids=_turn_field(turn, "prompt_ids"),
                    response_ids=_turn_field(turn, "response_ids", "token_ids"),
                    rollout_logprobs=_turn_field(turn, "response_logprobs", "logprobs"),
                    advantage=adv[i],
                    traj_id=i,
                    group_id=g,
                    turn=k,
                )
            )
    return out
