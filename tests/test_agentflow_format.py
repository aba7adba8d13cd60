"""AgentFlow's planner format: query analysis on the helper, the next-step prompt and its tolerant parser."""

from __future__ import annotations

import ast
import re

import pytest
from agentflow_fakes import ScriptedEngine

from agentflow import AgentConfig, Memory, Query, RoleModels, run_trajectories
from agentflow.agents import normalize_tool_name, parse_agentflow_step
from agentflow.memory import Step

TOOLS = ["calculator", "python", "search", "base_generator"]


def test_next_step_parser_is_tolerant_like_agentflow():
    text = (
        "**Justification:** The sum needs arithmetic.\n\n**Context:** the numbers 2 and 3\n"
        "**Sub-Goal:** add 2 and 3\n**Tool Name:** Calculator\n"
    )
    a = parse_agentflow_step(text, TOOLS)
    assert (a.valid, a.tool, a.sub_goal, a.context) == (True, "calculator", "add 2 and 3", "the numbers 2 and 3")
    assert a.task == "add 2 and 3\nContext: the numbers 2 and 3"
    # the last complete block wins; labels in any case; a cut response still parses
    two = "Context: x\nSub-Goal: first\nTool Name: search\n\nJustification: no\ncontext: y\nsub goal: second\ntool name: python"
    assert parse_agentflow_step(two, TOOLS).sub_goal == "second" and parse_agentflow_step(two, TOOLS).tool == "python"
    js = '{"justification": "j", "context": "c", "sub_goal": "look up Paris", "tool_name": "Wikipedia_Search_Tool"}'
    assert parse_agentflow_step(js, TOOLS).tool == "search"
    bad = parse_agentflow_step("Context: c\nSub-Goal: s\nTool Name: Image_Captioner_Tool", TOOLS)
    assert not bad.valid and "unknown tool 'Image_Captioner_Tool'" in bad.error and bad.sub_goal == "s"
    assert "no 'Context: ..." in parse_agentflow_step("I will use the calculator.", TOOLS).error
    assert parse_agentflow_step("Context: c\nSub-Goal:\nTool Name: python", TOOLS).error == "empty sub-goal"


def test_tool_name_normalisation():
    assert normalize_tool_name("Base Generator", TOOLS) == "base_generator"
    assert normalize_tool_name("`BASE_generator_tool`", TOOLS) == "base_generator"
    assert normalize_tool_name("Python_Coder_Tool", TOOLS) == "python"
    assert normalize_tool_name("Google_Search_Tool", TOOLS) == "search"
    assert normalize_tool_name("Python_Coder_Tool", ["calculator"]) is None
    assert normalize_tool_name("calc", TOOLS) is None


def test_memory_renders_agentflow_action_steps():
    m = Memory("What is 2 + 3?")
    m.steps.append(Step(True, "add 2 and 3", "calculator", "2 + 3", "5", ok=True))
    m.steps.append(Step(False, "look it up", "Web_Tool", error="unknown tool"))
    acts = m.actions()
    assert list(acts) == ["Action Step 1", "Action Step 2"]
    assert acts["Action Step 1"] == {
        "tool_name": "calculator",
        "sub_goal": "add 2 and 3",
        "command": "2 + 3",
        "result": "5",
    }
    assert acts["Action Step 2"]["tool_name"] == "No matched tool given: Web_Tool"
    assert Memory.from_dict(m.to_dict()) == m


def _agentflow_solver(role: str, text: str) -> str:
    a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", text).groups())
    if role == "analysis":
        return f"Summary: add {a} and {b}. Tools: calculator."
    if role == "planner":
        return f"Justification: arithmetic.\nContext: numbers {a}, {b}\nSub-Goal: add them\nTool Name: Calculator_Tool"
    if role == "executor":
        assert f"Context: numbers {a}, {b}" in text  # the executor sees the planner's context
        return f"Command: {a} + {b}"
    if role == "verifier":
        return "STOP" if "Step 2" in text else "CONTINUE"
    if role == "generator":
        return f"<answer>{a + b}</answer>"
    raise AssertionError(role)


def test_agentflow_format_in_the_loop_with_a_separate_helper():
    policy, helper = ScriptedEngine(_agentflow_solver), ScriptedEngine(_agentflow_solver)
    queries = [Query(f"q{i}", f"What is {i} + {i + 1}?", str(2 * i + 1), judge="numeric") for i in range(2)]
    cfg = AgentConfig(planner_format="agentflow", max_turns=3, planner_max_new_tokens=2048, context_budget=8192)
    res = run_trajectories(RoleModels.helped(policy, helper), queries, 3, cfg, seed=0)
    assert {c.role for c in policy.calls} == {"planner"}  # only the planner runs on the policy
    analysis = helper.calls_of("analysis")
    assert len(analysis) == 1 and len(analysis[0].prompts) == 2  # one batched call, one per distinct query
    assert res.counters["analysis_calls"] == 1 and res.counters["executor_calls"] == 2
    second = policy.calls_of("planner")[1].texts[0]
    assert "**Query Analysis:** Summary: add 0 and 1." in second
    actions = ast.literal_eval(re.search(r"\*\*Previous Steps:\*\* (\{.*\})", second).group(1))
    assert actions == {
        "Action Step 1": {"tool_name": "calculator", "sub_goal": "add them", "command": "0 + 1", "result": "1"}
    }
    assert "Tool Name:" in second and "['calculator', 'python', 'search', 'base_generator']" in second
    for tr in res.trajectories:
        assert tr.reward == 1.0 and len(tr.turns) == 2 and all(t.valid and t.tool == "calculator" for t in tr.turns)
        assert tr.memory.analysis.startswith("Summary:")


def test_agentflow_format_budgets():
    with pytest.raises(ValueError, match="must exceed planner_max_new_tokens"):
        AgentConfig(planner_format="agentflow", planner_max_new_tokens=2048, context_budget=2048)
    AgentConfig(planner_format="agentflow", planner_max_new_tokens=2048, context_budget=18432 + 2048)
