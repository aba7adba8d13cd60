"""The four-agent loop over many trajectories at once (lock-step).

`run_trajectories(models, queries, group_size, config)` runs G = `group_size` trajectories per
query. All live trajectories advance in lock-step; one loop step is:

1. Planner: render every live memory into prompt ids; a prompt whose length plus the planner's
   `max_new_tokens` exceeds `context_budget` ends that trajectory (stop reason `context_budget`).
   The rest go to the planner's model in ONE `generate` call. Each response is parsed into an
   action and recorded as a turn (prompt ids, response ids, sampling log-probs), valid or not.
2. Executor: commands for all valid actions (one batched call for the LLM executor, none for the
   rule executor). Invalid actions run no tool; the reason goes into memory.
3. Tools: all calls of the step run together: local tools on a thread pool (python subprocesses
   run concurrently), model-backed tools as one batched call per tool. Errors and time-outs come
   back as text; results are truncated to `tool_result_chars` before entering memory.
4. Verifier: after step `max_turns` the trajectory stops (`max_turns`); otherwise one batched
   verifier call decides STOP (stop reason `verifier`) or CONTINUE for every trajectory.

When no trajectory is live, the generator writes every final answer in one batched call and the
judge scores them (rule-based per query, or one batched LLM-judge call). So a group costs a few
batched calls per loop step, not one call per trajectory.

Schedules (`AgentConfig.schedule`): "lockstep" is the loop above; "continuous"
(`agentflow.scheduler`) runs the same per-trajectory steps with every trajectory advancing on its
own over a `StreamingLanguageModel`; "auto" picks continuous when every model involved streams,
else lock-step. `RolloutResult.schedule` says which ran. With streaming models both schedules seed
every request by (trajectory, turn, role) (`request_seed`), so on a deterministic engine they record
the same turns; a model without the streaming interface gets one seed per batched call instead.
Both schedules keep a trajectory's bookkeeping in the same functions: `start_states` (the states,
query analysis in memory), `open_turn` (a planner call becomes a turn), `close_turn` (the tool result,
or an invalid action's error, into the turn and memory) and `score` (reward and stop reason).

Models (`RoleModels`): the planner's is the trained policy. Query analysis, executor, verifier,
generator, the base_generator tool and the LLM judge use the planner's model unless `RoleModels`
names others (`RoleModels.helped(planner, helper)`: all of them on one frozen helper); their calls
are never training data. The planner format "agentflow" first asks the analysis model for one
query analysis per distinct query (span `analysis`). Time goes to the
caller's `Timer`: each role is a span, the judge is the `reward` phase.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agentflow.agents import (
    EXECUTORS,
    GENERATORS,
    PLANNER_FORMATS,
    VERIFIERS,
    Caller,
    Planner,
    PlannerAction,
    QueryAnalyzer,
)
from agentflow.lm import Generation, LanguageModel, StreamingLanguageModel
from agentflow.memory import Memory, Step
from agentflow.tasks.judges import LLMJudge, RuleJudge
from agentflow.tasks.query import Query
from agentflow.timing import NO_TIMER, Timer
from agentflow.tools import TOOL_NAMES, BaseGenerator, Calculator, PythonTool, SandboxLimits, Search, Tool
from agentflow.tools.base import ToolResult, error, run_tool_calls, truncate
from agentflow.tools.search import open_index
from agentflow.trajectory import Trajectory, Turn

ROLES = ("analysis", "planner", "executor", "tools", "verifier", "generator")  # the timer spans of one rollout
# the model calls counted per role in RolloutResult.counters (<role>_calls, _prompts, _prompt_tokens, _response_tokens)
MODEL_ROLES = ("planner", "analysis", "executor", "verifier", "generator", "base_generator", "judge")
AGENT_MODES = tuple(EXECUTORS)
SCHEDULES = ("auto", "continuous", "lockstep")


@dataclass(frozen=True)
class AgentConfig:
    """How the loop runs. Token budgets count prompt + response tokens of one engine call."""

    max_turns: int = 4
    planner_max_new_tokens: int = 96
    temperature: float = 1.0  # planner sampling; the other agents decode greedily
    top_p: float = 1.0
    top_k: int = -1
    context_budget: int = 4096
    tool_result_chars: int = 600  # a tool result is cut to this many characters before entering memory
    tools: tuple[str, ...] = TOOL_NAMES
    planner_format: str = "text"  # "text", "tool_token", "tool_prefix" or "agentflow" (see agentflow.agents)
    executor: str = "llm"  # "llm" or "rule" (see agentflow.agents)
    verifier: str = "llm"
    generator: str = "llm"
    judge: str = "rule"  # "rule" (the query's rule-based judge) or "llm"
    executor_max_new_tokens: int = 128
    verifier_max_new_tokens: int = 8
    generator_max_new_tokens: int = 64
    base_generator_max_new_tokens: int = 128
    analysis_max_new_tokens: int = 256  # query analysis (planner_format "agentflow")
    judge_max_new_tokens: int = 256  # the LLM judge's analysis + verdict
    tool_timeout_s: float = 30.0  # wall-clock bound on one local tool call (python has its own limits)
    tool_workers: int = 8
    search_top_k: int = 3
    search_corpus: str | None = None  # JSONL/parquet of id, title, text (None: the shipped corpus)
    search_index_dir: str | None = None  # where its bm25s index lives (None: <corpus>.bm25s)
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    schedule: str = "auto"  # "auto" (continuous when every model streams), "continuous" or "lockstep"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        for name in ("executor", "verifier", "generator"):
            if getattr(self, name) not in AGENT_MODES:
                raise ValueError(f"{name} must be one of {AGENT_MODES}, got {getattr(self, name)!r}")
        if self.planner_format not in PLANNER_FORMATS:
            raise ValueError(f"planner_format must be one of {tuple(PLANNER_FORMATS)}, got {self.planner_format!r}")
        if self.judge not in AGENT_MODES:
            raise ValueError(f"judge must be one of {AGENT_MODES}, got {self.judge!r}")
        unknown = [t for t in self.tools if t not in TOOL_NAMES]
        if unknown or not self.tools:
            raise ValueError(f"tools must be a non-empty subset of {TOOL_NAMES}, got {self.tools}")
        if self.context_budget <= self.planner_max_new_tokens:
            raise ValueError(
                f"context_budget ({self.context_budget}) must exceed planner_max_new_tokens ({self.planner_max_new_tokens})"
            )
        if self.search_top_k < 1:
            raise ValueError(f"search_top_k must be >= 1, got {self.search_top_k}")
        if self.tool_result_chars < 1 or self.tool_workers < 1:
            raise ValueError("tool_result_chars and tool_workers must be >= 1")


@dataclass
class RoleModels:
    """Which language model serves which role; roles left None use the planner's model."""

    planner: LanguageModel
    analysis: LanguageModel | None = None
    executor: LanguageModel | None = None
    verifier: LanguageModel | None = None
    generator: LanguageModel | None = None
    judge: LanguageModel | None = None

    def __post_init__(self) -> None:
        for role in ("planner", "analysis", "executor", "verifier", "generator", "judge"):
            m = getattr(self, role)
            if m is not None and not isinstance(m, LanguageModel):
                raise TypeError(f"model for {role} does not implement LanguageModel: {type(m).__name__}")

    def of(self, role: str) -> LanguageModel:
        return getattr(self, role) or self.planner

    @classmethod
    def helped(cls, planner: LanguageModel, helper: LanguageModel) -> RoleModels:
        """The planner on `planner`, every other role (and the base_generator tool) on `helper`."""
        return cls(planner, analysis=helper, executor=helper, verifier=helper, generator=helper, judge=helper)


