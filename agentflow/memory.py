"""The evolving memory: an explicit, serialisable record of one trajectory, rendered deterministically.

Per step it keeps what the planner chose (sub-goal, tool) or why its output was invalid, the
executor's command, the tool result (already truncated to the loop's budget), whether the tool
succeeded, and the verifier's verdict. `render` is a pure function of the record; `render(skip=k)`
omits the k oldest steps (with a note) so prompts of the non-trained agents fit a token budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Step:
    valid: bool
    sub_goal: str = ""
    tool: str = ""
    command: str = ""
    result: str = ""
    ok: bool = False
    verdict: str | None = None  # "STOP" / "CONTINUE"; None when the verifier was not asked
    error: str = ""  # why the planner output was invalid


@dataclass
class Memory:
    query: str
    steps: list[Step] = field(default_factory=list)
    final_output: str | None = None  # the generator's raw text
    analysis: str = ""  # the helper's query analysis (planner_format "agentflow"), "" when none was made

    def render(self, skip: int = 0) -> str:
        """`Query: ...` then one block per step; the first `skip` steps are replaced by a note."""
        lines = [f"Query: {self.query}"]
        if skip:
            lines.append(f"({skip} earlier step{'s' if skip > 1 else ''} omitted)")
        for n, s in enumerate(self.steps[skip:], skip + 1):
            lines.append(f"Step {n}:")
            if not s.valid:
                lines.append(f"Invalid planner output: {s.error}")
            else:
                lines += [f"Sub-goal: {s.sub_goal}", f"Tool: {s.tool}", f"Command: {s.command}", f"Result: {s.result}"]
            if s.verdict is not None:
                lines.append(f"Verdict: {s.verdict}")
        return "\n".join(lines)

    def actions(self) -> dict[str, dict[str, str]]:
        """AgentFlow's memory: `{"Action Step k": {tool_name, sub_goal, command, result}}` in step order
        (an invalid planner output is a step whose tool_name says why, as AgentFlow records an unmatched tool)."""
        out: dict[str, dict[str, str]] = {}
        for k, s in enumerate(self.steps, 1):
            if s.valid:
                out[f"Action Step {k}"] = {
                    "tool_name": s.tool,
                    "sub_goal": s.sub_goal,
                    "command": s.command,
                    "result": s.result,
                }
            else:
                out[f"Action Step {k}"] = {
                    "tool_name": f"No matched tool given: {s.tool}" if s.tool else "No tool given",
                    "sub_goal": s.sub_goal,
                    "command": "No command was generated because the planner output was invalid.",
                    "result": f"Invalid planner output: {s.error}",
                }
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Memory:
        return cls(
            query=d["query"],
            steps=[Step(**s) for s in d.get("steps", [])],
            final_output=d.get("final_output"),
            analysis=d.get("analysis", ""),
        )
