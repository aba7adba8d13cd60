"""The four-agent loop with a scripted engine: batching, stop logic, turns, tool failures, variants."""

from __future__ import annotations

import json
import re

import pytest
from agentflow_fakes import IM_END, ScriptedEngine

from agentflow import AgentConfig, Memory, Query, RoleModels, load_task, run_trajectories
from agentflow.agents import Caller, Planner
from agentflow.chat import chat_ids
from agentflow.runner import ROLES, build_tools
from agentflow.tools import SandboxLimits
from agentflow.tools.search import default_index
from engine.timer import PhaseTimer

# The CPU limit (1 s) must trip before the wall clock: one CPU-second took ~10 s of wall time at load 18.
FAST_SANDBOX = SandboxLimits(wall_seconds=30.0, cpu_seconds=1, memory_mb=256)


def _queries(n: int) -> list[Query]:
    return [Query(f"q{i}", f"What is {i} + {i + 1}?", str(2 * i + 1), judge="numeric") for i in range(n)]


def _query_of(text: str) -> str:
    return re.search(r"Query: (.*?)(<\|im_end\|>|\n)", text).group(1)


def test_one_batched_planner_call_per_loop_step_and_invalid_actions_recorded():
    engine = ScriptedEngine(lambda role, text: {"planner": "I think we should add", "verifier": "hmm"}.get(role, "?"))
    cfg = AgentConfig(max_turns=3, planner_max_new_tokens=64)
    res = run_trajectories(engine, _queries(3), group_size=4, config=cfg, seed=0)
    assert len(res.trajectories) == 12 and res.loop_steps == 3
    planner_calls = engine.calls_of("planner")
    assert [len(c.prompts) for c in planner_calls] == [12, 12, 12]
    assert [len(c.prompts) for c in engine.calls_of("verifier")] == [12, 12]  # not asked after the last turn
    assert engine.calls_of("executor") == []  # no valid action, nothing to execute
    assert [len(c.prompts) for c in engine.calls_of("generator")] == [12]
    assert res.counters["planner_calls"] == 3 and res.counters["planner_prompts"] == 36
    for tr in res.trajectories:
        assert tr.stop_reason == "max_turns" and len(tr.turns) == 3
        assert tr.answer is None and tr.reward == 0.0
        for turn in tr.turns:
            assert not turn.valid and turn.tool_result.startswith("invalid planner output: expected 'Tool: <name>'")
            assert turn.response_ids[-1] == IM_END and len(turn.response_logprobs) == len(turn.response_ids)
        assert [s.verdict for s in tr.memory.steps] == ["CONTINUE", "CONTINUE", None]  # "hmm" means CONTINUE
    assert [tr.group_index for tr in res.trajectories[:4]] == [0, 1, 2, 3]
    assert {tr.query_id for tr in res.trajectories[4:8]} == {"q1"}
    json.dumps([tr.to_dict() for tr in res.trajectories])


def _solver(role: str, text: str) -> str:
    """A competent scripted system for `What is a + b?` queries."""
    a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", text).groups())
    if role == "planner":
        return f"Tool: calculator\nSub-goal: add {a} and {b}"
    if role == "executor":
        return f"Command: {a} + {b}"
    if role == "verifier":
        return "STOP" if f"Result: {a + b}" in text else "CONTINUE"
    if role == "generator":
        return f"The sum is <answer>{a + b}</answer>"
    raise AssertionError(role)


def test_llm_agents_solve_and_turns_hold_exact_prompt_and_response_ids():
    engine = ScriptedEngine(_solver)
    res = run_trajectories(engine, _queries(2), group_size=3, config=AgentConfig(), seed=1)
    tools = build_tools(AgentConfig(), engine)
    planner_prompts = engine.calls_of("planner")[0].prompts
    for i, tr in enumerate(res.trajectories):
        assert tr.reward == 1.0 and tr.stop_reason == "verifier" and len(tr.turns) == 1
        turn = tr.turns[0]
        expected_prompt = chat_ids(
            engine.tokenizer, Planner(Caller(engine, "planner", {}), tools).messages(Memory(tr.query))
        )
        assert turn.prompt_ids == expected_prompt == planner_prompts[i]
        reply = _solver("planner", tr.query)
        assert turn.response_ids == [*engine.tokenizer.encode(reply), IM_END]
        assert turn.response_logprobs == pytest.approx([-0.25 - 0.001 * k for k in range(len(turn.response_ids))])
        assert (
            turn.valid
            and turn.tool == "calculator"
            and turn.command == turn.sub_goal.replace("add ", "").replace(" and ", " + ")
        )
        assert turn.tool_result == tr.gold
        step = tr.memory.steps[0]
        assert (step.command, step.result, step.ok, step.verdict) == (turn.command, tr.gold, True, "STOP")
        assert tr.memory.final_output == f"The sum is <answer>{tr.gold}</answer>"
    # 1 step: planner, executor, verifier, then one generator call: 4 batched calls for 6 trajectories
    assert [c.role for c in engine.calls] == ["planner", "executor", "verifier", "generator"]
    assert all(len(c.prompts) == 6 for c in engine.calls)


