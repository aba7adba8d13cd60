"""`flowgrpo eval`: the Wilson interval, the per-benchmark table (scripted agents that solve a known
share), and the command end to end on the shipped benchmarks with the real tiny model."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from agentflow_fakes import ScriptedEngine

from agentflow import AgentConfig, Query, RoleModels
from engine.eval import evaluate, format_table, load_benchmarks, wilson_interval

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tests" / "data" / "bench"
Z = 1.959963984540054


def _score_bound(k: int, n: int, upper: bool) -> float:
    """The p where |k/n - p| = z·sqrt(p(1-p)/n) on one side of k/n, by bisection in float64."""
    f = lambda p: abs(k / n - p) - Z * math.sqrt(p * (1 - p) / n)
    lo, hi = (k / n, 1.0) if upper else (0.0, k / n)
    if f(hi if upper else lo) <= 0:  # the bound is the end of [0, 1]
        return hi if upper else lo
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = f(mid) <= 0
        lo, hi = (mid, hi) if inside == upper else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize(("k", "n"), [(0, 3), (3, 3), (1, 7), (50, 125), (299, 300), (81, 263)])
def test_wilson_interval_solves_the_score_equation(k, n):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(_score_bound(k, n, False), abs=1e-12)
    assert hi == pytest.approx(_score_bound(k, n, True), abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _solver(role: str, text: str) -> str:
    """Solves `What is a + b?` with the calculator unless a + b is odd (then answers a + b + 1)."""
    a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", text).groups())
    if role == "planner":
        return f"Tool: calculator\nSub-goal: add {a} and {b}"
    if role == "executor":
        return f"Command: {a} + {b}"
    if role == "verifier":
        return "STOP"
    if role == "generator":
        return f"<answer>{a + b + (a + b) % 2}</answer>"
    raise AssertionError(role)


def test_evaluate_scores_each_benchmark_and_pools_them():
    engine = ScriptedEngine(_solver)
    benches = {
        "even": [Query(f"e{i}", f"What is {i} + {i}?", str(2 * i), source="even") for i in range(5)],
        "mixed": [Query(f"m{i}", f"What is {i} + 1?", str(i + 1), source="mixed") for i in range(4)],
    }
    cfg = AgentConfig(max_turns=10, temperature=0.0)
    rows, trajs = evaluate(RoleModels(planner=engine), benches, cfg, batch_size=3)
    even, mixed, pooled = rows
    assert (even.name, even.n, even.accuracy) == ("even", 5, 1.0)
    assert (mixed.n, mixed.correct) == (4, 2)  # i + 1 is even for i = 1, 3
    assert (pooled.name, pooled.n, pooled.correct) == ("all", 9, 7)
    assert pooled.ci_low == pytest.approx(wilson_interval(7, 9)[0])
    assert even.tool_calls == {"calculator": 5} and even.tool_errors == 0 and even.turns_mean == 1.0
    assert even.stop_reasons == {"verifier": 5}
    assert [len(c.prompts) for c in engine.calls_of("planner")] == [3, 2, 3, 1]  # batches of 3 per benchmark
    assert all(c.sampling.temperature == 0.0 for c in engine.calls)
    assert [t.query_id for t in trajs["mixed"]] == ["m0", "m1", "m2", "m3"]
    table = format_table(rows).splitlines()
    assert table[0].split()[:4] == ["benchmark", "n", "accuracy", "95%"]
    assert table[2].split()[:3] == ["mixed", "4", "0.500"] and "calculator 4 (0)" in table[2]


def test_benchmarks_are_named_by_their_source():
    benches = load_benchmarks([str(BENCH / "aime_mini"), str(BENCH / "aime_mini" / "data" / "data.json")], None, 2)
    assert list(benches) == ["aime_mini", "aime_mini'"] and all(len(q) == 2 for q in benches.values())


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "eval", *args]


def test_eval_cli_on_the_shipped_benchmarks(tiny_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = ["--model", tiny_model_dir, "--engine", "embedded", "--max-turns", "1", "--limit", "2"]
    args += ["--planner-max-new-tokens", "8", "--context-budget", "1024", "--json", str(out)]
    args += ["--executor", "rule", "--verifier", "rule", "--generator", "rule"]
    benches = [str(BENCH / b) for b in ("bamboogle_mini", "gameof24_mini", "aime_mini")]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(_cli(*benches, *args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "greedy, max turns 1" in lines[0] and "6 queries in 3 benchmark(s)" in lines[0]
    names = [ln.split()[0] for ln in lines[2:6]]
    assert names == ["bamboogle_mini", "gameof24_mini", "aime_mini", "all"]
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["table"]] == names and data["agent"]["temperature"] == 0.0
    assert {k: len(v) for k, v in data["trajectories"].items()} == dict.fromkeys(names[:3], 2)
    g24 = data["trajectories"]["gameof24_mini"][0]
    assert g24["source"] == "gameof24_mini" and g24["query"].startswith("Using the numbers [1, 1, 1, 8]")
    for row in data["table"]:
        assert 0.0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1.0 and row["turns_mean"] == 1.0
    # a bad benchmark file is refused before the model is loaded, in one line
    bad = tmp_path / "bad" / "data"
    bad.mkdir(parents=True)
    (bad / "data.json").write_text('[{"query": "q"}]')
    run = subprocess.run(_cli(str(bad.parent), *args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert re.fullmatch(r"flowgrpo eval: error: .*data.json: record 0: missing field 'answer'.*\n", run.stderr)
