"""Rule-based judges (0 or 1) and an optional LLM judge.

- `exact`: normalised exact match (lower case, no punctuation, no articles a/an/the, single spaces).
- `numeric`: both sides parse as one number (integers, decimals, `a/b`, thousands separators, a
  leading `=`/`$` and a trailing `.` are accepted; prose around the number is not) and agree to a
  relative tolerance of 1e-6 (exactly, for integers and fractions).
- `game24`: the answer is an expression (an optional trailing `= 24` is allowed) that uses each of
  the query's four numbers exactly once, only + - * / and parentheses, and evaluates exactly to 24.
- `math`: `numeric`, else the LaTeX answers agree after `normalize_latex` (boxed/text wrappers,
  spacing and sizing commands, `$`, degree marks, a leading `x =` dropped; dfrac/tfrac read as frac),
  else both translate to sympy (fractions, roots, powers, pi, infinity, elementary functions only;
  anything else is not evaluated) and are equal: numerically to a relative 1e-6 when constant,
  by `simplify(a - b) == 0` otherwise (DeepMath's `final_answer`s). Not a full LaTeX parser: sets,
  intervals and matrices compare as normalised text.
- `auto`: `math` when the gold answer is a number or looks like LaTeX (has one of \\ ^ { } $), else `exact`.
- `contains`: the normalised gold occurs in the normalised answer as a run of whole words (for
  answers that are a retrieved passage, e.g. the toy task's search questions).
- `LLMJudge`: AgentFlow's judge: answers rule-equivalent to the gold after normalisation (numbers,
  math expressions, multiple choice) score 1 unasked; the rest go to a model in one batched call
  for a structured verdict (`<analysis>: ...`, `<true_false>: True|False`); an unparseable verdict
  scores 0 and is counted.

A query may list several acceptable answers (`Query.alternatives`, e.g. NQ's): the reward is the best
over them. A missing answer (the generator wrote no <answer> tags) scores 0 under every judge.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction

from agentflow.chat import chat_ids, stop_ids
from agentflow.lm import LanguageModel, SamplingConfig
from agentflow.tasks.query import Query
from agentflow.tools.calculator import CalcError, parse_expression

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(s: str) -> str:
    s = _ARTICLES.sub(" ", s.lower().translate(_PUNCT))
    return " ".join(s.split())


def exact_match(answer: str | None, gold: str) -> float:
    if answer is None:
        return 0.0
    return float(normalize_text(answer) == normalize_text(gold) and normalize_text(gold) != "")


def contains_match(answer: str | None, gold: str) -> float:
    if answer is None:
        return 0.0
    a, g = normalize_text(answer).split(), normalize_text(gold).split()
    if not g:
        return 0.0
    return float(any(a[i : i + len(g)] == g for i in range(len(a) - len(g) + 1)))


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def parse_number(s: str | None) -> Fraction | None:
    """One number, possibly `a/b`, with light decoration allowed; None if `s` is anything else."""
    if s is None:
        return None
    t = s.strip().replace(",", "").replace(" ", "").lstrip("=$").rstrip(".")
    if "/" in t:
        num, _, den = t.partition("/")
        a, b = parse_number(num), parse_number(den)
        return a / b if a is not None and b not in (None, 0) else None
    if not _NUMBER.fullmatch(t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def numeric_match(answer: str | None, gold: str, rel_tol: float = 1e-6) -> float:
    a, g = parse_number(answer), parse_number(gold)
    if a is None or g is None:
        return 0.0
    if a == g:
        return 1.0
    return float(abs(float(a) - float(g)) <= rel_tol * max(1.0, abs(float(g))))


def _game24_value(node: ast.AST, literals: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _game24_value(node.body, literals)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _game24_value(node.left, literals), _game24_value(node.right, literals)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if b == 0:
            raise CalcError("division by zero")
        return a / b
    raise CalcError("only integers, + - * / and parentheses are allowed")


def game24_check(answer: str | None, numbers: Sequence[int]) -> float:
    """1 if `answer` is a valid Game-of-24 solution for `numbers`, else 0."""
    if answer is None:
        return 0.0
    expr = answer.strip().replace("×", "*").replace("÷", "/").rstrip(".")
    expr = re.sub(r"=\s*24\s*$", "", expr).strip()
    try:
        literals: list[int] = []
        value = _game24_value(parse_expression(expr), literals)
    except (CalcError, RecursionError):
        return 0.0
    return float(value == 24 and Counter(literals) == Counter(int(n) for n in numbers))


_LATEX_NOISE = (r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"\ ", "$", "^\\circ", "^{\\circ}")
_LATEX_WRAPPERS = ("boxed", "text", "textbf", "mathrm", "mathbf", "operatorname")
_SYMPY_NAMES = {"sqrt", "pi", "oo", "log", "sin", "cos", "tan", "exp", "E", "I"}
_SYMPY_TEXT = re.compile(r"[0-9A-Za-z+\-*/(). ]+")


def _braced(s: str, i: int) -> tuple[str, int] | None:
    """The contents of the brace group opening at s[i] and the index after it; None if unbalanced."""
    if i >= len(s) or s[i] != "{":
        return None
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1 : j], j + 1
    return None


def _unwrap(s: str, command: str) -> str:
    """`\\command{x}` -> `x`, everywhere (nested groups kept intact)."""
    tag = "\\" + command + "{"
    while (k := s.find(tag)) >= 0:
        group = _braced(s, k + len(tag) - 1)
        if group is None:
            return s
        s = s[:k] + group[0] + s[group[1] :]
    return s


def normalize_latex(s: str) -> str:
    """A LaTeX answer without decoration: boxed/text wrappers, spacing, sizing, `$`, degree marks, a
    leading `x =`, a trailing `.`; dfrac/tfrac as frac, `\\frac12` as `\\frac{1}{2}`; no whitespace."""
    for w in _LATEX_WRAPPERS:
        s = _unwrap(s, w)
    for noise in _LATEX_NOISE:
        s = s.replace(noise, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    return re.sub(r"^[a-zA-Z]=", "", s)


def _latex_to_sympy_text(s: str) -> str | None:
    """Text sympy can parse for a simple LaTeX expression (fractions, roots, powers, pi, infinity,
    elementary functions); None for anything else."""
    for cmd in ("frac", "sqrt"):
        tag = "\\" + cmd
        while (k := s.find(tag + "{")) >= 0:
            a = _braced(s, k + len(tag))
            b = _braced(s, a[1]) if a is not None and cmd == "frac" else None
            if a is None or (cmd == "frac" and b is None):
                return None
            s = s[:k] + (f"(({a[0]})/({b[0]}))" + s[b[1] :] if b else f"sqrt({a[0]})" + s[a[1] :])
    for tex, py in (("\\pi", "pi"), ("\\infty", "oo"), ("\\cdot", "*"), ("\\times", "*"), ("\\ln", "log")):
        s = s.replace(tex, py)
    for fn in ("log", "sin", "cos", "tan", "exp"):
        s = s.replace("\\" + fn, fn)
    s = s.replace("^", "**").replace("{", "(").replace("}", ")")
    s = re.sub(r"(?<![A-Za-z])e(?![A-Za-z])", "E", s)
    if "\\" in s or not _SYMPY_TEXT.fullmatch(s):
        return None
    names = set(re.findall(r"[A-Za-z]+", s))
    if any(len(n) > 1 and n not in _SYMPY_NAMES for n in names):
        return None
    return s


def _sympy_value(s: str):
    text = _latex_to_sympy_text(s)
    if text is None or len(text) > 200:
        return None
    from sympy.parsing.sympy_parser import (
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    try:
        return parse_expr(text, transformations=(*standard_transformations, implicit_multiplication_application))
    except Exception:  # sympy raises many kinds (SyntaxError, TypeError, TokenError) on malformed input
        return None


def math_match(answer: str | None, gold: str, rel_tol: float = 1e-6) -> float:
    """1 if `answer` and the LaTeX `gold` are the same number or expression (see the module doc)."""
    if answer is None:
        return 0.0
    if numeric_match(answer, gold, rel_tol):
        return 1.0
    a, g = normalize_latex(answer), normalize_latex(gold)
    if not g:
        return 0.0
    if a == g or numeric_match(a, g, rel_tol):
        return 1.0
    va, vg = _sympy_value(a), _sympy_value(g)
    if va is None or vg is None:
        return 0.0
    try:
        if not va.free_symbols and not vg.free_symbols:
            if va == vg:
                return 1.0
            x, y = complex(va.evalf()), complex(vg.evalf())
            return float(abs(x - y) <= rel_tol * max(1.0, abs(y)))
        import sympy

        return float(sympy.simplify(va - vg) == 0)
    except (TypeError, ValueError, ArithmeticError):
        return 0.0


def _looks_like_math(gold: str) -> bool:
    return parse_number(gold) is not None or any(c in gold for c in "\\^{}$")


def _judge_game24(answer: str | None, q: Query) -> float:
    return game24_check(answer, q.meta["numbers"])


def _judge_auto(answer: str | None, q: Query) -> float:
    return math_match(answer, q.answer) if _looks_like_math(q.answer) else exact_match(answer, q.answer)


JUDGES: dict[str, Callable[[str | None, Query], float]] = {
    "exact": lambda a, q: exact_match(a, q.answer),
    "numeric": lambda a, q: numeric_match(a, q.answer),
    "math": lambda a, q: math_match(a, q.answer),
    "game24": _judge_game24,
    "auto": _judge_auto,
    "contains": lambda a, q: contains_match(a, q.answer),
}


def rule_reward(answer: str | None, query: Query) -> float:
    """The reward of `answer` under the query's rule-based judge: the best over its acceptable answers."""
    if query.judge not in JUDGES:
        raise ValueError(f"query {query.id}: unknown judge {query.judge!r}; use one of {sorted(JUDGES)}")
    judge = JUDGES[query.judge]
    best = judge(answer, query)
    for gold in query.alternatives:
        if best >= 1.0:
            break
        best = max(best, judge(answer, dataclasses.replace(query, answer=gold, alternatives=())))
    return best


