"""The four agents: prompts, output formats and parsers, LLM-backed and rule-based variants.

Every agent works on a batch (the live trajectories of one loop step) and makes at most one
`generate` call per batch. Only the planner is trained; its output format is deliberately short:

    Tool: <tool name>
    Sub-goal: <what this step should achieve; may continue on further lines>

A planner response is a valid action iff it ended with a stop token (not cut at max_new_tokens)
and, after stripping surrounding whitespace, its first line is `Tool: NAME` with NAME exactly one
of the offered tool names and its second line starts `Sub-goal:` followed by non-empty text.
Anything else is an invalid action: recorded as a turn with the reason, never an exception.

A third planner format, "agentflow", is AgentFlow's (arXiv 2510.05592; `AgentFlowFormat`), so
that AgentFlow's released planner sees the prompt structure it was trained on and a planner trained
here can be used there. Before the first turn the helper writes a query analysis (one batched call
per step for the distinct queries: the helper decodes greedily, so the G trajectories of a query
would get the same text). The planner's prompt is one user message with the query, that analysis,
the tool names, the tool metadata and the previous steps as AgentFlow's memory
(`{'Action Step k': {'tool_name', 'sub_goal', 'command', 'result'}}`); its reply is free text
that ends with `Context:`, `Sub-Goal:` and `Tool Name:` sections after a `Justification:`. Parsed
tolerantly as AgentFlow does: a JSON object with those keys is accepted, `**` markup is dropped,
labels match case-insensitively, the last complete block wins, the response need not end with a
stop token, and the tool name is normalised (case, spaces/underscores/hyphens, a trailing `_Tool`,
AgentFlow's tool names such as `Python_Coder_Tool` or `Wikipedia_Search_Tool`). The executor gets
the sub-goal with the context.

A second planner format, "tool_token" (`AgentConfig.planner_format`), is for training a small
planner from scratch (the `toy` preset): every tool name is one token of the tokenizer, the planner
is sampled under constrained decoding over the tool tokens and the end-of-turn token(s)
(`Planner.allowed_token_ids`), and its response is parsed strictly: valid iff it is exactly one
tool token, optionally followed by one end-of-turn token. The planner writes no sub-goal: the
sub-goal is the query itself, from which the (rule) executor derives the tool's command.
"tool_prefix" is the same action for a pretrained tokenizer whose tool names span several tokens
(SmolLM2 splits "calculator" into "calcul" + "ator"): each tool name's first token stands for the
tool (the token the model emits first when it writes that name), so the first tokens must be
distinct; the constrained decoding, the one-token response and its strict parsing are unchanged.

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
import json
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
    context: str = ""  # AgentFlow's Context section (planner_format "agentflow"), "" otherwise

    @property
    def task(self) -> str:
        """What the executor is asked to do: the sub-goal, with the planner's context when it gave one."""
        return f"{self.sub_goal}\nContext: {self.context}" if self.context else self.sub_goal


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


def tool_prefix_ids(tokenizer: Any, tool_names: Sequence[str]) -> dict[int, str]:
    """{first token id of the name: tool name}; an error when two names start with the same token."""
    out: dict[int, str] = {}
    for name in tool_names:
        ids = tokenizer.encode(name, add_special_tokens=False)
        if not ids or tokenizer.decode(ids) != name:
            raise ValueError(f"tool name {name!r} does not round-trip through the tokenizer (ids {ids[:8]})")
        first = int(ids[0])
        if first in out:
            raise ValueError(
                f"planner_format='tool_prefix' needs tool names with distinct first tokens, but {out[first]!r} and "
                f"{name!r} both start with token {first}; use planner_format='text'"
            )
        out[first] = name
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


def _canonical(name: str) -> str:
    return "_".join(p.lower() for p in re.split(r"[\s_\-]+", name.strip().strip("`*'\".:")) if p)


# AgentFlow's tool names (canonical, without the `_tool` suffix) -> ours
AGENTFLOW_TOOL_ALIASES = {
    "python_coder": "python",
    "google_search": "search",
    "wikipedia_search": "search",
    "web_search": "search",
    "base_generator": "base_generator",
    "generalist_solution_generator": "base_generator",
}


