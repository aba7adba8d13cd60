"""The rollout-engine protocol: agentflow's `LanguageModel` plus the colocated lifecycle.

Generation (`SamplingConfig`, `Generation`, `LanguageModel`) is defined by its consumer,
`agentflow.lm`; this module re-exports it and adds what the training loop needs on top.

Lifecycle in the colocated step: `wake()` → `generate(...)`* → `sleep()` → trainer runs →
`sync_weights(...)` → `wake()` again. Engines that cannot release memory (vLLM on CPU) report
`supported=False` from `sleep` rather than pretending.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from agentflow.lm import Generation, LanguageModel, SamplingConfig

__all__ = ["Generation", "LanguageModel", "RolloutEngine", "SamplingConfig", "SleepReport", "SyncReport"]


@dataclass
class SleepReport:
    """What `sleep` released. `supported=False` means nothing was freed and `note` says why."""

    supported: bool
    level: int
    freed_bytes: int = 0
    seconds: float = 0.0
    note: str = ""


@dataclass
class SyncReport:
    """What `sync_weights` moved: tensors written, bytes copied (0 for shared storage), time taken."""

    num_tensors: int
    num_expected: int
    bytes_moved: int
    seconds: float
    zero_copy: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.num_tensors == self.num_expected


@runtime_checkable
class RolloutEngine(LanguageModel, Protocol):
    """A `LanguageModel` that also time-shares the device with training; vLLM and embedded engines."""

    def sleep(self, level: int = 1) -> SleepReport:
        """Release memory for training: level 1 frees the KV cache, level 2 also the weights."""
        ...

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Re-acquire memory; `tags` in ("weights", "kv_cache") wakes in stages, None wakes all."""
        ...

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncReport:
        """Write the trainer's parameters (HF names) into the engine in place, without reloading."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters since creation: prompts, generated tokens, seconds in generate, syncs, sleeps."""
        ...
