"""Task sets (generated locally with a seed, or read from JSONL, JSON or parquet) and the judges that score answers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from agentflow.tasks import arithmetic, game24, multihop, toy
from agentflow.tasks.data import DataSpec, load_jsonl, load_queries
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
            f"unknown task {name!r}; built-in tasks are {sorted(TASKS)} (or load your own with load_queries)"
        )
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    return [dataclasses.replace(q, source=q.source or name) for q in TASKS[name](num_queries, seed)]


__all__ = ["JUDGES", "TASKS", "DataSpec", "LLMJudge", "Query", "load_jsonl", "load_queries", "load_task", "rule_reward"]