@dataclass
class RolloutResult:
    trajectories: list[Trajectory]
    counters: dict[str, float]  # per role: <role>_calls, _prompts, _prompt_tokens, _response_tokens
    loop_steps: int
    schedule: str = "lockstep"  # which schedule ran
    stats: dict[str, Any] = field(default_factory=dict)  # the continuous scheduler's figures (agentflow.scheduler)

    def summary(self) -> dict[str, Any]:
        trajs = self.trajectories
        n = max(1, len(trajs))
        turns = [t for tr in trajs for t in tr.turns]
        reasons: dict[str, int] = {}
        for tr in trajs:
            reasons[tr.stop_reason] = reasons.get(tr.stop_reason, 0) + 1
        return {
            "trajectories": len(trajs),
            "success_rate": sum(tr.reward for tr in trajs) / n,
            "turns_per_trajectory": len(turns) / n,
            "invalid_action_rate": sum(not t.valid for t in turns) / max(1, len(turns)),
            "planner_prompt_tokens": sum(len(t.prompt_ids) for t in turns),
            "planner_response_tokens": sum(len(t.response_ids) for t in turns),
            "stop_reasons": reasons,
            "loop_steps": self.loop_steps,
            "schedule": self.schedule,
            "counters": dict(self.counters),
        }


