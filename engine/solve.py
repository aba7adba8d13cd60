"""`flowgrpo solve`: run the four-agent loop on a task set and write the trajectories as JSON.

    flowgrpo solve --model DIR --task arithmetic --num-queries 4 --group-size 4 --json OUT.json

The JSON file is a list of trajectories (`query_id`, `group_index`, `query`, `gold`, `answer`,
`reward`, `stop_reason`, `turns` with `prompt_ids`, `response_ids`, `response_logprobs`, `valid`,
`tool`, `sub_goal`, `command`, `tool_result`, and the full `memory`), written atomically (temporary
file + rename). A short summary (success rate, turns per trajectory, tokens, time per role) goes
to stdout. The engine comes from `engine.build.build_engine`, the clock is `engine.timer.PhaseTimer`.
`add_agent_arguments`, `agent_config` and `build_cli_engine` serve `flowgrpo eval` too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from agentflow.runner import AGENT_MODES, AgentConfig, RolloutResult, run_trajectories
from agentflow.tasks import TASKS, load_queries, load_task
from agentflow.tools import TOOL_NAMES
from engine.fsio import atomic_write_json
from engine.timer import PhaseTimer, Timings


class CliEngine(NamedTuple):
    engine: Any
    model_dir: Path
    kind: str  # "embedded" | "vllm"
    why: str  # how the kind was chosen (`engine.build.choose_engine`)


def add_agent_arguments(p: argparse.ArgumentParser, *, max_turns: int, engines: Sequence[str]) -> None:
    """The arguments `flowgrpo solve` and `flowgrpo eval` share: the model, its engine, the agent loop."""
    d = AgentConfig()
    p.add_argument("--model", required=True, help="local HF model directory (e.g. from `flowgrpo make-tiny`)")
    p.add_argument("--max-turns", type=int, default=max_turns, help=f"planner turns per query (default {max_turns})")
    p.add_argument("--planner-max-new-tokens", type=int, default=d.planner_max_new_tokens)
    p.add_argument(
        "--context-budget", type=int, default=d.context_budget, help="tokens per engine call (prompt + response)"
    )
    for role in ("executor", "verifier", "generator"):
        p.add_argument(f"--{role}", choices=AGENT_MODES, default=getattr(d, role), help=f"{role}: LLM or rule-based")
    p.add_argument("--judge", choices=AGENT_MODES, default=d.judge, help="each query's rule judge, or an LLM judge")
    p.add_argument("--tools", default=",".join(d.tools), help=f"comma-separated subset of {','.join(TOOL_NAMES)}")
    p.add_argument("--engine", choices=engines, default=engines[0])
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="embedded engine device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling (and solve's task generator)")


def agent_config(args: argparse.Namespace, **fields: Any) -> AgentConfig:
    """The AgentConfig of `add_agent_arguments`'s flags, plus the command's own `fields`."""
    return AgentConfig(
        max_turns=args.max_turns,
        planner_max_new_tokens=args.planner_max_new_tokens,
        context_budget=args.context_budget,
        executor=args.executor,
        verifier=args.verifier,
        generator=args.generator,
        judge=args.judge,
        tools=tuple(t.strip() for t in args.tools.split(",") if t.strip()),
        **fields,
    )


def build_cli_engine(args: argparse.Namespace) -> CliEngine:
    """Check `--model` and `--device` (one-line `UsageError`), choose the engine and build it on the model."""
    from engine.build import build_engine, choose_engine
    from engine.preflight import check_device, check_model_dir
    from engine.presets import RolloutConfig

    model_dir = check_model_dir(args.model)
    check_device(args.device)
    kind, why = choose_engine(args.engine, model_dir)
    engine = build_engine(
        kind,
        RolloutConfig(engine=kind),
        model_dir=model_dir,
        dtype=args.dtype,
        seed=args.seed,
        max_model_len=args.context_budget,
        device=args.device,
    )
    return CliEngine(engine, model_dir, kind, why)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_agent_arguments(p, max_turns=AgentConfig().max_turns, engines=("embedded", "vllm"))
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--task", choices=sorted(TASKS), default="arithmetic", help="built-in task set (default arithmetic)"
    )
    src.add_argument("--data", help="a .jsonl, .parquet or benchmark .json file instead of a built-in task")
    p.add_argument("--num-queries", type=int, default=4, help="queries to run (the first N of --data)")
    p.add_argument("--group-size", type=int, default=4, help="trajectories per query (G)")
    p.add_argument("--temperature", type=float, default=AgentConfig().temperature, help="planner sampling temperature")
    p.add_argument("--json", dest="json_out", help="write the trajectories to this file")


def format_summary(result: RolloutResult, timings: Timings, args: argparse.Namespace) -> str:
    s = result.summary()
    c = s["counters"]
    parts = {**timings.spans, "reward": timings.phases.get("reward", 0.0)}
    phases = "  ".join(f"{k} {v:.2f}s" for k, v in parts.items())
    calls = "  ".join(
        f"{p} {int(c.get(f'{p}_calls', 0))}" for p in ("planner", "executor", "verifier", "generator", "judge")
    )
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["stop_reasons"].items()))
    return "\n".join(
        [
            f"solve: {s['trajectories']} trajectories ({args.num_queries} queries x G={args.group_size}), engine {args.engine}",
            f"success rate {s['success_rate']:.3f}   turns/trajectory {s['turns_per_trajectory']:.2f}   "
            f"invalid actions {s['invalid_action_rate']:.1%}   loop steps {s['loop_steps']}",
            f"planner tokens: prompt {s['planner_prompt_tokens']}  response {s['planner_response_tokens']}",
            f"stop reasons: {reasons}",
            f"generate calls: {calls}",
            f"time: total {sum(timings.phases.values()):.2f}s  {phases}",
        ]
    )


def main(args: argparse.Namespace) -> int:
    try:
        if args.num_queries < 1 or args.group_size < 1:
            raise ValueError("--num-queries and --group-size must be >= 1")
        if args.data:
            queries = load_queries(args.data)[: args.num_queries]
        else:
            queries = load_task(args.task, args.num_queries, args.seed)
        config = agent_config(args, temperature=args.temperature)
        engine = build_cli_engine(args).engine
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"flowgrpo solve: error: {e}", file=sys.stderr)
        return 2
    timer = PhaseTimer(getattr(engine, "device", None))
    with timer.phase("gen"):
        result = run_trajectories(engine, queries, args.group_size, config, seed=args.seed, timer=timer)
    if args.json_out:
        atomic_write_json(args.json_out, [tr.to_dict() for tr in result.trajectories])
    print(format_summary(result, timer.collect(), args))
    if args.json_out:
        print(f"wrote {len(result.trajectories)} trajectories to {args.json_out}")
    return 0
