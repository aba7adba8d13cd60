"""Task sets (generated locally with a seed, or read from JSONL) and the judges that score answers."""

from __future__ import annotations

from collections.abc import Callable

from agentflow.tasks import arithmetic, game24, multihop, toy
from agentflow.tasks.jsonl import load_jsonl
from agentflow.tasks.judges import JUDGES, LLMJudge, rule_reward
from agentflow.tasks.query import Query

TASKS: dict[str, Callable[[int, int], list[Query]]] = {
    "arithmetic": arithmetic.generate,
    "game24": game24.generate,
    "multihop": multihop.generate,
    "toy": toy.generate,
}


def load_task(name: str, num_queries: int, seed: int = 0) -> list[Query]:
    """`num_queries` queries of the built-in task `name`, generated with `seed`."""
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}; built-in tasks are {sorted(TASKS)} (or load your own with load_jsonl)"
        )
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    return TASKS[name](num_queries, seed)


__all__ = ["JUDGES", "TASKS", "LLMJudge", "Query", "load_jsonl", "load_task", "rule_reward"]
