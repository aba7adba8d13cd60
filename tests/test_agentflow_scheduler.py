"""The continuous scheduler against lock-step on a deterministic streaming engine: same turns, overlap."""

from __future__ import annotations

import re
import threading

import pytest
from agentflow_fakes import ScriptedEngine, StreamingScriptedEngine

from agentflow import AgentConfig, Query, RoleModels, run_trajectories
from agentflow.runner import build_tools
from agentflow.tools.base import Tool, ToolResult


def _queries(n: int) -> list[Query]:
    return [Query(f"q{i}", f"What is {i} + {i + 1}?", str(2 * i + 1), judge="numeric") for i in range(n)]


def _seeded(role: str, text: str, seed: int | None) -> str:
    """Replies that depend on the request's seed, so a seed mismatch between schedules shows."""
    a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", text).groups())
    r = (seed or 0) % 7
    if role == "planner":
        if r == 0:
            return "nonsense"
        tool = "calculator" if r % 2 else "python"
        return f"Tool: {tool}\nSub-goal: {a} + {b}" + " please" * (r % 3)
    if role == "executor":
        return f"Command: {a} + {b}" if "calculator" in text.split("Tool: ")[-1][:12] else f"Command: print({a}+{b})"
    if role == "verifier":
        return "STOP" if r < 3 else "CONTINUE"
    if role == "generator":
        m = re.findall(r"Result: (\S+)", text)
        return f"<answer>{m[-1]}</answer>" if m else "no answer"
    return "?"


def _run(schedule: str, seed: int | None = 3, **cfg):
    engine = StreamingScriptedEngine(_seeded)
    config = AgentConfig(max_turns=3, schedule=schedule, **cfg)
    return engine, run_trajectories(engine, _queries(3), 4, config, seed=seed)


def _fingerprint(res) -> list:
    return [
        (
            tr.query_id,
            tr.group_index,
            tr.stop_reason,
            tr.answer,
            tr.reward,
            [(t.prompt_ids, t.response_ids, t.response_logprobs, t.valid, t.command, t.tool_result) for t in tr.turns],
            tr.memory.to_dict(),
        )
        for tr in res.trajectories
    ]


def test_continuous_equals_lockstep_on_a_deterministic_engine():
    e_lock, lock = _run("lockstep")
    e_cont, cont = _run("continuous")
    assert lock.schedule == "lockstep" and cont.schedule == "continuous"
    assert _fingerprint(cont) == _fingerprint(lock)
    assert cont.loop_steps == lock.loop_steps
    # the run exercises every path: varying turn counts, both tools, invalid actions, all stop reasons seen here
    assert {len(tr.turns) for tr in cont.trajectories} == {1, 2, 3}
    assert {tr.stop_reason for tr in cont.trajectories} == {"verifier", "max_turns"}
    assert any(not t.valid for tr in cont.trajectories for t in tr.turns)
    for role in ("planner", "executor", "verifier", "generator"):
        for key in ("prompts", "prompt_tokens", "response_tokens"):
            assert cont.counters[f"{role}_{key}"] == lock.counters[f"{role}_{key}"], (role, key)
    # continuous had requests of several roles in flight at once; lock-step only ever one role
    assert e_cont.max_in_flight > 1 and e_cont.most_roles_in_flight > 1 and e_lock.most_roles_in_flight == 1
    st = cont.stats
    assert st["role_requests"]["planner"] == cont.counters["planner_prompts"]
    assert 0 < st["busy_fraction"] <= 1 and len(st["trajectory_latency_s"]) == 12
    assert st["queue"] and all(n >= 0 and t >= 0 for t, n, _ in st["queue"])


def test_fixed_seed_reproduces_and_another_seed_differs():
    _, a = _run("continuous", seed=11)
    _, b = _run("continuous", seed=11)
    _, c = _run("continuous", seed=12)
    assert _fingerprint(a) == _fingerprint(b) != _fingerprint(c)


