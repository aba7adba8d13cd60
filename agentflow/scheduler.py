"""Continuous scheduling of the four-agent loop: every trajectory advances on its own.

Each trajectory is a state machine, written as a Python generator (`_trajectory`) that yields its
next request and receives the answer: an LLM request (`_Ask`: role, model, prompt ids, sampling)
or a tool call (`_Call`). The steps are those of the lock-step loop (`agentflow.runner`):

    planner → (executor → tool, if the action is valid) → verifier (unless at max_turns) → … → generator

The driver (`run_continuous`) keeps every trajectory's next request in flight at once: LLM requests
are submitted to their model's request-level interface (`agentflow.lm.StreamingLanguageModel`), so
one engine iteration batches whatever calls are ready across all trajectories and roles; tool calls
run on a thread pool, off the engine's thread, and re-enter when done (a call still running after
`tool_timeout_s` comes back as a time-out error, as in lock-step). When one of a trajectory's
requests finishes its next one is submitted at once, before the engine's next iteration.

Same semantics as lock-step: the same prompts (rendered from the trajectory's own memory), the same
parsing, the same stop reasons, and every request seeded by `runner.request_seed(seed, trajectory,
turn, role)`, so on a deterministic engine the recorded planner turns equal lock-step's (a test
checks it). The judge still scores all answers at the end (the `reward` phase; one batched call for
the LLM judge). The base_generator tool is an LLM request of its model, not a thread-pool call.

Figures (`RolloutResult.stats`): wall time, engine busy time (seconds inside `step()` with work
pending) and its fraction, per-role request count, tokens and summed request latency (submit to
finish; overlapping across trajectories), per-trajectory latency, and the queue depth over time
(engine requests pending, tool calls running) sampled at every engine iteration.
Simplification: the models are stepped one after another on the caller's thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Generator as PyGenerator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agentflow.agents import LLMExecutor, LLMGenerator, LLMRole, LLMVerifier, Planner
from agentflow.lm import Generation, SamplingConfig, StreamingLanguageModel
from agentflow.runner import (
    AgentConfig,
    RolloutResult,
    TrajectoryState,
    close_turn,
    open_turn,
    request_seed,
    score,
    start_states,
)
from agentflow.tasks.query import Query
from agentflow.timing import NO_TIMER, Timer
from agentflow.tools import BaseGenerator
from agentflow.tools.base import Tool, ToolResult, _safe_run, error

MAX_QUEUE_SAMPLES = 4096  # queue-depth samples kept per rollout (evenly thinned beyond)


@dataclass
class Agents:
    """The built agents of one rollout (see `runner.run_trajectories`)."""

    planner: Planner
    executor: Any
    verifier: Any
    generator: Any
    judge: Any
    tools: dict[str, Tool]
    planner_sampling: dict[str, Any]


@dataclass
class _Ask:
    role: str
    model: StreamingLanguageModel
    prompt_ids: list[int]
    sampling: SamplingConfig


@dataclass
class _Call:
    tool: Tool
    command: str


@dataclass
class _Traj(TrajectoryState):
    turns: int = 0  # planner rounds entered (a context-budget stop counts)
    end: float = 0.0  # seconds from the rollout's start to this trajectory's last answer


@dataclass
class _Stats:
    requests: dict[str, int] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    response_tokens: dict[str, int] = field(default_factory=dict)
    queue: list[tuple[float, int, int]] = field(default_factory=list)  # (t, engine requests pending, tools running)

    def add(self, role: str, seconds: float, prompt: int, response: int) -> None:
        self.requests[role] = self.requests.get(role, 0) + 1
        self.latency[role] = self.latency.get(role, 0.0) + seconds
        self.prompt_tokens[role] = self.prompt_tokens.get(role, 0) + prompt
        self.response_tokens[role] = self.response_tokens.get(role, 0) + response


def _reply(
    role: str, agent: LLMRole, ids: list[int] | None, seed: int | None
) -> PyGenerator[_Ask, Generation, str | None]:
    """One greedy request of an LLM role and its reply's text; no request (None) when the prompt did not fit."""
    if ids is None:
        return None
    sampling = agent.caller.sampling(agent.max_new_tokens, seed=seed)
    return (yield _Ask(role, agent.caller.engine, ids, sampling)).text


def _trajectory(k: int, s: _Traj, a: Agents, config: AgentConfig, seed: int | None) -> PyGenerator[Any, Any, None]:
    """One trajectory's requests, in order; `yield` hands a request out and gets its answer back."""
    planner = a.planner
    while True:
        s.turns += 1
        turn = s.turns
        ids = planner.prompt_ids(s.memory)
        if len(ids) + config.planner_max_new_tokens > config.context_budget:
            s.stop = "context_budget"
            break
        sampling = planner.caller.sampling(
            config.planner_max_new_tokens, seed=request_seed(seed, k, turn, "planner"), **a.planner_sampling
        )
        g: Generation = yield _Ask("planner", planner.caller.engine, ids, sampling)
        action = planner.parse(g, s.memory)
        t = open_turn(s, ids, g, action)
        if action.valid:
            tool = a.tools[action.tool]
            ex = a.executor
            if isinstance(ex, LLMExecutor):
                ids = ex.prompt(*LLMExecutor.user(s.memory, tool, action.task))
                text = yield from _reply("executor", ex, ids, request_seed(seed, k, turn, "executor"))
                command, err = LLMExecutor.parse(text)
            else:
                command, err = ex.commands([(s.memory, tool, action.task)], None)[0]
            if err:
                result = ToolResult(False, f"error: {err}")
            elif isinstance(tool, BaseGenerator):
                ids = tool.prompt_ids(command)
                model = getattr(tool.engine, "engine", tool.engine)  # the model behind the tool's counting Caller
                gen = None if ids is None else (yield _Ask("base_generator", model, ids, tool.sampling()))
                result = BaseGenerator.result(gen)
            else:
                result = yield _Call(tool, command)
            close_turn(s, t, action, config, command, result)
        else:
            close_turn(s, t, action, config)
        if turn >= config.max_turns:
            s.stop = "max_turns"
            break
        ver = a.verifier
        if isinstance(ver, LLMVerifier):
            ids = ver.prompt(s.memory.render, len(s.memory.steps))
            text = yield from _reply("verifier", ver, ids, request_seed(seed, k, turn, "verifier"))
            verdict = LLMVerifier.parse(text)
        else:
            verdict = ver.decide([s.memory], None)[0]
        s.memory.steps[-1].verdict = verdict
        if verdict == "STOP":
            s.stop = "verifier"
            break
    gen = a.generator
    if isinstance(gen, LLMGenerator):
        ids = gen.prompt(s.memory.render, len(s.memory.steps))
        text = yield from _reply("generator", gen, ids, request_seed(seed, k, 0, "generator"))
        raw, answer = LLMGenerator.parse(text)
    else:
        raw, answer = gen.answers([s.memory], None)[0]
    s.memory.final_output = raw
    s.traj.answer = answer


