"""`flowgrpo eval`: accuracy of the four-agent system per benchmark, as AgentFlow evaluates it.

    flowgrpo eval --model DIR test/bamboogle test/aime24 --json eval.json
    flowgrpo eval --model DIR data/val.parquet --max-turns 10 --engine vllm

Each benchmark is a directory in AgentFlow's test layout (`<bench>/data/data.json`: a list of
records with a question (`query` or `question`), an answer (a string, number or list of acceptable
answers) and an id (`pid`/`idx`)), or any task file `agentflow.tasks.data` reads (.json, .jsonl,
.parquet; the column flags apply). All files are read before the model is loaded.

The loop: one trajectory per query, every role greedy (temperature 0), at most `--max-turns`
planner turns (10, AgentFlow's `max_steps`), queries of a benchmark run `--batch-size` at a time
in lock-step (`agentflow.runner`). The judge: each query's rule judge (`agentflow.tasks.judges`),
or `--judge llm` (an LLM judge on the engine given as the `judge` role of `evaluate`; the planner's
engine when none is given).

Per benchmark it prints: n, accuracy (mean reward; the rule judges score 0 or 1) with its 95 %
Wilson score interval, planner turns per query, tool calls by tool (and how many returned an
error), invalid planner outputs, wall time; then the pooled row. `--json` writes, atomically,
the table, the configuration and every trajectory (the `flowgrpo solve` format).

Simplification: one engine serves every role (AgentFlow serves the planner from the trained
checkpoint and the other roles from a fixed model).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentflow.lm import LanguageModel
from agentflow.runner import AgentConfig, RoleModels, run_trajectories
from agentflow.tasks import DataSpec, Query, load_queries
from agentflow.tools.search import open_index
from agentflow.trajectory import Trajectory
from engine.fsio import atomic_write_json
from engine.solve import add_agent_arguments, agent_config, build_cli_engine
from engine.timer import PhaseTimer

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes <= 0 else max(0.0, center - half)  # exactly 0 and 1 at the ends (not 1e-17 off)
    hi = 1.0 if successes >= n else min(1.0, center + half)
    return lo, hi


@dataclass
class BenchResult:
    """One row of the table."""

    name: str
    n: int
    correct: float
    accuracy: float
    ci_low: float
    ci_high: float
    turns_mean: float
    tool_calls: dict[str, int] = field(default_factory=dict)
    tool_errors: int = 0
    invalid_actions: int = 0
    stop_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def of(cls, name: str, trajectories: Sequence[Trajectory], seconds: float) -> BenchResult:
        n = len(trajectories)
        correct = sum(tr.reward for tr in trajectories)
        lo, hi = wilson_interval(correct, n)
        calls: dict[str, int] = {}
        errors = invalid = 0
        stops: dict[str, int] = {}
        for tr in trajectories:
            stops[tr.stop_reason] = stops.get(tr.stop_reason, 0) + 1
            for step in tr.memory.steps if tr.memory else ():
                if not step.valid:
                    invalid += 1
                    continue
                calls[step.tool] = calls.get(step.tool, 0) + 1
                errors += not step.ok
        return cls(
            name=name,
            n=n,
            correct=correct,
            accuracy=correct / n if n else 0.0,
            ci_low=lo,
            ci_high=hi,
            turns_mean=sum(len(tr.turns) for tr in trajectories) / max(1, n),
            tool_calls=dict(sorted(calls.items())),
            tool_errors=errors,
            invalid_actions=invalid,
            stop_reasons=dict(sorted(stops.items())),
            seconds=seconds,
        )


def evaluate(
    models: RoleModels | LanguageModel,
    benchmarks: dict[str, list[Query]],
    config: AgentConfig,
    *,
    batch_size: int = 64,
    seed: int = 0,
    progress: Any = None,
) -> tuple[list[BenchResult], dict[str, list[Trajectory]]]:
    """Run every benchmark (one greedy trajectory per query) and score it; rows end with the pooled one."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows: list[BenchResult] = []
    trajectories: dict[str, list[Trajectory]] = {}
    for name, queries in benchmarks.items():
        t0 = time.perf_counter()
        done: list[Trajectory] = []
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            timer = PhaseTimer(None)
            result = run_trajectories(models, chunk, 1, config, seed=seed + start, timer=timer)
            done += result.trajectories
            if progress is not None:
                progress(name, len(done), len(queries))
        trajectories[name] = done
        rows.append(BenchResult.of(name, done, time.perf_counter() - t0))
    if len(rows) > 1:
        pooled = BenchResult.of("all", [t for ts in trajectories.values() for t in ts], sum(r.seconds for r in rows))
        rows.append(pooled)
    return rows, trajectories