_BOXED = re.compile(r"\\boxed\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_DROP = re.compile(r"\\(left|right|,|!|;|displaystyle)|\$")


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), else None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def normalize_answer(text: str) -> str:
    """The final answer in plain form: the last `\\boxed{}` if any, LaTeX fractions as a/b, `\\cdot`/`\\times`
    as *, no `$`, `\\left`/`\\right` or `\\text{}` wrappers, no trailing period, single spaces."""
    boxed = _last_boxed(text)
    t = boxed if boxed is not None else text
    t = _FRAC.sub(r"(\1)/(\2)", t)
    t = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", t)
    t = t.replace("\\cdot", "*").replace("\\times", "*").replace("×", "*").replace("÷", "/")
    t = _LATEX_DROP.sub("", t)
    return " ".join(t.split()).strip().rstrip(".").strip()


def math_value(text: str | None) -> Fraction | None:
    """The exact value of a number or arithmetic expression (`1,000`, `3/4`, `(1)/(2)`, `2*3+1`), else None."""
    if text is None:
        return None
    t = normalize_answer(text)
    n = parse_number(t)
    if n is not None:
        return n
    from agentflow.tools.calculator import evaluate

    try:
        v = evaluate(t.replace(",", ""))
    except (CalcError, RecursionError):
        return None
    return v if isinstance(v, Fraction) else Fraction(v) if isinstance(v, int) else None