def test_sampling_settings_and_seeds_per_call():
    engine = ScriptedEngine(lambda role, text: {"planner": "x", "verifier": "CONTINUE"}.get(role, ""))
    cfg = AgentConfig(max_turns=2, temperature=0.7, top_p=0.9, top_k=20, planner_max_new_tokens=33)
    run_trajectories(engine, _queries(1), 2, cfg, seed=5)
    seeds = [c.sampling.seed for c in engine.calls]
    plan = [c.sampling for c in engine.calls_of("planner")]
    assert [(s.temperature, s.top_p, s.top_k, s.max_new_tokens) for s in plan] == [(0.7, 0.9, 20, 33)] * 2
    assert all(c.sampling.temperature == 0.0 for c in engine.calls if c.role != "planner")
    assert all(c.sampling.stop_token_ids == (IM_END,) for c in engine.calls)
    assert len(set(seeds)) == len(seeds)
    engine2 = ScriptedEngine(engine.reply)
    run_trajectories(engine2, _queries(1), 2, cfg, seed=5)
    assert [c.sampling.seed for c in engine2.calls] == seeds
    engine3 = ScriptedEngine(engine.reply)
    run_trajectories(engine3, _queries(1), 2, cfg, seed=None)
    assert all(c.sampling.seed is None for c in engine3.calls)


def test_rule_based_executor_verifier_generator_need_only_the_planner_engine():
    engine = ScriptedEngine(lambda role, text: "Tool: calculator\nSub-goal: evaluate the expression")
    queries = load_task("arithmetic", 5, seed=2)
    cfg = AgentConfig(executor="rule", verifier="rule", generator="rule", max_turns=3)
    res = run_trajectories(engine, queries, 2, cfg, seed=0)
    assert {c.role for c in engine.calls} == {"planner"} and len(engine.calls) == 1
    for tr, q in zip(res.trajectories, [q for q in queries for _ in range(2)]):
        assert tr.reward == 1.0 and tr.answer == q.answer and tr.stop_reason == "verifier"
        assert tr.turns[0].command == q.meta["expression"]


def test_tool_failures_are_text_in_memory_and_reach_the_next_planner_prompt():
    def reply(role, text):
        q = _query_of(text)
        if "Step 1:" in text:
            return "no idea"
        return {"A": "Tool: calculator\nSub-goal: 1 / 0", "B": "Tool: python\nSub-goal: while True: pass"}[q]

    engine = ScriptedEngine(reply)
    cfg = AgentConfig(executor="rule", verifier="rule", generator="rule", max_turns=2, sandbox=FAST_SANDBOX)
    res = run_trajectories(engine, [Query("a", "A", "1"), Query("b", "B", "1")], 1, cfg)
    a, b = res.trajectories
    assert a.turns[0].tool_result == "error: division by zero"
    assert b.turns[0].tool_result.startswith("error: CPU time limit exceeded")
    assert not a.memory.steps[0].ok and a.memory.steps[0].verdict == "CONTINUE"
    second = engine.calls_of("planner")[1].texts
    assert "Result: error: division by zero" in second[0] and "Result: error: CPU time limit" in second[1]
    assert a.stop_reason == b.stop_reason == "max_turns" and a.answer is None


def test_all_tools_of_one_step_run_together():
    title = default_index().passages[100]["title"]
    replies = {
        "Q1": "Tool: calculator\nSub-goal: 6 * 7",
        "Q2": "Tool: python\nSub-goal: print(sum(range(10)))",
        "Q3": f"Tool: search\nSub-goal: {title}",
        "Q4": "Tool: base_generator\nSub-goal: What is the capital of France?",
    }

    def reply(role, text):
        if role == "planner":
            return replies[_query_of(text)]
        return "Paris" if role == "base" else "STOP"

    engine = ScriptedEngine(reply)
    cfg = AgentConfig(executor="rule", verifier="llm", generator="rule", sandbox=FAST_SANDBOX)
    timer = PhaseTimer("cpu")
    with timer.phase("gen"):
        res = run_trajectories(engine, [Query(f"q{i}", f"Q{i}", "x") for i in range(1, 5)], 1, cfg, timer=timer)
    results = [tr.turns[0].tool_result for tr in res.trajectories]
    assert results[0] == "42" and results[1] == "45" and results[3] == "Paris"
    assert results[2].startswith(f"[{title}] ")
    assert [c.role for c in engine.calls] == ["planner", "base", "verifier"]
    t = timer.collect()
    assert t.spans["tools"] > 0 and set(t.spans) == set(ROLES) - {"analysis"} and set(t.phases) == {"gen", "reward"}