def run_continuous(
    agents: Agents,
    queries: Sequence[Query],
    group_size: int,
    config: AgentConfig,
    *,
    seed: int | None = None,
    timer: Timer = NO_TIMER,
    analyses: dict[str, str] | None = None,
) -> RolloutResult:
    """Run `group_size` trajectories per query, each advancing on its own (see the module docstring);
    `analyses`: the query analysis per question when the planner format asks for one."""
    states: list[_Traj] = start_states(queries, group_size, analyses or {}, _Traj)
    counters = agents.planner.caller.counters  # the runner's counters, shared by every role's Caller
    stats = _Stats()
    callers = {
        "planner": agents.planner.caller,
        **{
            r: getattr(agents, r).caller
            for r in ("executor", "verifier", "generator")
            if hasattr(getattr(agents, r), "caller")
        },
    }
    for tool in agents.tools.values():
        if isinstance(tool, BaseGenerator) and hasattr(tool.engine, "count"):
            callers["base_generator"] = tool.engine
    progs = [_trajectory(k, s, agents, config, seed) for k, s in enumerate(states)]
    models: dict[int, StreamingLanguageModel] = {}
    asked: dict[tuple[int, int], tuple[int, _Ask, float]] = {}  # (model, request id) -> (trajectory, request, t)
    calls: dict[cf.Future, tuple[int, float, Tool]] = {}
    t0 = time.perf_counter()
    busy = 0.0
    engine_steps = 0

    def advance(k: int, value: Any) -> None:
        try:
            req = progs[k].send(value)
        except StopIteration:
            states[k].end = time.perf_counter() - t0
            return
        if isinstance(req, _Ask):
            models[id(req.model)] = req.model
            rid = req.model.submit(req.prompt_ids, req.sampling)
            asked[(id(req.model), rid)] = (k, req, time.perf_counter())
        else:
            calls[pool.submit(_safe_run, req.tool, req.command)] = (k, time.perf_counter(), req.tool)

    with cf.ThreadPoolExecutor(max_workers=config.tool_workers) as pool:
        for k in range(len(states)):
            advance(k, None)
        while asked or calls:
            pending = [m for m in models.values() if m.num_pending()]
            if asked and not pending and not calls:
                raise RuntimeError(f"{len(asked)} requests are outstanding but no model has anything pending")
            for m in pending:
                ts = time.perf_counter()
                finished = m.step()
                now = time.perf_counter()
                busy += now - ts
                engine_steps += 1
                for rid, g in finished:
                    k, req, tq = asked.pop((id(m), rid))
                    stats.add(req.role, now - tq, len(req.prompt_ids), len(g.token_ids))
                    caller = callers.get(req.role)
                    if caller is not None:
                        caller.count([req.prompt_ids], [g], calls=1)
                    advance(k, g)
            now = time.perf_counter()
            for f in [f for f in calls if f.done() or now - calls[f][1] > config.tool_timeout_s]:
                k, tq, tool = calls.pop(f)
                r = f.result() if f.done() else error(f"{tool.name} timed out after {config.tool_timeout_s:g} s")
                stats.add("tools", time.perf_counter() - tq, 0, 0)
                advance(k, r)
            n_ask = sum(m.num_pending() for m in models.values())
            stats.queue.append((time.perf_counter() - t0, n_ask, len(calls)))
            if calls and not n_ask:  # only tools are running: wait for the first to finish (or time out)
                oldest = min(tq for _, tq, _ in calls.values())
                wait = max(0.0, config.tool_timeout_s - (time.perf_counter() - oldest))
                cf.wait(list(calls), timeout=wait, return_when=cf.FIRST_COMPLETED)
    wall = time.perf_counter() - t0
    score(states, agents.judge, timer)
    queue = stats.queue
    if len(queue) > MAX_QUEUE_SAMPLES:
        queue = [queue[i * len(queue) // MAX_QUEUE_SAMPLES] for i in range(MAX_QUEUE_SAMPLES)]
    out = {
        "wall_s": wall,
        "engine_busy_s": busy,
        "busy_fraction": busy / wall if wall > 0 else 0.0,
        "engine_steps": engine_steps,
        "trajectory_latency_s": [s.end for s in states],
        "role_requests": stats.requests,
        "role_time_s": stats.latency,
        "role_prompt_tokens": stats.prompt_tokens,
        "role_response_tokens": stats.response_tokens,
        "queue": queue,
    }
    return RolloutResult(
        [s.traj for s in states], counters, max(s.turns for s in states), schedule="continuous", stats=out
    )