def normalize_tool_name(name: str, tool_names: Sequence[str]) -> str | None:
    """The offered tool `name` means (case, separators, a trailing `_Tool` and AgentFlow's names ignored), or None."""
    c = _canonical(name)
    for stem in (c, c.removesuffix("_tool")):
        for t in tool_names:
            if _canonical(t) == stem:
                return t
    alias = AGENTFLOW_TOOL_ALIASES.get(c.removesuffix("_tool"))
    return alias if alias in tool_names else None


_NEXT_STEP = re.compile(r"context\s*:\s*(.*?)sub[\s_-]*goal\s*:\s*(.*?)tool[\s_-]*name\s*:\s*([^\n]*)", re.I | re.S)


def parse_agentflow_step(text: str, tool_names: Sequence[str]) -> PlannerAction:
    """Parse AgentFlow's next-step output (see the module docstring); never raises."""
    fields: tuple[str, str, str] | None = None
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            d = json.loads(stripped)
            fields = (str(d["context"]), str(d["sub_goal"]), str(d["tool_name"]))
        except (ValueError, KeyError, TypeError):
            fields = None
    if fields is None:
        matches = _NEXT_STEP.findall(text.replace("**", ""))
        if not matches:
            return PlannerAction(False, error="no 'Context: ... Sub-Goal: ... Tool Name: ...' block in the output")
        fields = matches[-1]
    context, sub_goal, raw_tool = (f.strip().strip("`").strip() for f in fields)
    tool = normalize_tool_name(raw_tool, tool_names)
    if tool is None:
        return PlannerAction(
            False,
            tool=raw_tool[:40],
            sub_goal=sub_goal,
            error=f"unknown tool {raw_tool[:40]!r}; choose one of {', '.join(tool_names)}",
        )
    if not sub_goal:
        return PlannerAction(False, tool=tool, error="empty sub-goal")
    return PlannerAction(True, tool=tool, sub_goal=sub_goal, context=context)


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
    needs_analysis = False

    def __init__(self, tokenizer: Any, tool_names: Sequence[str], stop: Sequence[int]) -> None:
        self.tool_names = list(tool_names)
        self.tool_tokens: dict[int, str] = {}
        self.allowed_token_ids: tuple[int, ...] | None = None

    def parse(self, generation: Generation, memory: Memory) -> PlannerAction:
        return parse_planner(generation.text, generation.finish_reason, self.tool_names)


class ToolTokenFormat:
    """One tool token, sampled under constrained decoding over the tool tokens and end-of-turn ids."""

    system = PLANNER_TOOL_TOKEN_SYSTEM
    needs_analysis = False

    def __init__(self, tokenizer: Any, tool_names: Sequence[str], stop: Sequence[int]) -> None:
        self.tool_tokens = tool_token_ids(tokenizer, tool_names)
        self.stop = tuple(stop)
        self.allowed_token_ids = (*self.tool_tokens, *(t for t in self.stop if t not in self.tool_tokens))

    def parse(self, generation: Generation, memory: Memory) -> PlannerAction:
        return parse_tool_token(generation.token_ids, self.tool_tokens, self.stop, memory.query)


class ToolPrefixFormat(ToolTokenFormat):
    """One token standing for a tool (its name's first token), sampled like `ToolTokenFormat`'s."""

    def __init__(self, tokenizer: Any, tool_names: Sequence[str], stop: Sequence[int]) -> None:
        self.tool_tokens = tool_prefix_ids(tokenizer, tool_names)
        self.stop = tuple(stop)
        self.allowed_token_ids = (*self.tool_tokens, *(t for t in self.stop if t not in self.tool_tokens))


AGENTFLOW_SYSTEM = "You are the planner of a tool-using agent; you plan one tool call at a time."
ANALYSIS_SYSTEM = "You are the query analyst of a tool-using agent."

