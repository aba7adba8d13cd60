"""Multi-hop questions answerable from the shipped corpus (see `agentflow.tasks.world`)."""

from __future__ import annotations

from agentflow.tasks.query import Query
from agentflow.tasks.world import multihop_questions


def generate(num_queries: int, seed: int) -> list[Query]:
    return [
        Query(id=f"multihop-s{seed}-{i}", question=q, answer=a, judge=j, meta={"hops": hops})
        for i, (q, a, j, hops) in enumerate(multihop_questions(num_queries, seed))
    ]
