"""One task item: the question, the gold answer(s), the judge that scores answers and the data source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Query:
    id: str
    question: str
    answer: str  # the reference answer (the first acceptable one)
    judge: str = "auto"  # a key of agentflow.tasks.judges.JUDGES
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    source: str = ""  # the data source (e.g. "nq", "mathhard", a benchmark's name); "" when unknown
    alternatives: tuple[str, ...] = ()  # further acceptable answers (NQ lists several); a match with any scores

    @property
    def golds(self) -> tuple[str, ...]:
        """Every acceptable answer, the reference first."""
        return (self.answer, *self.alternatives)