def build_tools(config: AgentConfig, model: LanguageModel) -> list[Tool]:
    """The tools named in `config.tools`; base_generator asks `model`."""
    make = {
        "calculator": lambda: Calculator(),
        "python": lambda: PythonTool(config.sandbox),
        "search": lambda: Search(
            open_index(config.search_corpus, config.search_index_dir) if config.search_corpus else None,
            top_k=config.search_top_k,
        ),
        "base_generator": lambda: BaseGenerator(model, max_new_tokens=config.base_generator_max_new_tokens),
    }
    return [make[name]() for name in config.tools]


def _seed(seed: int | None, step: int, phase: int) -> int | None:
    return None if seed is None else (seed * 1_000_003 + step * 101 + phase) % (1 << 62)


REQUEST_ROLES = ("planner", "executor", "verifier", "generator", "base_generator")


def request_seed(seed: int | None, trajectory: int, turn: int, role: str) -> int | None:
    """The seed of one request: a function of (run seed, trajectory index, turn, role) only, so it does
    not depend on the order in which a schedule submits requests. The generator's turn is 0."""
    if seed is None:
        return None
    return (seed * 1_000_003 + trajectory * 10_007 + turn * 101 + REQUEST_ROLES.index(role)) % (1 << 62)


def resolve_schedule(config: AgentConfig, models: RoleModels, tools: Sequence[Tool]) -> str:
    """The schedule that runs: `config.schedule`, with "auto" = continuous iff every model involved streams."""
    involved = [models.of(r) for r in ("planner", "executor", "verifier", "generator")]
    involved += [getattr(t.engine, "engine", t.engine) for t in tools if isinstance(t, BaseGenerator)]
    streaming = all(isinstance(m, StreamingLanguageModel) for m in involved)
    if config.schedule == "continuous" and not streaming:
        raise ValueError(
            "schedule='continuous' needs every role's model to implement StreamingLanguageModel "
            "(submit/step/num_pending); use schedule='lockstep' or 'auto' for this model"
        )
    if config.schedule == "lockstep":
        return "lockstep"
    return "continuous" if streaming else "lockstep"


@dataclass
class TrajectoryState:
    """One running trajectory, in either schedule: the record, its query, its memory, why it stopped."""

    traj: Trajectory
    query: Query
    memory: Memory
    stop: str | None = None


def start_states(
    queries: Sequence[Query], group_size: int, analyses: dict[str, str], cls: type = TrajectoryState
) -> list[Any]:
    """`group_size` fresh states per query, in query order; `analyses`: the query analysis per question."""
    return [
        cls(
            Trajectory(query_id=q.id, group_index=g, query=q.question, gold=q.answer, source=q.source),
            q,
            Memory(query=q.question, analysis=analyses.get(q.question, "")),
        )
        for q in queries
        for g in range(group_size)
    ]


