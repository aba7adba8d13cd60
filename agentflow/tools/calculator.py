"""Calculator: exact arithmetic on a parsed expression tree, never `eval`.

The expression is parsed with `ast.parse(mode="eval")` and walked; only number literals, the
operators + - * / // % ** (and `^` as power), unary +/-, parentheses and the functions abs, round,
min, max, sqrt are accepted. Arithmetic is exact on `Fraction`s (so 8 / (3 - 8 / 3) is exactly 24);
sqrt and non-integer powers fall back to floats. Sizes are bounded (expression length, nesting
depth, bits of every intermediate result) so no input can hang or exhaust memory.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from fractions import Fraction

from agentflow.tools.base import Tool, ToolResult, error

MAX_CHARS = 400
MAX_DEPTH = 40
MAX_BITS = 4096

Number = Fraction | float


class CalcError(ValueError):
    """An expression the calculator rejects; the message is shown to the planner."""


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def _check_size(v: Number) -> Number:
    if isinstance(v, Fraction):
        if v.numerator.bit_length() > MAX_BITS or v.denominator.bit_length() > MAX_BITS:
            raise CalcError(f"result too large (more than {MAX_BITS} bits)")
    elif not math.isfinite(v):
        raise CalcError("result is not a finite number")
    return v


def _pow(a: Number, b: Number) -> Number:
    if isinstance(b, Fraction) and b.denominator == 1 and isinstance(a, Fraction):
        e = b.numerator
        bits = max(a.numerator.bit_length(), a.denominator.bit_length())
        if abs(e) * bits > MAX_BITS:
            raise CalcError(f"power too large (more than {MAX_BITS} bits)")
        if a == 0 and e < 0:
            raise CalcError("division by zero")
        return a**e
    try:
        r = float(a) ** float(b)
    except (OverflowError, ZeroDivisionError) as e:
        raise CalcError(f"power failed: {e}") from None
    if isinstance(r, complex):
        raise CalcError("power of a negative number to a fractional exponent is not real")
    return r


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise CalcError("sqrt of a negative number")
    if isinstance(x, Fraction):
        n, d = math.isqrt(x.numerator), math.isqrt(x.denominator)
        if n * n == x.numerator and d * d == x.denominator:
            return Fraction(n, d)
    return math.sqrt(float(x))


def _round(x: Number, nd: Number | None = None) -> Number:
    if nd is None:
        return Fraction(round(x))
    if not (isinstance(nd, Fraction) and nd.denominator == 1 and abs(nd) <= 100):
        raise CalcError("round's second argument must be a small integer")
    return round(x, int(nd))


_FUNCS = {"abs": (abs, 1, 1), "round": (_round, 1, 2), "min": (min, 1, 32), "max": (max, 1, 32), "sqrt": (_sqrt, 1, 1)}


def _eval(node: ast.AST, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise CalcError(f"expression nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Expression):
        return _eval(node.body, depth + 1)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise CalcError("a number literal is not a finite number")
        return _check_size(Fraction(node.value) if isinstance(node.value, int) else Fraction(repr(node.value)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand, depth + 1)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _check_size(_pow(a, b))
        fn = _BINOPS.get(type(node.op))
        if fn is None:
            raise CalcError(f"operator {type(node.op).__name__} is not supported")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise CalcError("division by zero")
        return _check_size(fn(a, b))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        spec = _FUNCS.get(node.func.id)
        if spec is None:
            raise CalcError(f"unknown function {node.func.id!r} (available: {', '.join(_FUNCS)})")
        fn, lo, hi = spec
        if not lo <= len(node.args) <= hi:
            raise CalcError(f"{node.func.id} takes {lo}..{hi} arguments, got {len(node.args)}")
        return _check_size(fn(*[_eval(a, depth + 1) for a in node.args]))
    if isinstance(node, ast.Call):
        raise CalcError(f"only {', '.join(_FUNCS)} can be called, with positional arguments")
    if isinstance(node, ast.Name):
        raise CalcError(f"unknown name {node.id!r}: the calculator takes numbers only")
    raise CalcError(f"unsupported syntax ({type(node).__name__}); use numbers, + - * / ** and parentheses")


def parse_expression(expr: str) -> ast.Expression:
    """Parse an arithmetic expression (`^` means power); raises CalcError with the reason."""
    text = expr.strip()
    if not text:
        raise CalcError("empty expression")
    if len(text) > MAX_CHARS:
        raise CalcError(f"expression longer than {MAX_CHARS} characters")
    try:
        return ast.parse(text.replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise CalcError(f"invalid expression ({e.msg})") from None


def evaluate(expr: str) -> Number:
    """Evaluate an expression exactly (a Fraction) where possible, else as a float."""
    try:
        return _eval(parse_expression(expr), 0)
    except (OverflowError, ValueError, TypeError, ZeroDivisionError) as e:
        if isinstance(e, CalcError):
            raise
        raise CalcError(str(e)) from None


def format_number(v: Number) -> str:
    """Integers exactly, other values to 12 significant digits."""
    if isinstance(v, Fraction) and v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.12g}"


_EXPR_RE = re.compile(r"[\d(][\d\s.+\-*/%^()]*")


def extract_expression(text: str) -> str | None:
    """The longest span of `text` that parses as an arithmetic expression with an operator."""
    best = None
    for m in _EXPR_RE.finditer(text):
        cand = m.group(0).strip().rstrip(".").strip()
        while cand and cand.count("(") < cand.count(")") and cand.endswith(")"):
            cand = cand[:-1].rstrip()
        if not any(op in cand for op in "+-*/%^") or not any(c.isdigit() for c in cand):
            continue
        try:
            evaluate(cand)
        except CalcError:
            continue
        if best is None or len(cand) > len(best):
            best = cand
    return best


class Calculator(Tool):
    name = "calculator"
    description = "evaluates an arithmetic expression exactly, e.g. (3 + 4) * 5 / 2"
    command_format = "one arithmetic expression using numbers, + - * / ** and parentheses"

    def command_from(self, sub_goal: str, query: str) -> str:
        """The longest arithmetic expression in the sub-goal, else in the query, else the sub-goal."""
        return extract_expression(sub_goal) or extract_expression(query) or sub_goal.strip()

    def run(self, command: str) -> ToolResult:
        try:
            return ToolResult(True, format_number(evaluate(command)))
        except CalcError as e:
            return error(str(e))
