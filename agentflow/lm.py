"""What the four-agent loop needs from a language model, owned here by its consumer.

A `LanguageModel` turns token-id prompts into sampled token ids with the log-probability it
assigned to each sampled token under the *processed* sampling distribution: after temperature and
the allowed-token restriction, before nothing else, so `log_softmax(logits / T)[token]` in a trainer
is the same quantity. Prompts are token ids, not text, so the caller knows exactly which ids a
turn was trained on. The engines in `engine.rollout` (vLLM, embedded) implement this protocol and
add the colocated lifecycle (sleep, wake, weight sync) that agentflow never sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


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


@runtime_checkable
class LanguageModel(Protocol):
    """Generation behind the four-agent loop: a tokenizer and batched sampling."""

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer matching the model's vocabulary (chat template included)."""
        ...

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        """Sample one completion per prompt, all in one batch; results in prompt order."""
        ...


@runtime_checkable
class StreamingLanguageModel(LanguageModel, Protocol):
    """Optional request-level interface: one request at a time, advanced by the caller's `step()`.

    `submit` queues one prompt and returns its request id; the request is sampled exactly as prompt 0
    of `generate([prompt_ids], sampling)` would be (same seed derivation), so a request's sample
    depends on its own seed only, never on what else is in the batch. `step` advances the engine by
    one scheduler iteration over everything pending and returns the requests that finished in it.
    `num_pending` counts submitted requests that have not been returned by `step` yet.
    """

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingConfig) -> int: ...

    def step(self) -> list[tuple[int, Generation]]: ...

    def num_pending(self) -> int: ...


def generate_each(
    model: StreamingLanguageModel, prompts: Sequence[Sequence[int]], samplings: Sequence[SamplingConfig]
) -> list[Generation]:
    """Submit every prompt with its own sampling (its own seed), step until all finished; prompt order."""
    if len(prompts) != len(samplings):
        raise ValueError(f"{len(prompts)} prompts but {len(samplings)} sampling configs")
    ids = [model.submit(p, s) for p, s in zip(prompts, samplings)]
    wanted = set(ids)
    done: dict[int, Generation] = {}
    while len(done) < len(ids):
        finished = model.step()
        for rid, gen in finished:
            if rid not in wanted:
                raise RuntimeError(f"request {rid} finished but was not submitted by this call")
            done[rid] = gen
        if not finished and model.num_pending() == 0:
            raise RuntimeError(f"the engine has nothing pending but {len(ids) - len(done)} requests never finished")
    return [done[i] for i in ids]
