"""The rollout-engine protocol: the only thing `agentflow` knows about generation.

An engine turns token-id prompts into sampled token ids with the log-probability the engine
assigned to each sampled token (under the processed sampling distribution: after temperature,
before nothing else, so `log_softmax(logits / T)[token]` in the trainer is the same quantity).
Prompts are token ids, not text, so the caller knows exactly which ids a turn was trained on.

Lifecycle in the colocated step: `wake()` → `generate(...)`* → `sleep()` → trainer runs →
`sync_weights(...)` → `wake()` again. Engines that cannot release memory (vLLM on CPU) report
`supported=False` from `sleep` rather than pretending.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample one batch. Generation stops at an EOS/stop token id or after `max_new_tokens`."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    # Constrained decoding: sample only among these token ids (the rest get probability 0, and the
    # reported log-probs are those of the renormalised distribution). None = whole vocabulary.
    allowed_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must be None (whole vocabulary) or non-empty")


@dataclass
class Generation:
    """One sampled completion. `token_ids` include the stop token when one ended it."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (a stop/EOS token) or "length" (max_new_tokens)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")


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
class RolloutEngine(Protocol):
    """Generation behind the four-agent loop; implemented by the vLLM and embedded engines."""

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer matching the engine's vocabulary (chat template included)."""
        ...

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        """Sample one completion per prompt, all in one batch; results in prompt order."""
        ...

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