def format_table(rows: Sequence[BenchResult]) -> str:
    """The per-benchmark table as aligned text."""
    head = ("benchmark", "n", "accuracy", "95% CI", "turns", "invalid", "tool calls (errors)", "time_s")
    body = []
    for r in rows:
        calls = ", ".join(f"{k} {v}" for k, v in r.tool_calls.items()) or "none"
        body.append(
            (
                r.name,
                str(r.n),
                f"{r.accuracy:.3f}",
                f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
                f"{r.turns_mean:.2f}",
                str(r.invalid_actions),
                f"{calls} ({r.tool_errors})",
                f"{r.seconds:.1f}",
            )
        )
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    line = lambda cells: "  ".join(
        c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(head), *(line(b) for b in body)])


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_agent_arguments(p, max_turns=10, engines=("auto", "embedded", "vllm"))  # AgentFlow evaluates with 10 turns
    p.add_argument("benchmarks", nargs="+", help="benchmark directories (<bench>/data/data.json) or task files")
    p.add_argument("--limit", type=int, help="only the first N queries of each benchmark")
    p.add_argument("--batch-size", type=int, default=64, help="queries run together in lock-step")
    p.add_argument("--question-key", help="column of the question (default: query, question, problem, prompt)")
    p.add_argument("--answer-key", help="column of the answer(s) (default: answer, golden_answers, result, ...)")
    p.add_argument("--id-key", help="column of the id (default: id, pid, idx)")
    p.add_argument("--answer-sep", help="split string answers into several acceptable ones at this separator")
    p.add_argument("--corpus", help="JSONL or parquet of id, title, text for the search tool (default: shipped)")
    p.add_argument("--corpus-index", help="directory of the corpus's persistent index (default <corpus>.bm25s)")
    p.add_argument("--search-top-k", type=int, default=AgentConfig().search_top_k, help="passages per search call")
    p.add_argument("--json", dest="json_out", help="write the table and every trajectory to this file")


def load_benchmarks(
    paths: Sequence[str], spec: DataSpec | None = None, limit: int | None = None
) -> dict[str, list[Query]]:
    """name -> queries for every path, in order; the name is the queries' data source (else the file stem)."""
    out: dict[str, list[Query]] = {}
    for path in paths:
        queries = load_queries(path, spec or DataSpec())[:limit]
        sources = {q.source for q in queries}
        name = sources.pop() if len(sources) == 1 else Path(path).stem
        while name in out:
            name += "'"
        out[name] = queries
    return out


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError("--limit must be >= 1")
        spec = DataSpec(args.question_key, args.answer_key, args.id_key, None, args.answer_sep)
        benchmarks = load_benchmarks(args.benchmarks, spec, args.limit)
        config = agent_config(
            args,
            temperature=0.0,
            search_corpus=args.corpus,
            search_index_dir=args.corpus_index,
            search_top_k=args.search_top_k,
        )
        if config.search_corpus and "search" in config.tools:
            index = open_index(config.search_corpus, config.search_index_dir)
            how = "loaded" if index.built_s is None else f"built in {index.built_s:.1f}s"
            print(f"search corpus {config.search_corpus}: {index.num_passages} passages, index {how}", flush=True)
        engine, model_dir, kind, why = build_cli_engine(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"flowgrpo eval: error: {e}", file=sys.stderr)
        return 2
    total = sum(map(len, benchmarks.values()))
    print(
        f"flowgrpo eval · {model_dir} · engine {kind} ({why}) · greedy, max turns {config.max_turns} · "
        f"judge {config.judge} · {total} queries in {len(benchmarks)} benchmark(s)",
        flush=True,
    )
    progress = lambda name, done, n: print(f"  {name}: {done}/{n}", file=sys.stderr, flush=True)
    rows, trajectories = evaluate(
        RoleModels(planner=engine), benchmarks, config, batch_size=args.batch_size, seed=args.seed, progress=progress
    )
    print(format_table(rows))
    if args.json_out:
        atomic_write_json(
            args.json_out,
            {
                "model": str(model_dir),
                "engine": kind,
                "agent": asdict(config),
                "table": [asdict(r) for r in rows],
                "trajectories": {k: [t.to_dict() for t in v] for k, v in trajectories.items()},
            },
        )
        print(f"wrote the table and {total} trajectories to {args.json_out}")
    return 0
