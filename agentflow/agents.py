"""The four agents: prompts, output formats and parsers, LLM-backed and rule-based variants.

Every agent works on a batch (the live trajectories of one loop step) and makes at most one
`generate` call per batch. Only the planner is trained; its output format is deliberately short:

    Tool: <tool name>
    Sub-goal: <what this step should achieve; may continue on further lines>

A planner response is a valid action iff it ended with a stop token (not cut at max_new_tokens)
and, after stripping surrounding whitespace, its first line is `Tool: NAME` with NAME exactly one
of the offered tool names and its second line starts `Sub-goal:` followed by non-empty text.
Anything else is an invalid action: recorded as a turn with the reason, never an exception.

A second planner format, "tool_token" (`AgentConfig.planner_format`), is for training a small
planner from scratch (the `toy` preset): every tool name is one token of the tokenizer, the planner
is sampled under constrained decoding over the tool tokens and the end-of-turn token(s)
(`Planner.allowed_token_ids`), and its response is parsed strictly: valid iff it is exactly one
tool token, optionally followed by one end-of-turn token. The planner writes no sub-goal: the
sub-goal is the query itself, from which the (rule) executor derives the tool's command.

Variants (chosen by `AgentConfig.executor/verifier/generator`; "llm" is the default):

- executor "llm": asks the engine for `Command: <command>` given the tool, its command format, the
  sub-goal and the memory; no `Command:` in the reply is a tool error in memory. "rule": the
  tool's own `command_from(sub_goal, query)` (calculator: the longest arithmetic expression in the
  sub-goal, else in the query; python: the fenced code or the sub-goal text; search and
  base_generator: the sub-goal text). Deterministic, no LLM.
- verifier "llm": asks for one word, STOP or CONTINUE; parsed robustly (a first line that is one of
  the two words, optionally after `Verdict:`, wins; else the one word of the two that occurs; both
  or neither means CONTINUE). "rule": STOP iff the last step was a valid action whose tool succeeded.
- generator "llm": asks for the final answer inside `<answer>...</answer>`; the answer is the
  last tagged span (an unterminated final `<answer>` counts); no tag means no answer (reward 0).
  "rule": `<answer>` + the last line of the last successful tool result + `</answer>`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agentflow.chat import chat_ids, stop_ids
from agentflow.lm import Generation, LanguageModel, SamplingConfig, StreamingLanguageModel, generate_each
from agentflow.memory import Memory
from agentflow.tools.base import Tool

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PlannerAction:
    valid: bool
    tool: str = ""
    sub_goal: str = ""
    error: str = ""


def tool_token_ids(tokenizer: Any, tool_names: Sequence[str]) -> dict[int, str]:
    """{token id: tool name} when every tool name is exactly one token (round trip); else a clear error."""
    out: dict[int, str] = {}
    for name in tool_names:
        ids = tokenizer.encode(name, add_special_tokens=False)
        if len(ids) != 1 or tokenizer.decode(ids) != name:
            raise ValueError(
                f"planner_format='tool_token' needs every tool name to be a single token, but {name!r} encodes to "
                f"{len(ids)} tokens {ids[:8]}; build the model with the tool names as added tokens "
                f"(engine.tiny.TinyConfig(extra_tokens=...)) or use planner_format='text'"
            )
        out[int(ids[0])] = name
    return out


def parse_tool_token(token_ids: Sequence[int], tools: dict[int, str], stop: Sequence[int], query: str) -> PlannerAction:
    """Parse a tool-token planner response (see the module docstring); the sub-goal is the query."""
    ids = list(token_ids)
    if len(ids) > 1 and ids[-1] in stop:
        ids = ids[:-1]
    if not ids or ids[0] in stop:
        return PlannerAction(False, error="ended the turn without naming a tool")
    if len(ids) != 1:
        return PlannerAction(False, error=f"expected exactly one tool token, got {len(ids)} tokens")
    if ids[0] not in tools:
        return PlannerAction(False, error=f"token {ids[0]} is not a tool; choose one of {', '.join(tools.values())}")
    return PlannerAction(True, tool=tools[ids[0]], sub_goal=query)


def parse_planner(text: str, finish_reason: str, tool_names: Sequence[str]) -> PlannerAction:
    """Parse one planner response (see the module docstring for the format)."""
    if finish_reason != "stop":
        return PlannerAction(False, error="no end-of-turn token before the token limit")
    lines = text.strip().split("\n")
    first = lines[0].rstrip()
    if not first.startswith("Tool:"):
        return PlannerAction(False, error=f"expected 'Tool: <name>' on the first line, got {first[:60]!r}")
    tool = first[len("Tool:") :].strip()
    if not tool or len(tool.split()) != 1:
        return PlannerAction(False, error=f"expected exactly one tool name after 'Tool:', got {tool[:60]!r}")
    if tool not in tool_names:
        return PlannerAction(False, error=f"unknown tool {tool[:40]!r}; choose one of {', '.join(tool_names)}")
    if len(lines) < 2 or not lines[1].startswith("Sub-goal:"):
        return PlannerAction(False, tool=tool, error="expected 'Sub-goal: <text>' on the second line")
    sub_goal = "\n".join([lines[1][len("Sub-goal:") :], *lines[2:]]).strip()
    if not sub_goal:
        return PlannerAction(False, tool=tool, error="empty sub-goal")
    return PlannerAction(True, tool=tool, sub_goal=sub_goal)


_VERDICT = re.compile(r"\b(STOP|CONTINUE)\b", re.I)


def parse_verdict(text: str) -> str:
    """STOP or CONTINUE from a verifier reply; anything unclear is CONTINUE."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        first = re.sub(r"^(verdict|answer|decision)\s*:\s*", "", lines[0], flags=re.I).strip(" .!*`'\"").upper()
        if first in ("STOP", "CONTINUE"):
            return first
    found = {w.upper() for w in _VERDICT.findall(text)}
    return found.pop() if len(found) == 1 else "CONTINUE"


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def parse_answer(text: str) -> str | None:
    """The text of the last `<answer>...</answer>` (or of an unterminated final `<answer>`), else None."""
    spans = _ANSWER.findall(text)
    if spans:
        ans = spans[-1].strip()
    elif "<answer>" in text:
        ans = text.rsplit("<answer>", 1)[1].strip()
    else:
        return None
    return ans or None


def parse_command(text: str) -> str | None:
    """The executor's command: everything after the first `Command:`, code fences removed."""
    idx = text.find("Command:")
    if idx < 0:
        return None
    cmd = text[idx + len("Command:") :].strip()
    fence = re.fullmatch(r"```[a-zA-Z]*\n?(.*?)\n?```", cmd, re.S)
    if fence:
        cmd = fence.group(1).strip("\n")
    return cmd or None


class Caller:
    """Makes the engine calls of one phase and counts them (calls, prompts, tokens)."""

    def __init__(self, engine: LanguageModel, phase: str, counters: dict[str, float]) -> None:
        self.engine = engine
        self.phase = phase
        self.counters = counters
        self.stop = stop_ids(engine.tokenizer)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def sampling(
        self, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None, **kw: Any
    ) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=self.stop, seed=seed, **kw
        )

    def generate(
        self, prompts: list[list[int]], sampling: SamplingConfig, seeds: Sequence[int | None] | None = None
    ) -> list[Generation]:
        """One batched call. With `seeds` (one per prompt) and a streaming model, every prompt is its own
        request with its own seed (so its sample does not depend on the batch); otherwise one
        `generate` call whose prompts share `sampling.seed`."""
        if seeds is not None and isinstance(self.engine, StreamingLanguageModel):
            gens = generate_each(self.engine, prompts, [dataclasses.replace(sampling, seed=s) for s in seeds])
        else:
            gens = self.engine.generate(prompts, sampling)
        if len(gens) != len(prompts):
            raise RuntimeError(f"engine returned {len(gens)} generations for {len(prompts)} prompts")
        self.count(prompts, gens, calls=1)
        return gens

    def count(self, prompts: Sequence[Sequence[int]], gens: Sequence[Generation], calls: int) -> None:
        c, p = self.counters, self.phase
        c[f"{p}_calls"] = c.get(f"{p}_calls", 0) + calls
        c[f"{p}_prompts"] = c.get(f"{p}_prompts", 0) + len(prompts)
        c[f"{p}_prompt_tokens"] = c.get(f"{p}_prompt_tokens", 0) + sum(map(len, prompts))
        c[f"{p}_response_tokens"] = c.get(f"{p}_response_tokens", 0) + sum(len(g.token_ids) for g in gens)

    def fit(
        self, build: Callable[[int], Messages], num_steps: int, budget: int, max_new_tokens: int
    ) -> list[int] | None:
        """Prompt ids of `build(skip)` for the smallest `skip` whose prompt + response fit `budget`."""
        for skip in range(num_steps + 1):
            ids = chat_ids(self.tokenizer, build(skip))
            if len(ids) + max_new_tokens <= budget:
                return ids
        return None


def tool_menu(tools: Sequence[Tool]) -> str:
    return "\n".join(f"- {t.name}: {t.description}" for t in tools)


PLANNER_SYSTEM = (
    "You are the planner. Choose the next step for answering the query.\n"
    "Tools:\n{tools}\n"
    "Reply with exactly two lines:\nTool: <tool name>\nSub-goal: <what this step should find or compute>"
)


PLANNER_TOOL_TOKEN_SYSTEM = (
    "You are the planner. Choose the tool that answers the query.\nTools:\n{tools}\nReply with the tool name only."
)


class TextFormat:
    """`Tool: NAME` / `Sub-goal: ...` lines, sampled over the whole vocabulary."""

    system = PLANNER_SYSTEM

    def __init__(self, tokenizer: Any, tool_names: Sequence[str], stop: Sequence[int]) -> None:
        self.tool_names = list(tool_names)
        self.tool_tokens: dict[int, str] = {}
        self.allowed_token_ids: tuple[int, ...] | None = None

    def parse(self, generation: Generation, memory: Memory) -> PlannerAction:
        return parse_planner(generation.text, generation.finish_reason, self.tool_names)


class ToolTokenFormat:
    """One tool token, sampled under constrained decoding over the tool tokens and end-of-turn ids."""

    system = PLANNER_TOOL_TOKEN_SYSTEM

    def __init__(self, tokenizer: Any, tool_names: Sequence[str], stop: Sequence[int]) -> None:
        self.tool_tokens = tool_token_ids(tokenizer, tool_names)
        self.stop = tuple(stop)
        self.allowed_token_ids = (*self.tool_tokens, *(t for t in self.stop if t not in self.tool_tokens))

    def parse(self, generation: Generation, memory: Memory) -> PlannerAction:
        return parse_tool_token(generation.token_ids, self.tool_tokens, self.stop, memory.query)


PLANNER_FORMATS: dict[str, type[TextFormat] | type[ToolTokenFormat]] = {
    "text": TextFormat,
    "tool_token": ToolTokenFormat,
}


class Planner:
    """The trained policy. `prompt_ids` renders memory with the chat template; no truncation (a
    prompt over the context budget ends the trajectory instead, see the runner). The output format
    is chosen once here (`PLANNER_FORMATS`); `allowed_token_ids` is its constrained-decoding action
    set (None: the whole vocabulary)."""

    def __init__(self, caller: Caller, tools: Sequence[Tool], planner_format: str = "text") -> None:
        if planner_format not in PLANNER_FORMATS:
            raise ValueError(f"planner_format must be one of {tuple(PLANNER_FORMATS)}, got {planner_format!r}")
        self.caller = caller
        self.tools = list(tools)
        self.format = PLANNER_FORMATS[planner_format](caller.tokenizer, self.tool_names, caller.stop)
        self.system = self.format.system.format(tools=tool_menu(self.tools))

    @property
    def tool_names(self) -> list[str]:
        return [t.name for t in self.tools]

    @property
    def tool_tokens(self) -> dict[int, str]:
        return self.format.tool_tokens

    @property
    def allowed_token_ids(self) -> tuple[int, ...] | None:
        return self.format.allowed_token_ids

    def parse(self, generation: Generation, memory: Memory) -> PlannerAction:
        return self.format.parse(generation, memory)

    def messages(self, memory: Memory) -> Messages:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": memory.render()}]

    def prompt_ids(self, memory: Memory) -> list[int]:
        return chat_ids(self.caller.tokenizer, self.messages(memory))


class LLMRole:
    """One frozen LLM-backed role: fit each prompt into the budget (dropping the oldest memory
    steps first), one batched greedy call, the replies in item order (None: did not fit)."""

    system = ""

    def __init__(self, caller: Caller, budget: int, max_new_tokens: int) -> None:
        self.caller, self.budget, self.max_new_tokens = caller, budget, max_new_tokens

    def prompt(self, user: Callable[[int], str], num_steps: int) -> list[int] | None:
        """Prompt ids for one item (`user(skip)`: the user text with `skip` oldest memory steps left out)."""

        def build(skip: int) -> Messages:
            return [{"role": "system", "content": self.system}, {"role": "user", "content": user(skip)}]

        return self.caller.fit(build, num_steps, self.budget, self.max_new_tokens)

    def ask(
        self,
        users: Sequence[tuple[Callable[[int], str], int]],
        seed: int | None,
        seeds: Sequence[int | None] | None = None,
    ) -> list[str | None]:
        """`users`: (user text given how many memory steps to skip, number of memory steps) per item;
        `seeds`: one per item for per-request seeding (see `Caller.generate`)."""
        replies: list[str | None] = [None] * len(users)
        todo, prompts = [], []
        for i, (user, num_steps) in enumerate(users):
            ids = self.prompt(user, num_steps)
            if ids is not None:
                todo.append(i)
                prompts.append(ids)
        if prompts:
            sampling = self.caller.sampling(self.max_new_tokens, seed=seed)
            gens = self.caller.generate(prompts, sampling, None if seeds is None else [seeds[i] for i in todo])
            for i, g in zip(todo, gens):
                replies[i] = g.text
        return replies


EXECUTOR_SYSTEM = (
    "You are the executor. Write the one command that carries out the sub-goal with the given tool.\n"
    "Reply as:\nCommand: <command>"
)


class LLMExecutor(LLMRole):
    system = EXECUTOR_SYSTEM

    @staticmethod
    def user(mem: Memory, tool: Tool, sub_goal: str) -> tuple[Callable[[int], str], int]:
        text = lambda skip: (
            f"{mem.render(skip)}\n\nTool: {tool.name} ({tool.description})\n"
            f"Command format: {tool.command_format}\nSub-goal: {sub_goal}"
        )
        return text, len(mem.steps)

    @staticmethod
    def parse(text: str | None) -> tuple[str, str]:
        """(command, error) from one reply (None: the prompt did not fit)."""
        if text is None:
            return "", "executor prompt does not fit the context budget"
        cmd = parse_command(text)
        if cmd is None:
            return "", "no 'Command: ...' line in the executor's output"
        return cmd, ""

    def commands(
        self, items: Sequence[tuple[Memory, Tool, str]], seed: int | None, seeds: Sequence[int | None] | None = None
    ) -> list[tuple[str, str]]:
        """(command, error) per (memory, tool, sub_goal); error is "" when a command was produced."""
        return [self.parse(t) for t in self.ask([self.user(m, t, g) for m, t, g in items], seed, seeds)]


class RuleExecutor:
    def commands(
        self, items: Sequence[tuple[Memory, Tool, str]], seed: int | None, seeds: Sequence[int | None] | None = None
    ) -> list[tuple[str, str]]:
        out = []
        for mem, tool, sub_goal in items:
            cmd = tool.command_from(sub_goal, mem.query)
            out.append((cmd, "") if cmd.strip() else ("", "the rule executor found no command in the sub-goal"))
        return out


VERIFIER_SYSTEM = (
    "You are the verifier. Decide whether the memory already contains the answer to the query.\n"
    "Reply with one word: STOP if it does, CONTINUE if more steps are needed."
)


class LLMVerifier(LLMRole):
    system = VERIFIER_SYSTEM

    @staticmethod
    def parse(text: str | None) -> str:
        return "CONTINUE" if text is None else parse_verdict(text)

    def decide(
        self, memories: Sequence[Memory], seed: int | None, seeds: Sequence[int | None] | None = None
    ) -> list[str]:
        return [self.parse(t) for t in self.ask([(m.render, len(m.steps)) for m in memories], seed, seeds)]


class RuleVerifier:
    def decide(
        self, memories: Sequence[Memory], seed: int | None, seeds: Sequence[int | None] | None = None
    ) -> list[str]:
        return ["STOP" if m.steps and m.steps[-1].valid and m.steps[-1].ok else "CONTINUE" for m in memories]


GENERATOR_SYSTEM = (
    "You are the generator. Using the memory, write the final answer to the query "
    "inside <answer></answer> tags, for example <answer>42</answer>."
)


class LLMGenerator(LLMRole):
    system = GENERATOR_SYSTEM

    @staticmethod
    def parse(text: str | None) -> tuple[str, str | None]:
        """(raw output, parsed answer) of one reply."""
        return ("", None) if text is None else (text, parse_answer(text))

    def answers(
        self, memories: Sequence[Memory], seed: int | None, seeds: Sequence[int | None] | None = None
    ) -> list[tuple[str, str | None]]:
        """(raw output, parsed answer) per memory."""
        return [self.parse(t) for t in self.ask([(m.render, len(m.steps)) for m in memories], seed, seeds)]


class RuleGenerator:
    def answers(
        self, memories: Sequence[Memory], seed: int | None, seeds: Sequence[int | None] | None = None
    ) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        for m in memories:
            last = next((s for s in reversed(m.steps) if s.valid and s.ok), None)
            lines = [ln.strip() for ln in last.result.splitlines() if ln.strip()] if last else []
            if lines:
                out.append((f"<answer>{lines[-1]}</answer>", lines[-1]))
            else:
                out.append(("", None))
        return out


def _rule(cls: type) -> Callable[..., Any]:
    return lambda caller, budget, max_new_tokens: cls()


# Each role's modes, chosen once when the runner is built: mode -> factory(caller, budget, max_new_tokens).
EXECUTORS: dict[str, Callable[..., Any]] = {"llm": LLMExecutor, "rule": _rule(RuleExecutor)}
VERIFIERS: dict[str, Callable[..., Any]] = {"llm": LLMVerifier, "rule": _rule(RuleVerifier)}
GENERATORS: dict[str, Callable[..., Any]] = {"llm": LLMGenerator, "rule": _rule(RuleGenerator)}
