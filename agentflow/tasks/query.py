"""One task item: the question, the gold answer and the name of the judge that scores answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Query:
    id: str
    question: str
    answer: str
    judge: str = "auto"  # a key of agentflow.tasks.judges.JUDGES
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