def open_turn(s: TrajectoryState, prompt_ids: Sequence[int], g: Generation, action: PlannerAction) -> Turn:
    """Record one planner call (prompt, response, sampling log-probs, parsed action) as the trajectory's next turn."""
    turn = Turn(
        prompt_ids=list(prompt_ids),
        response_ids=list(g.token_ids),
        response_logprobs=[float(x) for x in g.logprobs],
        valid=action.valid,
        tool=action.tool,
        sub_goal=action.sub_goal,
    )
    s.traj.turns.append(turn)
    return turn


def close_turn(
    s: TrajectoryState,
    turn: Turn,
    action: PlannerAction,
    config: AgentConfig,
    command: str = "",
    result: ToolResult | None = None,
) -> None:
    """A valid action's command and tool result (truncated to `tool_result_chars`), or an invalid action's
    parse error, into the turn and, as one step, into the trajectory's memory."""
    if not action.valid:
        turn.tool_result = f"invalid planner output: {action.error}"
        s.memory.steps.append(Step(False, action.sub_goal, action.tool, error=action.error))
        return
    assert result is not None, "a valid action's turn closes with its tool result"
    text = truncate(result.text, config.tool_result_chars)
    turn.command, turn.tool_result = command, text
    s.memory.steps.append(Step(True, action.sub_goal, action.tool, command, text, result.ok))


def score(states: Sequence[TrajectoryState], judge: LLMJudge | RuleJudge, timer: Timer) -> None:
    """The judge's reward (the `reward` phase), the stop reason and the memory into every trajectory."""
    with timer.phase("reward"):
        rewards = judge.score([s.query for s in states], [s.traj.answer for s in states])
    for s, r in zip(states, rewards):
        s.traj.reward = float(r)
        assert s.stop is not None, "every trajectory leaves the loop with a stop reason"
        s.traj.stop_reason = s.stop
        s.traj.memory = s.memory


