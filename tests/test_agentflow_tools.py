"""Calculator, BM25 search, the base-generator tool and the parallel tool runner."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from fractions import Fraction

import pytest
from agentflow_fakes import ScriptedEngine

from agentflow.tools import BM25, BaseGenerator, Calculator, Search, Tool, ToolResult, run_tool_calls, truncate
from agentflow.tools.calculator import CalcError, evaluate, extract_expression
from agentflow.tools.search import default_index


@pytest.mark.parametrize(
    ("expr", "out"),
    [
        ("2 + 3 * 4", "14"),
        ("(17 + 5) * 3 - 8", "58"),
        ("8 / (3 - 8 / 3)", "24"),  # exact with fractions, 23.999999999999996 with floats
        ("1 / 3", "0.333333333333"),
        ("2 ^ 10", "1024"),
        ("-(4 - 10) // 4", "1"),
        ("7 % 3", "1"),
        ("sqrt(16) + abs(-2) + max(1, 5) + round(2.6)", "14"),
        ("0.1 + 0.2", "0.3"),
        ("1.5e3 / 3", "500"),
    ],
)
def test_calculator_evaluates_exactly(expr, out):
    r = Calculator().run(expr)
    assert r.ok and r.text == out


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        ("1 / 0", "division by zero"),
        ("__import__('os').system('echo hi')", "can be called"),
        ("__import__('os')", "unknown function '__import__'"),
        ("().__class__", "unsupported syntax (Attribute)"),
        ("x + 1", "unknown name 'x'"),
        ("round(2.5, ndigits=1)", "can be called"),
        ("2 ** 100000", "too large"),
        ("9 ** 9 ** 9", "too large"),
        ("-" * 60 + "1", "nested deeper"),
        ("1 +", "invalid expression"),
        ("", "empty expression"),
        ("sqrt(-1)", "negative"),
        ("1e400", "not a finite number"),
        ("[1, 2]", "unsupported syntax"),
        ("1 if 1 else 2", "unsupported syntax"),
        ("1" * 500, "longer than"),
    ],
)
def test_calculator_rejects_with_a_clean_error(expr, reason):
    r = Calculator().run(expr)
    assert not r.ok and r.text.startswith("error: ") and reason in r.text, r.text


def test_evaluate_returns_fractions():
    assert evaluate("1/3 + 1/6") == Fraction(1, 2)
    with pytest.raises(CalcError):
        evaluate("open('x')")


def test_calculator_rule_command_extracts_the_expression():
    calc = Calculator()
    assert extract_expression("Compute (17 + 5) * 3 - 8.") == "(17 + 5) * 3 - 8"
    assert extract_expression("no numbers here") is None
    assert calc.command_from("compute the sum", "What is 12 * (3 + 4)?") == "12 * (3 + 4)"
    assert calc.command_from("evaluate 2 ^ 5 now", "What is 1 + 1?") == "2 ^ 5"
    assert calc.run(calc.command_from("multiply", "Evaluate ((26 + 3) * 23) + 20.")).text == "687"


def test_bm25_ranks_by_term_rarity_and_is_deterministic():
    passages = [
        {"id": "a", "title": "Apple", "text": "apple apple fruit"},
        {"id": "b", "title": "Banana", "text": "banana fruit"},
        {"id": "c", "title": "Cherry", "text": "cherry fruit red"},
    ]
    idx = BM25(passages)
    assert [p["id"] for _, p in idx.search("banana", 3)] == ["b"]
    assert [p["id"] for _, p in idx.search("red apple", 3)] == ["a", "c"]
    # "fruit" is in every passage: ties break by passage order, identical on every call
    assert [p["id"] for _, p in idx.search("fruit", 3)] == [p["id"] for _, p in idx.search("fruit", 3)]
    assert idx.search("durian", 3) == []
    with pytest.raises(ValueError, match="at least one passage"):
        BM25([])


def test_search_tool_over_the_shipped_corpus():
    s = Search(top_k=2)
    title = default_index().passages[1500]["title"]
    r = s.run(f"Who is {title}?")
    assert r.ok and r.text.startswith(f"[{title}] ")
    assert len(r.text.splitlines()) == 2
    miss = s.run("qqqq zzzz")
    assert not miss.ok and "no passage matches" in miss.text
    assert not s.run("   ").ok


def test_base_generator_answers_all_commands_in_one_engine_call():
    engine = ScriptedEngine(lambda role, text: "Paris" if "France" in text else "no idea")
    tool = BaseGenerator(engine, max_new_tokens=16)
    with cf.ThreadPoolExecutor(2) as pool:
        out = tool.run_batch(["Capital of France?", "Capital of Mars?", "  "], pool, 5.0)
    assert out[0] == ToolResult(True, "Paris") and out[1] == ToolResult(True, "no idea")
    assert not out[2].ok
    assert len(engine.calls) == 1 and len(engine.calls[0].prompts) == 2 and engine.calls[0].role == "base"
    assert engine.calls[0].sampling.temperature == 0.0


class _Raises(Tool):
    name = "raises"

    def run(self, command: str) -> ToolResult:
        raise RuntimeError("kaput")


class _Sleeps(Tool):
    name = "sleeps"

    def run(self, command: str) -> ToolResult:
        time.sleep(float(command))
        return ToolResult(True, "woke")


class _Barrier(Tool):
    """Succeeds only if `parties` calls are in flight at the same time."""

    name = "barrier"

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=20)

    def run(self, command: str) -> ToolResult:
        self.barrier.wait()
        return ToolResult(True, command)


def test_tool_failures_and_timeouts_become_error_text():
    calls = [(_Raises(), "x"), (_Sleeps(), "1.2"), (Calculator(), "1+1"), (_Sleeps(), "0")]
    with cf.ThreadPoolExecutor(4) as pool:
        out = run_tool_calls(calls, pool, timeout_s=0.3)
    assert out[0] == ToolResult(False, "error: raises failed: RuntimeError: kaput")
    assert out[1] == ToolResult(False, "error: sleeps timed out after 0.3 s")
    assert out[2] == ToolResult(True, "2")
    assert out[3] == ToolResult(True, "woke")


def test_tool_calls_of_many_trajectories_run_concurrently():
    tool = _Barrier(6)  # a sequential runner would wait on the barrier forever (it times out → error)
    with cf.ThreadPoolExecutor(8) as pool:
        out = run_tool_calls([(tool, str(i)) for i in range(6)], pool, timeout_s=30)
    assert [r.text for r in out] == [str(i) for i in range(6)] and all(r.ok for r in out)


def test_truncate_says_how_much_was_cut():
    assert truncate("abc", 5) == "abc"
    assert truncate("abcdefgh", 3) == "abc... [truncated 5 chars]"
