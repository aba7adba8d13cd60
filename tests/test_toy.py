"""The toy tool-choice task, the tool-token planner format, and (slow) the toy preset's learning curve."""

from __future__ import annotations

import collections
import dataclasses

import pytest
from agentflow_fakes import ByteTokenizer

from agentflow.agents import Planner, RuleGenerator, parse_tool_token, tool_token_ids
from agentflow.memory import Memory, Step
from agentflow.tasks import load_task
from agentflow.tasks.judges import contains_match, rule_reward
from agentflow.tools import Calculator, PythonTool, Search

TOOLS = {"calculator": Calculator(), "python": PythonTool(), "search": Search(top_k=1)}


def reward_with(tool_name: str, query) -> float:
    """Run one tool for the query as the toy preset does (rule executor, rule generator, the query's judge)."""
    tool = TOOLS[tool_name]
    cmd = tool.command_from(query.question, query.question)
    result = tool.run(cmd)
    memory = Memory(query.question, [Step(True, query.question, tool_name, cmd, result.text, result.ok)])
    answer = RuleGenerator().answers([memory], None)[0][1]
    return rule_reward(answer, query)


def test_only_the_right_tool_earns_the_reward():
    queries = load_task("toy", 45, seed=11)
    outcome = collections.Counter()
    for q in queries:
        for name in TOOLS:
            outcome[(q.meta["tool"], name, reward_with(name, q))] += 1
    for kind in TOOLS:
        assert outcome[(kind, kind, 1.0)] == 15, f"the right tool must solve every {kind} query"
        for other in TOOLS:
            if other != kind:
                assert outcome[(kind, other, 0.0)] == 15, f"{other} must fail every {kind} query"


def test_kinds_are_balanced_and_seeded():
    qs = load_task("toy", 10, seed=3)
    counts = collections.Counter(q.meta["tool"] for q in qs)
    assert sorted(counts.values()) == [3, 3, 4]
    assert [q.question for q in qs] == [q.question for q in load_task("toy", 10, seed=3)]
    assert [q.question for q in qs] != [q.question for q in load_task("toy", 10, seed=4)]
    assert len({q.id for q in qs}) == 10


def test_contains_judge():
    assert contains_match("[Brakaeth] Brakaeth is a city, founded in 1432.", "1432") == 1.0
    assert contains_match("founded in 14321", "1432") == 0.0
    assert contains_match("The founder was Ana Kor, a poet.", "Ana Kor") == 1.0
    assert contains_match(None, "x") == 0.0 and contains_match("x", "") == 0.0


def test_tool_token_parsing_is_strict():
    tools = {10: "calculator", 11: "python"}
    stop = (2,)
    assert parse_tool_token([10], tools, stop, "Q") == parse_tool_token([10, 2], tools, stop, "Q")
    ok = parse_tool_token([11, 2], tools, stop, "What?")
    assert ok.valid and ok.tool == "python" and ok.sub_goal == "What?"
    for bad, why in (
        ([2], "without naming a tool"),
        ([10, 11], "exactly one tool token"),
        ([5], "not a tool"),
        ([10, 10, 2], "exactly one tool token"),
        ([], "without naming a tool"),
    ):
        action = parse_tool_token(bad, tools, stop, "Q")
        assert not action.valid and why in action.error


def test_tool_token_format_needs_single_token_names(tiny_model_dir):
    with pytest.raises(ValueError, match=r"single token.*extra_tokens"):
        tool_token_ids(ByteTokenizer(), ["calculator"])
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="single token"):
        tool_token_ids(AutoTokenizer.from_pretrained(tiny_model_dir), ["calculator"])


def test_planner_action_set_on_a_toy_model(tmp_path):
    from agentflow_fakes import ScriptedEngine
    from transformers import AutoTokenizer

    from agentflow.agents import Caller
    from engine.presets import TOY_TOOLS
    from engine.tiny import TinyConfig, make_tiny

    make_tiny(tmp_path, TinyConfig(extra_tokens=TOY_TOOLS))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tool_token_ids(tok, TOY_TOOLS)
    assert sorted(ids.values()) == sorted(TOY_TOOLS) and all(tok.decode([i]) in TOY_TOOLS for i in ids)

    engine = ScriptedEngine(lambda role, text: "")
    engine._tok = tok  # the scripted engine's calls are not used; only its tokenizer
    planner = Planner(Caller(engine, "planner", {}), [TOOLS[t] for t in TOY_TOOLS], "tool_token")
    assert planner.allowed_token_ids == (*ids, tok.eos_token_id)
    assert "Reply with the tool name only" in planner.system
    assert Planner(Caller(engine, "planner", {}), [TOOLS[t] for t in TOY_TOOLS]).allowed_token_ids is None


@pytest.mark.slow
def test_toy_preset_learns_to_choose_the_tool(tmp_path):
    """The toy preset as shipped (engine auto): success climbs from about 1/4 to > 0.8."""
    from engine.loop import TrainLoop
    from engine.presets import toy

    cfg = dataclasses.replace(toy(run_dir=str(tmp_path / "toy")), save_every=1000)
    last = TrainLoop(cfg).run()
    from engine.metrics import read_metrics

    rows = read_metrics(tmp_path / "toy" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, cfg.steps + 1)) and last is not None
    success = [r["reward/success_rate"] for r in rows]
    first, final = sum(success[:5]) / 5, sum(success[-10:]) / 10
    print(f"toy: success first 5 steps {first:.3f}, last 10 steps {final:.3f}")
    assert first < 0.5, "an untrained planner picks the right tool about 1 time in 4"
    assert final > 0.8, f"the planner did not learn: last 10 steps average {final:.3f}"
    assert max(r["training/rollout_logprob_diff_max"] for r in rows) < 1e-3  # float32: observed < 1e-6
