"""Base generator: asks the engine directly (no memory, no tools), one batched call for all commands."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence

from agentflow.chat import chat_ids, stop_ids
from agentflow.lm import LanguageModel, SamplingConfig
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

    def _sampling(self, seed: int | None = None) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            stop_token_ids=stop_ids(self.engine.tokenizer),
            seed=seed,
        )

    def run(self, command: str) -> ToolResult:
        return self.run_batch([command], None, 0.0)[0]  # type: ignore[arg-type]

    def run_batch(self, commands: Sequence[str], pool: cf.Executor, timeout_s: float) -> list[ToolResult]:
        """One engine call for every command (empty commands are answered without the engine)."""
        tok = self.engine.tokenizer
        todo = [i for i, c in enumerate(commands) if c.strip()]
        out = [ToolResult(False, "error: empty question for base_generator") for _ in commands]
        if not todo:
            return out
        prompts = [
            chat_ids(
                tok,
                [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": commands[i][: self.max_prompt_chars]},
                ],
            )
            for i in todo
        ]
        for i, g in zip(todo, self.engine.generate(prompts, self._sampling())):
            out[i] = ToolResult(True, g.text.strip() or "(empty reply)")
        return out