_OPTION = re.compile(r"^\s*\(?([A-J])[).:]\s+(.+?)\s*$", re.M)
_LETTER = re.compile(r"^\(?([A-J])\)?$|(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-J])\)?\b", re.I)


def choice_options(question: str) -> dict[str, str]:
    """{letter: option text} of a multiple-choice question (`A) ...`, `(B) ...`, `C. ...` lines)."""
    return {m.group(1): m.group(2) for m in _OPTION.finditer(question)}


def choice_letter(answer: str | None, question: str) -> str | None:
    """The option an answer picks: a bare letter (`C`, `(C)`), "the answer is C", or an option's exact text."""
    if answer is None:
        return None
    a = normalize_answer(answer)
    m = _LETTER.search(a)
    if m and (m.group(1) or m.group(2)):
        letter = (m.group(1) or m.group(2)).upper()
        if m.group(2) or len(a) <= 3:
            return letter
    by_text = {normalize_text(v): k for k, v in choice_options(question).items()}
    return by_text.get(normalize_text(a))


def equivalent(answer: str | None, gold: str, question: str = "") -> bool:
    """Rule equivalence after normalisation: multiple choice (gold a letter and the question has options),
    numbers and arithmetic expressions (exact, or 1e-6 relative), else normalised text."""
    if answer is None:
        return False
    if re.fullmatch(r"\(?[A-J]\)?", gold.strip()) and choice_options(question):
        return choice_letter(answer, question) == gold.strip().strip("()").upper()
    g = math_value(gold)
    if g is not None:
        a = math_value(answer)
        return a is not None and (a == g or abs(float(a) - float(g)) <= 1e-6 * max(1.0, abs(float(g))))
    return exact_match(normalize_answer(answer), normalize_answer(gold)) == 1.0


