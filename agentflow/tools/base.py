"""What every tool is: a name the planner writes, a one-line description it reads, a command format
the executor follows, a rule that derives a command from a sub-goal without an LLM, and `run`.

Tools never raise into the loop: `run_tool_calls` turns exceptions and time-outs into error text,
and runs the calls of all live trajectories at once (local tools on a thread pool, engine-backed
tools as one batched engine call each).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolResult:
    """`ok=False` marks an error; `text` is what goes into memory (before truncation)."""

    ok: bool
    text: str


def error(message: str) -> ToolResult:
    return ToolResult(False, f"error: {message}")


class Tool:
    """Base class. Subclasses set the three strings and implement `run` (or `run_batch`)."""

    name: str = ""
    description: str = ""
    command_format: str = ""

    def command_from(self, sub_goal: str, query: str) -> str:
        """The rule-based executor: the command this tool would run for `sub_goal` (no LLM)."""
        return sub_goal.strip()

    def run(self, command: str) -> ToolResult:
        raise NotImplementedError

    def run_batch(self, commands: Sequence[str], pool: cf.Executor, timeout_s: float) -> list[ToolResult]:
        """Run many commands; the default runs `run` on the pool, each bounded by `timeout_s`."""
        futures = [pool.submit(_safe_run, self, c) for c in commands]
        out = []
        for f in futures:
            try:
                out.append(f.result(timeout=timeout_s))
            except cf.TimeoutError:
                out.append(error(f"{self.name} timed out after {timeout_s:g} s"))
        return out


def _safe_run(tool: Tool, command: str) -> ToolResult:
    try:
        return tool.run(command)
    except Exception as e:  # a tool failure is an observation for the planner, not a crash
        return error(f"{tool.name} failed: {type(e).__name__}: {e}")


def run_tool_calls(calls: Sequence[tuple[Tool, str]], pool: cf.Executor, timeout_s: float) -> list[ToolResult]:
    """Run (tool, command) pairs of many trajectories together; results in call order.

    Calls are grouped by tool; each tool's group is one `run_batch` (engine-backed tools make one
    engine call for the whole group). Groups of pool-backed tools run concurrently with each other.
    """
    groups: dict[str, list[int]] = {}
    tools: dict[str, Tool] = {}
    for i, (tool, _) in enumerate(calls):
        groups.setdefault(tool.name, []).append(i)
        tools[tool.name] = tool
    results: list[ToolResult | None] = [None] * len(calls)
    # Each group's run_batch runs in its own thread so slow groups overlap; run_batch itself fans
    # out onto `pool`, so these coordinators use a separate small executor to avoid starving it.
    with cf.ThreadPoolExecutor(max_workers=max(1, len(groups))) as coord:
        futures = {
            name: coord.submit(_safe_batch, tools[name], [calls[i][1] for i in idx], pool, timeout_s)
            for name, idx in groups.items()
        }
        for name, idx in groups.items():
            for i, r in zip(idx, futures[name].result()):
                results[i] = r
    return [r if r is not None else error("no result") for r in results]


def _safe_batch(tool: Tool, commands: list[str], pool: cf.Executor, timeout_s: float) -> list[ToolResult]:
    try:
        out = tool.run_batch(commands, pool, timeout_s)
    except Exception as e:
        return [error(f"{tool.name} failed: {type(e).__name__}: {e}")] * len(commands)
    if len(out) != len(commands):
        return [error(f"{tool.name} returned {len(out)} results for {len(commands)} commands")] * len(commands)
    return list(out)


def truncate(text: str, max_chars: int) -> str:
    """Keep the first `max_chars` characters and say how many were dropped."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"... [truncated {len(text) - max_chars} chars]"
