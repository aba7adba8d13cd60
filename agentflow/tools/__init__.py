"""Tools the planner can choose: calculator, python (sandboxed), search (BM25 corpus), base_generator."""

from __future__ import annotations

from agentflow.tools.base import Tool, ToolResult, run_tool_calls, truncate
from agentflow.tools.base_generator import BaseGenerator
from agentflow.tools.calculator import Calculator
from agentflow.tools.python_sandbox import PythonTool, SandboxLimits, run_python
from agentflow.tools.search import BM25, Search

TOOL_NAMES = ("calculator", "python", "search", "base_generator")

__all__ = [
    "BM25",
    "TOOL_NAMES",
    "BaseGenerator",
    "Calculator",
    "PythonTool",
    "SandboxLimits",
    "Search",
    "Tool",
    "ToolResult",
    "run_python",
    "run_tool_calls",
    "truncate",
]