def test_context_budget_stops_before_an_oversized_planner_prompt():
    long_result = "Tool: python\nSub-goal: print('z' * 400)"
    engine = ScriptedEngine(lambda role, text: long_result if role == "planner" else "CONTINUE")
    probe = ScriptedEngine(engine.reply)
    first_len = len(
        chat_ids(
            probe.tokenizer,
            Planner(Caller(probe, "planner", {}), build_tools(AgentConfig(), probe)).messages(Memory("Q")),
        )
    )
    cfg = AgentConfig(executor="rule", max_turns=5, planner_max_new_tokens=64, context_budget=first_len + 64 + 50,
                      sandbox=FAST_SANDBOX)  # fmt: skip
    res = run_trajectories(engine, [Query("a", "Q", "1"), Query("b", "Q" * 400, "1")], 1, cfg)
    short, huge = res.trajectories
    assert short.stop_reason == "context_budget" and len(short.turns) == 1
    assert huge.stop_reason == "context_budget" and huge.turns == []  # the query alone is over budget
    for call in engine.calls:
        limit = {"planner": 64, "verifier": cfg.verifier_max_new_tokens, "generator": cfg.generator_max_new_tokens}[
            call.role
        ]
        assert all(len(p) + limit <= cfg.context_budget for p in call.prompts), call.role
    # the generator still answers; its prompt omits old steps to fit the budget
    assert "earlier step omitted" in engine.calls_of("generator")[0].texts[0]


def test_truncated_planner_output_is_an_invalid_turn():
    engine = ScriptedEngine(
        lambda role, text: "Tool: calculator\nSub-goal: 1 + 1<no-eos>" if role == "planner" else "STOP"
    )
    res = run_trajectories(engine, _queries(1), 1, AgentConfig(max_turns=1, planner_max_new_tokens=12))
    turn = res.trajectories[0].turns[0]
    assert not turn.valid and "token limit" in turn.tool_result and len(turn.response_ids) == 12


def test_llm_executor_without_a_command_is_a_tool_error():
    def reply(role, text):
        return {"planner": "Tool: calculator\nSub-goal: add", "executor": "I refuse", "verifier": "STOP"}.get(role, "")

    engine = ScriptedEngine(reply)
    res = run_trajectories(engine, _queries(1), 1, AgentConfig(max_turns=2))
    tr = res.trajectories[0]
    assert tr.turns[0].valid and tr.turns[0].tool_result == "error: no 'Command: ...' line in the executor's output"
    assert tr.stop_reason == "verifier"


def test_roles_can_use_separate_engines():
    policy = ScriptedEngine(_solver)
    frozen = ScriptedEngine(_solver)
    res = run_trajectories(
        RoleModels(planner=policy, executor=frozen, verifier=frozen, generator=frozen), _queries(2), 2
    )
    assert {c.role for c in policy.calls} == {"planner"}
    assert {c.role for c in frozen.calls} == {"executor", "verifier", "generator"}
    assert all(tr.reward == 1.0 for tr in res.trajectories)


def test_llm_judge_option():
    def reply(role, text):
        if role == "judge":
            return "<analysis>: 1 and one are the same number.\n<true_false>: True"
        if role == "generator" and "What is 0 + 1" in text:
            return "<answer>one</answer>"  # not rule-equivalent to "1": the judge model is asked
        return _solver(role, text)

    engine = ScriptedEngine(reply)
    res = run_trajectories(engine, _queries(2), 2, AgentConfig(judge="llm"))
    assert [len(c.prompts) for c in engine.calls_of("judge")] == [2]  # q1's "3" == "3" is matched by the rule
    assert all(tr.reward == 1.0 for tr in res.trajectories)
    c = res.counters
    assert (c["judge_rule_matched"], c["judge_asked"], c["judge_unparsed"]) == (2, 2, 0)
    assert c["judge_calls"] == 1 and c["judge_prompts"] == 2


def test_bad_arguments_are_clear_errors():
    engine = ScriptedEngine(_solver)
    with pytest.raises(ValueError, match="no queries"):
        run_trajectories(engine, [], 2)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        run_trajectories(engine, _queries(1), 0)
    with pytest.raises(TypeError, match="does not implement LanguageModel"):
        RoleModels(planner=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="executor must be one of"):
        AgentConfig(executor="oracle")
    with pytest.raises(ValueError, match="tools must be a non-empty subset"):
        AgentConfig(tools=("abacus",))
    with pytest.raises(ValueError, match="context_budget"):
        AgentConfig(context_budget=50, planner_max_new_tokens=64)
    with pytest.raises(ValueError, match="max_turns"):
        AgentConfig(max_turns=0)
