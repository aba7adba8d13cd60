"""The one clock of a training step: nested phases with disjoint self-times, plus detail spans.

`with timer.phase("gen"): ...` brackets a step phase; phases nest (`step` ⊃ `gen` ⊃ `reward`,
`wake` ⊃ `update_weights`), and `collect()` reports each phase's *self* time: its duration minus
the phases nested in it, so the phases of a step add up to `timing_s/step` (reported inclusive).
`with timer.span("planner"): ...` brackets a detail inside a phase (the rollout's roles, the
memory hand-over's sub-steps); spans are reported inclusive under their own names and take
nothing away from the enclosing phase. A name entered twice in a step accumulates.

On a CUDA device every bracket records a pair of CUDA events on the current stream (device time,
no synchronisation inside the step) and `collect()` synchronises; a timer serves one step; elsewhere it reads
`time.perf_counter`. Every bracket is also a `torch.profiler.record_function` range, so it is
labelled in a Chrome trace. Hooks (`hook(name, "enter" | "exit")`) see every phase and span:
the console's progress line and the per-phase memory snapshots hang there.

`PHASES` is the one list of phase names (with what each covers); the metric key of a phase is
`timing_s/<name>`, verl's names where verl has the phase.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

PHASES: dict[str, str] = {
    "step": "the whole step (reported inclusive)",
    "gen": "rollout: B x G trajectories (judge excluded)",
    "reward": "the judge, inside gen",
    "adv": "advantages -> training sequences",
    "sleep": "engine sleeps, trainer state back",
    "pack": "trainer: packing",
    "old_log_prob": "trainer: old log-probs",
    "ref": "trainer: reference log-probs (kl_coef > 0)",
    "update_actor": "trainer: forward/backward/step",
    "gap_probe": "rollout/trainer gap probes",
    "wake": "trainer state off, engine awake (sync excluded)",
    "update_weights": "weight sync into the engine, inside wake",
    "validate": "greedy rollouts of the validation data, best checkpoint (every val_every steps)",
    "save_checkpoint": "checkpoint",
}


def timing_key(name: str) -> str:
    return f"timing_s/{name}"


@dataclass
class Timings:
    """One step's clock: self-seconds per phase (`step` inclusive) and inclusive seconds per span."""

    phases: dict[str, float] = field(default_factory=dict)
    spans: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float | None]:
        """`timing_s/<phase>` for every phase of `PHASES` (None where it did not run)."""
        return {timing_key(p): self.phases.get(p) for p in PHASES}


@dataclass
class _Bracket:
    name: str
    is_phase: bool
    parent: int | None  # index of the enclosing phase's bracket
    start: Any
    end: Any = None


class PhaseTimer:
    """Nested phase and span timing of one step (see the module doc)."""

    def __init__(self, device: torch.device | str | None = None, hooks: Sequence[Callable[[str, str], None]] = ()):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.hooks = list(hooks)
        self._brackets: list[_Bracket] = []
        self._open_phases: list[int] = []

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextlib.contextmanager
    def _bracket(self, name: str, is_phase: bool) -> Iterator[None]:
        if is_phase and name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases are {tuple(PHASES)} (use span() for details)")
        for h in self.hooks:
            h(name, "enter")
        with torch.profiler.record_function(name):
            parent = self._open_phases[-1] if self._open_phases else None
            b = _Bracket(name, is_phase, parent, self._now())
            self._brackets.append(b)
            if is_phase:
                self._open_phases.append(len(self._brackets) - 1)
            try:
                yield
            finally:
                b.end = self._now()
                if is_phase:
                    self._open_phases.pop()
                for h in self.hooks:
                    h(name, "exit")

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._bracket(name, True)

    def span(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._bracket(name, False)

    def collect(self) -> Timings:
        """The closed brackets so far, resolved (one CUDA synchronise); open ones are left out."""
        closed = [b for b in self._brackets if b.end is not None]
        if self.cuda and closed:
            torch.cuda.synchronize()
        out = Timings()
        for b in closed:
            s = b.start.elapsed_time(b.end) / 1e3 if self.cuda else b.end - b.start
            if not b.is_phase:
                out.spans[b.name] = out.spans.get(b.name, 0.0) + s
                continue
            out.phases[b.name] = out.phases.get(b.name, 0.0) + s
            if b.parent is not None and self._brackets[b.parent].name != "step":
                parent = self._brackets[b.parent].name
                out.phases[parent] = out.phases.get(parent, 0.0) - s
        return out
