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

__all__ = [
    "Generation",
    "LanguageModel",
    "RolloutEngine",
    "SamplingConfig",
    "SleepReport",
    "SyncReport",
    "TransientWeights",
]


class TransientWeights:
    """Named tensors for `sync_weights` that are valid only until the next one is drawn (a sharded
    trainer's gathered FSDP group is freed when the group reshards): the engine must copy each as it
    arrives and cannot check them all before writing (a bad one found late leaves the engine marked
    stale until a complete sync). A plain iterable promises tensors that stay valid for the call."""

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._it = iter(named_tensors)

    def __iter__(self):
        return self._it


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


def check_prompts(
    prompts: Sequence[Sequence[int]], sampling: SamplingConfig, vocab_size: int, max_len: int | None, limit: str
) -> list[list[int]]:
    """The prompts as lists of ints, after one-line errors for what no engine can run: no prompts, an
    empty prompt, a token id outside [0, vocab_size), a prompt of `max_len` tokens or more (`limit`
    says which setting bounds it), stop or allowed token ids outside the vocabulary."""
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if len(prompts) == 0:
        raise ValueError("generate got an empty list of prompts; pass at least one prompt (a list of token ids)")
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token id")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        if max_len is not None and len(ids) >= max_len:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens but {limit} is {max_len}; "
                f"shorten the prompt (the agent loop's context budget) or raise that limit"
            )
        out.append(ids)
    bad = [t for t in (*sampling.stop_token_ids, *(sampling.allowed_token_ids or ())) if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop/allowed token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return out