AGENTFLOW_NEXT_STEP = """Task: Decide the best next step for answering the query with the available tools, given the steps taken so far.

Context:
- **Query:** {query}
- **Query Analysis:** {analysis}
- **Available Tools:** {tools}
- **Toolbox Metadata:** {metadata}
- **Previous Steps:** {actions}

Instructions:
1. Read the query, its analysis, the previous steps and the tools.
2. Pick the **single tool** that best advances the answer now.
3. Give that tool a concrete, achievable **sub-goal**.
4. Put every piece of information the tool needs (numbers, names, earlier results) into the **context**.

Response Format:
1.  **Justification:** Why this tool and this sub-goal.
2.  **Context:** Everything the tool needs.
3.  **Sub-Goal:** The tool's specific objective.
4.  **Tool Name:** The exact name of one available tool.

Rules:
- Choose exactly ONE tool.
- The tool must be able to achieve the sub-goal on its own.
- End with the Context, Sub-Goal and Tool Name sections, in that order, and nothing after them."""


def tool_metadata(tools: Sequence[Tool]) -> dict[str, dict[str, str]]:
    return {t.name: {"tool_description": t.description, "input_format": t.command_format} for t in tools}


class AgentFlowFormat:
    """AgentFlow's planner prompt and next-step output (module docstring), over the whole vocabulary."""

    system = AGENTFLOW_SYSTEM
    needs_analysis = True

    def __init__(self, tokenizer: Any, tool_names: Sequence[str], stop: Sequence[int]) -> None:
        self.tool_names = list(tool_names)
        self.tool_tokens: dict[int, str] = {}
        self.allowed_token_ids: tuple[int, ...] | None = None

    def messages(self, system: str, memory: Memory, tools: Sequence[Tool]) -> Messages:
        user = AGENTFLOW_NEXT_STEP.format(
            query=memory.query,
            analysis=memory.analysis,
            tools=[t.name for t in tools],
            metadata=tool_metadata(tools),
            actions=memory.actions(),
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def parse(self, generation: Generation, memory: Memory) -> PlannerAction:
        return parse_agentflow_step(generation.text, self.tool_names)


PLANNER_FORMATS: dict[str, type[TextFormat] | type[ToolTokenFormat] | type[AgentFlowFormat]] = {
    "text": TextFormat,
    "tool_token": ToolTokenFormat,
    "tool_prefix": ToolPrefixFormat,
    "agentflow": AgentFlowFormat,
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

    @property
    def needs_analysis(self) -> bool:
        return self.format.needs_analysis

    def messages(self, memory: Memory) -> Messages:
        if isinstance(self.format, AgentFlowFormat):
            return self.format.messages(self.system, memory, self.tools)
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


ANALYSIS_PROMPT = """Task: Analyse the query to find the skills and tools it needs.

Inputs:
- Query: {query}
- Available tools: {tools}
- Metadata for tools: {metadata}

Instructions:
1. State the main objective of the query.
2. List the skills and the tools needed.
3. Say for each skill and tool how it helps answer the query.
4. Note anything else to watch out for.

Keep it brief and precise."""


class QueryAnalyzer(LLMRole):
    """AgentFlow's query analysis on the helper model: one batched greedy call for the distinct queries."""

    system = ANALYSIS_SYSTEM

    def __init__(self, caller: Caller, budget: int, max_new_tokens: int, tools: Sequence[Tool]) -> None:
        super().__init__(caller, budget, max_new_tokens)
        self.tools = list(tools)

    def analyze(self, queries: Sequence[str], seed: int | None) -> dict[str, str]:
        """{query: analysis} for the distinct queries ("" where the prompt does not fit the budget)."""
        distinct = list(dict.fromkeys(queries))
        names, meta = [t.name for t in self.tools], tool_metadata(self.tools)

        def user(q: str) -> Callable[[int], str]:
            return lambda skip: ANALYSIS_PROMPT.format(query=q, tools=names, metadata=meta)

        replies = self.ask([(user(q), 0) for q in distinct], seed)
        return {q: (r or "").strip() for q, r in zip(distinct, replies)}


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
