"""Agent output formats, memory rendering and trajectory serialisation."""

from __future__ import annotations

import json

import pytest

from agentflow.agents import parse_answer, parse_command, parse_planner, parse_verdict
from agentflow.memory import Memory, Step
from agentflow.trajectory import Trajectory, Turn

TOOLS = ("calculator", "python", "search", "base_generator")


def test_planner_valid_action():
    a = parse_planner("Tool: calculator\nSub-goal: compute 3 * (4 + 5)", "stop", TOOLS)
    assert a.valid and a.tool == "calculator" and a.sub_goal == "compute 3 * (4 + 5)" and a.error == ""
    a = parse_planner("  Tool:search\nSub-goal:  who founded Rix Bank  \n", "stop", TOOLS)
    assert a.valid and a.tool == "search" and a.sub_goal == "who founded Rix Bank"


def test_planner_multiline_sub_goal_keeps_code():
    a = parse_planner("Tool: python\nSub-goal: run\n```\nprint(1)\n```", "stop", TOOLS)
    assert a.valid and a.sub_goal == "run\n```\nprint(1)\n```"


@pytest.mark.parametrize(
    ("text", "finish", "reason"),
    [
        ("Tool: calculator\nSub-goal: 1+1", "length", "token limit"),
        ("", "stop", "first line"),
        ("calculator\nSub-goal: x", "stop", "first line"),
        ("Tool: abacus\nSub-goal: x", "stop", "unknown tool 'abacus'"),
        ("Tool: Calculator\nSub-goal: x", "stop", "unknown tool"),  # names are exact
        ("Tool: calculator now\nSub-goal: x", "stop", "exactly one tool name"),
        ("Tool:\nSub-goal: x", "stop", "exactly one tool name"),
        ("Tool: calculator", "stop", "second line"),
        ("Tool: calculator\nGoal: x", "stop", "second line"),
        ("Tool: calculator\nSub-goal:   ", "stop", "empty sub-goal"),
        ("\x00\x01 garbage ~~", "stop", "first line"),
    ],
)
def test_planner_invalid_actions_are_reported_not_raised(text, finish, reason):
    a = parse_planner(text, finish, TOOLS)
    assert not a.valid
    assert reason in a.error


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("STOP", "STOP"),
        ("stop.", "STOP"),
        ("Verdict: CONTINUE", "CONTINUE"),
        ("**STOP**\nbecause step 2 answered it", "STOP"),
        ("The memory answers the query, so STOP", "STOP"),
        ("I would CONTINUE searching", "CONTINUE"),
        ("STOP or CONTINUE? hard to say", "CONTINUE"),  # both words, first line not a verdict
        ("", "CONTINUE"),
        ("garbage \x00", "CONTINUE"),
        ("stopping", "CONTINUE"),  # a word boundary is required
    ],
)
def test_verdict_parsing_is_robust(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<answer>42</answer>", "42"),
        ("The result is <answer> Paris </answer>.", "Paris"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("cut off <answer>17", "17"),
        ("no tags 42", None),
        ("<answer></answer>", None),
    ],
)
def test_answer_parsing(text, answer):
    assert parse_answer(text) == answer


def test_command_parsing():
    assert parse_command("Command: 3 * 4") == "3 * 4"
    assert parse_command("Sure.\nCommand: ```python\nprint(1)\n```") == "print(1)"
    assert parse_command("Command:\nx = 1\nprint(x)") == "x = 1\nprint(x)"
    assert parse_command("just 3*4") is None
    assert parse_command("Command:   ") is None


def _memory() -> Memory:
    m = Memory(query="What is 2 + 3?")
    m.steps.append(Step(True, "add the numbers", "calculator", "2 + 3", "5", True, "CONTINUE"))
    m.steps.append(Step(False, error="unknown tool 'abacus'", verdict="CONTINUE"))
    m.steps.append(Step(True, "check", "python", "print(2+3)", "error: boom", False, None))
    return m


def test_memory_render_is_deterministic_and_complete():
    m = _memory()
    expected = "\n".join(
        [
            "Query: What is 2 + 3?",
            "Step 1:",
            "Sub-goal: add the numbers",
            "Tool: calculator",
            "Command: 2 + 3",
            "Result: 5",
            "Verdict: CONTINUE",
            "Step 2:",
            "Invalid planner output: unknown tool 'abacus'",
            "Verdict: CONTINUE",
            "Step 3:",
            "Sub-goal: check",
            "Tool: python",
            "Command: print(2+3)",
            "Result: error: boom",
        ]
    )
    assert m.render() == expected
    assert Memory.from_dict(json.loads(json.dumps(m.to_dict()))).render() == expected


def test_memory_render_skip_omits_oldest_steps_with_a_note():
    text = _memory().render(skip=2)
    assert text.startswith("Query: What is 2 + 3?\n(2 earlier steps omitted)\nStep 3:")
    assert "Step 1:" not in text and "abacus" not in text


def test_trajectory_json_roundtrip():
    tr = Trajectory(
        query_id="q1", group_index=2, query="What?", gold="5", answer="5", reward=1.0, stop_reason="verifier"
    )
    tr.turns.append(Turn([1, 2, 3], [4, 5], [-0.5, -0.25], True, "calculator", "add", "2+3", "5"))
    tr.memory = _memory()
    d = json.loads(json.dumps(tr.to_dict()))
    assert set(d) == {
        "query_id",
        "group_index",
        "query",
        "gold",
        "answer",
        "reward",
        "stop_reason",
        "turns",
        "memory",
        "source",
    }
    assert set(d["turns"][0]) == {
        "prompt_ids", "response_ids", "response_logprobs", "valid", "tool", "sub_goal", "command", "tool_result",
    }  # fmt: skip
    back = Trajectory.from_dict(d)
    assert back == tr


def test_turn_rejects_mismatched_logprobs():
    with pytest.raises(ValueError, match="2 response ids but 1 log-probs"):
        Turn([1], [2, 3], [-0.1], True)
