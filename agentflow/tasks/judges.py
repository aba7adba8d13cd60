"""Rule-based judges (0 or 1) and an optional LLM judge.

- `exact`: normalised exact match (lower case, no punctuation, no articles a/an/the, single spaces).
- `numeric`: both sides parse as one number (integers, decimals, `a/b`, thousands separators, a
  leading `=`/`$` and a trailing `.` are accepted; prose around the number is not) and agree to a
  relative tolerance of 1e-6 (exactly, for integers and fractions).
- `game24`: the answer is an expression (an optional trailing `= 24` is allowed) that uses each of
  the query's four numbers exactly once, only + - * / and parentheses, and evaluates exactly to 24.
- `auto`: `numeric` when the gold answer is a number, else `exact`.
- `contains`: the normalised gold occurs in the normalised answer as a run of whole words (for
  answers that are a retrieved passage, e.g. the toy task's search questions).
- `LLMJudge`: asks an engine "is the candidate correct?" for many answers in one batched call and
  reads the first yes/no word of each reply; an unparseable reply scores 0.

A missing answer (the generator wrote no <answer> tags) scores 0 under every judge.
"""

from __future__ import annotations

import ast
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


def _judge_game24(answer: str | None, q: Query) -> float:
    return game24_check(answer, q.meta["numbers"])


def _judge_auto(answer: str | None, q: Query) -> float:
    return numeric_match(answer, q.answer) if parse_number(q.answer) is not None else exact_match(answer, q.answer)


JUDGES: dict[str, Callable[[str | None, Query], float]] = {
    "exact": lambda a, q: exact_match(a, q.answer),
    "numeric": lambda a, q: numeric_match(a, q.answer),
    "game24": _judge_game24,
    "auto": _judge_auto,
    "contains": lambda a, q: contains_match(a, q.answer),
}


def rule_reward(answer: str | None, query: Query) -> float:
    """The reward of `answer` under the query's rule-based judge."""
    if query.judge not in JUDGES:
        raise ValueError(f"query {query.id}: unknown judge {query.judge!r}; use one of {sorted(JUDGES)}")
    return JUDGES[query.judge](answer, query)


_VERDICT = re.compile(r"\b(yes|no|correct|incorrect)\b", re.I)


def parse_yes_no(text: str) -> float | None:
    """1 for yes/correct, 0 for no/incorrect (the first such word wins), None if there is none."""
    m = _VERDICT.search(text)
    if m is None:
        return None
    return 1.0 if m.group(1).lower() in ("yes", "correct") else 0.0


class LLMJudge:
    """Scores answers by asking `engine`; one batched `generate` per `score` call, greedy."""

    SYSTEM = "You grade answers. Reply with one word: yes if the candidate answer is correct, no otherwise."

    def __init__(self, engine: LanguageModel, max_new_tokens: int = 8) -> None:
        self.engine = engine
        self.max_new_tokens = max_new_tokens

    def score(self, queries: Sequence[Query], answers: Sequence[str | None]) -> list[float]:
        if len(queries) != len(answers):
            raise ValueError(f"{len(queries)} queries but {len(answers)} answers")
        todo = [i for i, a in enumerate(answers) if a is not None]
        out = [0.0] * len(answers)
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
                        "content": f"Question: {queries[i].question}\nReference answer: {queries[i].answer}\n"
                        f"Candidate answer: {answers[i]}\nIs the candidate answer correct?",
                    },
                ],
            )
            for i in todo
        ]
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0, stop_token_ids=stop_ids(tok))
        for i, g in zip(todo, self.engine.generate(prompts, sampling)):
            out[i] = parse_yes_no(g.text) or 0.0
        return out


class RuleJudge:
    """Scores each answer with its query's rule-based judge (`JUDGES`); no model call."""

    def score(self, queries: Sequence[Query], answers: Sequence[str | None]) -> list[float]:
        return [rule_reward(a, q) for q, a in zip(queries, answers, strict=True)]
