"""The timer protocol the four-agent loop reports its phases to; the caller supplies the clock.

`phase(name)` brackets a step phase (the loop reports `reward`); `span(name)` brackets a detail
inside a phase (the roles: planner, executor, tools, verifier, generator) that does not take time
away from the enclosing phase. `engine.metrics.PhaseTimer` implements both (CUDA events or
`perf_counter`, nested, disjoint self-times). `NO_TIMER` measures nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable


@runtime_checkable
class Timer(Protocol):
    def phase(self, name: str) -> contextlib.AbstractContextManager[None]: ...

    def span(self, name: str) -> contextlib.AbstractContextManager[None]: ...


class _NoTimer:
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    span = phase


NO_TIMER: Timer = _NoTimer()
