"""Base generator: asks the engine directly (no memory, no tools), one batched call for all commands."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence

from agentflow.chat import chat_ids, stop_ids
from agentflow.lm import Generation, LanguageModel, SamplingConfig
from agentflow.tools.base import Tool, ToolResult

SYSTEM = "You are a helpful assistant. Answer the question briefly."


class BaseGenerator(Tool):
    name = "base_generator"
    description = "asks a language model a self-contained question and returns its reply"
    command_format = "a self-contained question in plain text"

    def __init__(self, engine: LanguageModel, max_new_tokens: int = 128, max_prompt_chars: int = 2000) -> None:
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.max_prompt_chars = max_prompt_chars

    def sampling(self, seed: int | None = None) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            stop_token_ids=stop_ids(self.engine.tokenizer),
            seed=seed,
        )

    def prompt_ids(self, command: str) -> list[int] | None:
        """The engine prompt for one question; None for an empty one (answered without the engine)."""
        if not command.strip():
            return None
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": command[: self.max_prompt_chars]},
        ]
        return chat_ids(self.engine.tokenizer, messages)

    @staticmethod
    def result(generation: Generation | None) -> ToolResult:
        if generation is None:
            return ToolResult(False, "error: empty question for base_generator")
        return ToolResult(True, generation.text.strip() or "(empty reply)")

    def run(self, command: str) -> ToolResult:
        return self.run_batch([command], None, 0.0)[0]  # type: ignore[arg-type]

    def run_batch(self, commands: Sequence[str], pool: cf.Executor, timeout_s: float) -> list[ToolResult]:
        """One engine call for every command (empty commands are answered without the engine)."""
        prompts = [self.prompt_ids(c) for c in commands]
        todo = [i for i, p in enumerate(prompts) if p is not None]
        gens: list[Generation | None] = [None] * len(commands)
        if todo:
            for i, g in zip(todo, self.engine.generate([prompts[i] for i in todo], self.sampling())):
                gens[i] = g
        return [self.result(g) for g in gens]