def run_trajectories(
    models: RoleModels | LanguageModel,
    queries: Sequence[Query],
    group_size: int,
    config: AgentConfig = AgentConfig(),
    *,
    seed: int | None = None,
    tools: Sequence[Tool] | None = None,
    timer: Timer = NO_TIMER,
) -> RolloutResult:
    """Run `group_size` trajectories for every query; see the module docstring."""
    if not isinstance(models, RoleModels):
        models = RoleModels(planner=models)
    if not queries:
        raise ValueError("run_trajectories got no queries; pass at least one Query")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    counters: dict[str, float] = {}
    if tools is None:
        tools = build_tools(config, Caller(models.of("executor"), "base_generator", counters))
    tools = list(tools)
    by_name = {t.name: t for t in tools}
    budget = config.context_budget
    schedule = resolve_schedule(config, models, tools)

    def role(name: str, modes: dict, mode: str, max_new_tokens: int) -> Any:
        return modes[mode](Caller(models.of(name), name, counters), budget, max_new_tokens)

    planner = Planner(Caller(models.planner, "planner", counters), tools, config.planner_format)
    executor = role("executor", EXECUTORS, config.executor, config.executor_max_new_tokens)
    verifier = role("verifier", VERIFIERS, config.verifier, config.verifier_max_new_tokens)
    generator = role("generator", GENERATORS, config.generator, config.generator_max_new_tokens)
    if config.judge == "llm":
        judge: LLMJudge | RuleJudge = LLMJudge(
            Caller(models.of("judge"), "judge", counters), config.judge_max_new_tokens, counters=counters
        )
    else:
        judge = RuleJudge()
    planner_sampling = dict(
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        allowed_token_ids=planner.allowed_token_ids,
    )
    analyses: dict[str, str] = {}  # one query analysis per distinct question, before any trajectory starts
    if planner.needs_analysis:
        with timer.span("analysis"):
            analyzer = QueryAnalyzer(
                Caller(models.of("analysis"), "analysis", counters), budget, config.analysis_max_new_tokens, tools
            )
            analyses = analyzer.analyze([q.question for q in queries], _seed(seed, 0, 4))
    if schedule == "continuous":
        from agentflow.scheduler import Agents, run_continuous

        agents = Agents(planner, executor, verifier, generator, judge, by_name, planner_sampling)
        return run_continuous(agents, queries, group_size, config, seed=seed, timer=timer, analyses=analyses)

    states: list[TrajectoryState] = start_states(queries, group_size, analyses)
    index = {id(s): k for k, s in enumerate(states)}
    live = list(states)
    step = 0
    with cf.ThreadPoolExecutor(max_workers=config.tool_workers) as pool:
        while live:
            step += 1
            # 1. planner: one batched call for every live trajectory that fits the budget
            with timer.span("planner"):
                asking: list[tuple[TrajectoryState, list[int]]] = []
                for s in live:
                    ids = planner.prompt_ids(s.memory)
                    if len(ids) + config.planner_max_new_tokens > budget:
                        s.stop = "context_budget"
                    else:
                        asking.append((s, ids))
                acted: list[tuple[TrajectoryState, Turn, PlannerAction]] = []
                if asking:
                    sampling = planner.caller.sampling(
                        config.planner_max_new_tokens, seed=_seed(seed, step, 0), **planner_sampling
                    )
                    seeds = [request_seed(seed, index[id(s)], step, "planner") for s, _ in asking]
                    gens = planner.caller.generate([ids for _, ids in asking], sampling, seeds)
                    for (s, ids), g in zip(asking, gens):
                        action = planner.parse(g, s.memory)
                        acted.append((s, open_turn(s, ids, g, action), action))

            # 2. executor: commands for the valid actions
            with timer.span("executor"):
                valid = [(s, turn, a) for s, turn, a in acted if a.valid]
                commands = executor.commands(
                    [(s.memory, by_name[a.tool], a.task) for s, _, a in valid],
                    _seed(seed, step, 1),
                    [request_seed(seed, index[id(s)], step, "executor") for s, _, _ in valid],
                )

            # 3. tools: every call of this step together
            with timer.span("tools"):
                runnable = [i for i, (_, err) in enumerate(commands) if not err]
                results = run_tool_calls(
                    [(by_name[valid[i][2].tool], commands[i][0]) for i in runnable], pool, config.tool_timeout_s
                )
                outcome = {i: error(err) for i, (_, err) in enumerate(commands) if err}
                outcome.update(zip(runnable, results))
                for i, (s, turn, a) in enumerate(valid):
                    close_turn(s, turn, a, config, commands[i][0], outcome[i])
                for s, turn, a in acted:
                    if not a.valid:
                        close_turn(s, turn, a, config)

            # 4. verifier, or the turn limit
            with timer.span("verifier"):
                if step >= config.max_turns:
                    for s, _, _ in acted:
                        s.stop = "max_turns"
                elif acted:
                    verdicts = verifier.decide(
                        [s.memory for s, _, _ in acted],
                        _seed(seed, step, 2),
                        [request_seed(seed, index[id(s)], step, "verifier") for s, _, _ in acted],
                    )
                    for (s, _, _), v in zip(acted, verdicts):
                        s.memory.steps[-1].verdict = v
                        if v == "STOP":
                            s.stop = "verifier"
            live = [s for s in live if s.stop is None]

    # generator: every final answer in one batched call
    with timer.span("generator"):
        answers = generator.answers(
            [s.memory for s in states],
            _seed(seed, step + 1, 3),
            [request_seed(seed, k, 0, "generator") for k in range(len(states))],
        )
        for s, (raw, answer) in zip(states, answers):
            s.memory.final_output = raw
            s.traj.answer = answer

    score(states, judge, timer)
    return RolloutResult([s.traj for s in states], counters, step, schedule="lockstep")
