"""Multi-step arithmetic: random expression trees with 2-4 operations and an integer answer.

Leaves are integers 1..30; operators + - * /, where division is only chosen when it is exact
(the divisor is drawn from the divisors of the left value), so every intermediate value is an
integer. Every non-leaf operand is parenthesised, so the text fixes the evaluation order.
Judge: numeric equivalence.
"""

from __future__ import annotations

import random

from agentflow.tasks.query import Query

_TEMPLATES = ("What is {e}?", "Compute {e}.", "Evaluate {e}.", "Calculate the value of {e}.")


def _tree(rng: random.Random, ops: int) -> tuple[str, int]:
    if ops == 0:
        v = rng.randint(1, 30)
        return str(v), v
    left_ops = rng.randint(0, ops - 1)
    lt, lv = _tree(rng, left_ops)
    op = rng.choice("+-*/")
    if op == "/":
        divisors = [d for d in range(2, 13) if lv != 0 and lv % d == 0]
        if divisors:
            d = rng.choice(divisors)
            rt, rv = str(d), d
            # the right side of an exact division is a literal divisor; its ops are spent elsewhere
            return _wrap(lt, left_ops) + " / " + rt, lv // rv
        op = "*"
    rt, rv = _tree(rng, ops - 1 - left_ops)
    if op == "*" and abs(lv * rv) > 5000:
        op = "+"
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv}[op]
    return f"{_wrap(lt, left_ops)} {op} {_wrap(rt, ops - 1 - left_ops)}", value


def _wrap(text: str, ops: int) -> str:
    return f"({text})" if ops else text


def generate(num_queries: int, seed: int) -> list[Query]:
    rng = random.Random(seed)
    out = []
    for i in range(num_queries):
        expr, value = _tree(rng, rng.randint(2, 4))
        question = rng.choice(_TEMPLATES).format(e=expr)
        out.append(
            Query(
                id=f"arithmetic-s{seed}-{i}",
                question=question,
                answer=str(value),
                judge="numeric",
                meta={"expression": expr},
            )
        )
    return out
