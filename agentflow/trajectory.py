"""What a rollout produces for the trainer: trajectories of planner turns, JSON-serialisable.

A `Turn` is one planner call: the exact prompt ids, the sampled response ids (ending with the stop
token when one ended it) and the engine's float log-prob of every response token. Invalid planner
output is still a turn (`valid=False`, the reason in `tool_result`), because it is trained on too.
A `Trajectory` carries one terminal reward; the trainer broadcasts the group-normalised reward to
every response token of every turn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from agentflow.memory import Memory

STOP_REASONS = ("verifier", "max_turns", "context_budget")


@dataclass
class Turn:
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    valid: bool
    tool: str = ""
    sub_goal: str = ""
    command: str = ""
    tool_result: str = ""

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.response_logprobs):
            raise ValueError(
                f"turn has {len(self.response_ids)} response ids but {len(self.response_logprobs)} log-probs"
            )


@dataclass
class Trajectory:
    query_id: str
    group_index: int
    query: str  # the question
    gold: str  # the reference answer
    answer: str | None = None  # the generator's final answer (the text inside <answer> tags)
    reward: float = 0.0
    stop_reason: str = ""
    turns: list[Turn] = field(default_factory=list)
    memory: Memory | None = None
    source: str = ""  # the query's data source (reward per source in the metrics, accuracy per benchmark)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        d = dict(d)
        d["turns"] = [Turn(**t) for t in d.get("turns", [])]
        d["memory"] = Memory.from_dict(d["memory"]) if d.get("memory") else None
        return cls(**d)
