"""Tool choice: queries whose right tool is fixed by the query (the `toy` training preset's task).

Three kinds of query, one per tool, in equal numbers (a seeded shuffle decides the order):

- calculator: an arithmetic expression from `agentflow.tasks.arithmetic` ("What is (3 + 4) * 5?"),
  judge `numeric`, gold = the expression tree's value computed when the query is generated;
- python: "Run this program and report what it prints:" and a fenced one-line program of string
  operations on a random word (no arithmetic, so the calculator finds no expression in it), judge
  `exact`, gold = the same operation applied here in Python (not by running the program);
- search: a one-hop fact question about an entity of the fictional world (`agentflow.tasks.world`):
  a city's founding year, the sea a river flows into, a person's birth year, an organisation's
  founder, a country's capital; judge `contains` (the gold occurs in the answer as whole words),
  because with the rule generator the answer is the passage the search tool returned (run with
  `search_top_k=1`, so the last line of the tool result is the top passage).

With the rule executor (the tool's command is derived from the query), the rule verifier and the
rule generator (the answer is the last line of the last successful tool result), the reward is 1
exactly when the planner chose the right tool and that tool, really executed (the calculator's
parser, the sandboxed python subprocess, BM25 over the corpus), produced the gold answer: a wrong
tool fails (the calculator finds no expression in a fact question, python gets prose, search finds
no passage for an expression) or returns text without the gold. `tests/test_toy.py` checks this
for every kind and every tool.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from agentflow.tasks import arithmetic
from agentflow.tasks.query import Query
from agentflow.tasks.world import World, build_world

TOOLS = ("calculator", "python", "search")
KINDS = TOOLS  # the right tool names the kind

_LETTERS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"

# (program over a word w and one of its letters a, what it prints)
_PROGRAMS: tuple[tuple[str, Callable[[str, str], str]], ...] = (
    ('print("{w}"[::-1])', lambda w, a: w[::-1]),
    ('print("{w}".upper())', lambda w, a: w.upper()),
    ('print("-".join(sorted("{w}")))', lambda w, a: "-".join(sorted(w))),
    ('print("{w}".replace("{a}", "x"))', lambda w, a: w.replace(a, "x")),
    ('print(len(set("{w}")))', lambda w, a: str(len(set(w)))),
)


def _word(rng: random.Random) -> str:
    n = rng.randint(2, 3)
    return "".join(rng.choice(_LETTERS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_LETTERS)


def _python(rng: random.Random, i: int, seed: int) -> Query:
    w = _word(rng)
    a = rng.choice(w)
    template, op = _PROGRAMS[rng.randrange(len(_PROGRAMS))]
    code = template.format(w=w, a=a)
    question = f"Run this program and report what it prints:\n```\n{code}\n```"
    return Query(id=f"toy-s{seed}-{i}", question=question, answer=op(w, a), judge="exact", meta={"tool": "python"})


def _search(rng: random.Random, i: int, seed: int, world: World) -> Query:
    kind = rng.randrange(5)
    if kind == 0:
        c = world.cities[rng.choice(list(world.cities))]
        q, a = f"In which year was the city of {c.name} founded?", str(c.founded)
    elif kind == 1:
        r = world.rivers[rng.choice(list(world.rivers))]
        q, a = f"Into which sea does the {r.name} river flow?", r.sea
    elif kind == 2:
        p = world.people[rng.choice(list(world.people))]
        q, a = f"In which year was {p.name} born?", str(p.born_year)
    elif kind == 3:
        o = world.orgs[rng.choice(list(world.orgs))]
        q, a = f"Who founded the {o.name}?", o.founder
    else:
        country = rng.choice(list(world.countries))
        q, a = f"What is the capital of {country}?", world.countries[country]
    return Query(id=f"toy-s{seed}-{i}", question=q, answer=a, judge="contains", meta={"tool": "search"})


def generate(num_queries: int, seed: int) -> list[Query]:
    """`num_queries` queries, the three kinds as equal in number as possible, in a seeded order."""
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(num_queries)]
    rng.shuffle(kinds)
    calc = iter(arithmetic.generate(kinds.count("calculator"), seed))
    world = build_world()
    out = []
    for i, kind in enumerate(kinds):
        if kind == "calculator":
            q = next(calc)
            out.append(
                Query(
                    id=f"toy-s{seed}-{i}",
                    question=q.question,
                    answer=q.answer,
                    judge="numeric",
                    meta={"tool": "calculator"},
                )
            )
        elif kind == "python":
            out.append(_python(rng, i, seed))
        else:
            out.append(_search(rng, i, seed, world))
    return out
