"""Game of 24: four numbers 1..13 that can make 24 with + - * / and parentheses.

Numbers are drawn with the seed until the exhaustive solver (all orders, operators and bracketings,
exact fractions) finds a solution; the gold answer is one solution. Judge: `game24`, which accepts
any valid expression, not just the stored one.
"""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

from agentflow.tasks.query import Query

_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b if b != 0 else None,
}


def solve24(numbers: list[int]) -> str | None:
    """One expression over `numbers` that equals 24 exactly, or None."""

    def rec(items: list[tuple[Fraction, str]]) -> str | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == 24 else None
        for i, j in itertools.permutations(range(len(items)), 2):
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            (a, ea), (b, eb) = items[i], items[j]
            for op, fn in _OPS.items():
                v = fn(a, b)
                if v is None:
                    continue
                found = rec([*rest, (v, f"({ea} {op} {eb})")])
                if found:
                    return found
        return None

    found = rec([(Fraction(n), str(n)) for n in numbers])
    return found[1:-1] if found and found.startswith("(") and found.endswith(")") else found


def generate(num_queries: int, seed: int) -> list[Query]:
    rng = random.Random(seed)
    out = []
    while len(out) < num_queries:
        numbers = sorted(rng.randint(1, 13) for _ in range(4))
        solution = solve24(numbers)
        if solution is None:
            continue
        a, b, c, d = numbers
        question = (
            f"Use the numbers {a}, {b}, {c} and {d} with +, -, *, / and parentheses to make 24. "
            "Use each number exactly once and give the expression."
        )
        out.append(
            Query(
                id=f"game24-s{seed}-{len(out)}",
                question=question,
                answer=solution,
                judge="game24",
                meta={"numbers": numbers},
            )
        )
    return out