def test_auto_schedule_follows_the_model_and_continuous_needs_streaming():
    _, res = _run("auto")
    assert res.schedule == "continuous"
    plain = ScriptedEngine(lambda role, text: _seeded(role, text, 1))
    assert run_trajectories(plain, _queries(1), 2, AgentConfig(max_turns=2), seed=0).schedule == "lockstep"
    with pytest.raises(ValueError, match="schedule='continuous' needs every role's model"):
        run_trajectories(plain, _queries(1), 2, AgentConfig(schedule="continuous"))
    mixed = RoleModels(planner=StreamingScriptedEngine(_seeded), verifier=plain)
    assert run_trajectories(mixed, _queries(1), 1, AgentConfig(max_turns=2)).schedule == "lockstep"
    with pytest.raises(ValueError, match="schedule must be one of"):
        AgentConfig(schedule="fast")


class _Gate(Tool):
    """A tool that records how many of its calls run at once. Each call waits (bounded) until a second
    call is running, so overlap is observable; `hold` calls block until `release` is set."""

    name = "calculator"
    description = "adds"
    command_format = "an expression"

    def __init__(self, hold: bool = False) -> None:
        self.cond = threading.Condition()
        self.running = 0
        self.most = 0
        self.release = threading.Event()
        self.hold = hold

    def run(self, command: str) -> ToolResult:
        with self.cond:
            self.running += 1
            self.most = max(self.most, self.running)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.most > 1, timeout=5)
        if self.hold:
            self.release.wait(30)
        with self.cond:
            self.running -= 1
        return ToolResult(True, "3")


def test_tool_calls_run_concurrently_off_the_engine_thread():
    gate = _Gate()
    engine = StreamingScriptedEngine(lambda role, text, seed: _seeded(role, text, 1))
    cfg = AgentConfig(max_turns=1, executor="rule", schedule="continuous")
    res = run_trajectories(engine, _queries(2), 3, cfg, seed=0, tools=[gate])
    assert gate.most > 1
    assert all(tr.turns[0].tool_result == "3" for tr in res.trajectories)


def test_a_tool_past_its_timeout_comes_back_as_an_error():
    gate = _Gate(hold=True)
    engine = StreamingScriptedEngine(lambda role, text, seed: _seeded(role, text, 1))
    cfg = AgentConfig(max_turns=1, executor="rule", schedule="continuous", tool_timeout_s=0.3)
    try:
        res = run_trajectories(engine, _queries(1), 2, cfg, seed=0, tools=[gate])
    finally:
        gate.release.set()
    assert all(tr.turns[0].tool_result == "error: calculator timed out after 0.3 s" for tr in res.trajectories)


def test_base_generator_is_an_engine_request_in_continuous_mode():
    def reply(role, text, seed):
        if role == "planner":
            return "Tool: base_generator\nSub-goal: What is 1 + 2?"
        return {"base": "three", "verifier": "STOP", "generator": "<answer>3</answer>"}.get(role, "")

    cfg = AgentConfig(executor="rule", schedule="continuous")
    out = {}
    for schedule in ("continuous", "lockstep"):
        engine = StreamingScriptedEngine(reply)
        cfg = AgentConfig(executor="rule", schedule=schedule)
        res = run_trajectories(engine, _queries(1), 2, cfg, seed=0, tools=build_tools(cfg, engine))
        out[schedule] = _fingerprint(res)
        assert [tr.turns[0].tool_result for tr in res.trajectories] == ["three", "three"]
    assert out["continuous"] == out["lockstep"]


def test_both_schedules_record_the_query_source():
    queries = [Query(q.id, q.question, q.answer, judge="numeric", source=f"src{i}") for i, q in enumerate(_queries(2))]
    for schedule in ("continuous", "lockstep"):
        res = run_trajectories(StreamingScriptedEngine(_seeded), queries, 2, AgentConfig(schedule=schedule), seed=3)
        assert [tr.source for tr in res.trajectories] == ["src0", "src0", "src1", "src1"], schedule