_TRUE_FALSE = re.compile(r"true[_\s-]*false\W{0,6}(true|false|yes|no)\b", re.I)
_LAST_WORD = re.compile(r"(?:^|\n)\W*(true|false)\W*$", re.I)


def parse_verdict(text: str) -> float | None:
    """AgentFlow's structured verdict: 1/0 from the last `<true_false>: True|False` (also as JSON
    `"true_false": true`), else from a reply whose last line is just True/False; None if neither."""
    found = _TRUE_FALSE.findall(text)
    if found:
        return 1.0 if found[-1].lower() in ("true", "yes") else 0.0
    m = _LAST_WORD.search(text.strip())
    if m:
        return 1.0 if m.group(1).lower() == "true" else 0.0
    return None


JUDGE_PROMPT = """Decide whether the Model Response gives the same final answer as the Ground Truth.

Steps:
1. Take the final answer from the Model Response (a \\boxed{{}} value or its concluding statement), ignoring the reasoning.
2. Compare after normalising: math must be mathematically equal (1/2 equals 0.5); numbers and text ignore formatting, case, currency and units (1,000 equals 1000); for multiple choice, an option's text or position counts as its letter.
3. The verdict is True only when the two are equivalent.

Question: {question}
Model Response: {answer}
Normalised response: {normalised}
Ground Truth: {gold}

Reply in this format:
<analysis>: a brief comparison
<true_false>: True or False"""


class LLMJudge:
    """AgentFlow's LLM judge: a structured verdict (analysis, then True/False) from `engine`, batched.

    An answer that is rule-equivalent to the gold after normalisation (`equivalent`: numbers, math
    expressions, multiple choice, text) scores 1 without a model call (counted `judge_rule_matched`);
    every other non-missing answer goes into ONE greedy `generate` call per `score`. A reply without
    a parseable verdict scores 0 and is counted (`judge_unparsed`); a missing answer scores 0 unasked.
    Counts go to `counters` when given.
    """

    SYSTEM = "You grade answers: you decide whether a model's response matches the ground truth."

    def __init__(self, engine: LanguageModel, max_new_tokens: int = 256, counters: dict[str, float] | None = None):
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.counters = counters if counters is not None else {}

    def _count(self, key: str, n: int) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def score(self, queries: Sequence[Query], answers: Sequence[str | None]) -> list[float]:
        if len(queries) != len(answers):
            raise ValueError(f"{len(queries)} queries but {len(answers)} answers")
        out = [0.0] * len(answers)
        todo = []
        for i, (q, a) in enumerate(zip(queries, answers)):
            if a is not None and equivalent(a, q.answer, q.question):
                out[i] = 1.0
            elif a is not None:
                todo.append(i)
        self._count("judge_rule_matched", sum(x == 1.0 for x in out))
        self._count("judge_asked", len(todo))
        self._count("judge_unparsed", 0)
        if not todo:
            return out
        tok = self.engine.tokenizer
        prompts = [
            chat_ids(
                tok,
                [
                    {"role": "system", "content": self.SYSTEM},
                    {
                        "role": "user",
                        "content": JUDGE_PROMPT.format(
                            question=queries[i].question,
                            answer=answers[i],
                            normalised=normalize_answer(answers[i] or ""),
                            gold=queries[i].answer,
                        ),
                    },
                ],
            )
            for i in todo
        ]
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0, stop_token_ids=stop_ids(tok))
        for i, g in zip(todo, self.engine.generate(prompts, sampling)):
            v = parse_verdict(g.text)
            if v is None:
                self._count("judge_unparsed", 1)
            out[i] = v or 0.0
        return out


class RuleJudge:
    """Scores each answer with its query's rule-based judge (`JUDGES`); no model call."""

    def score(self, queries: Sequence[Query], answers: Sequence[str | None]) -> list[float]:
        return [rule_reward(a, q) for q, a in zip(queries, answers, strict=True)]
