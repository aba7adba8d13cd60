"""A fictional world, its encyclopedia (the search tool's corpus) and multi-hop questions over it.

`build_world(CORPUS_SEED)` deterministically invents seas, rivers, countries, cities, people and
organisations with made-up names (every name word is unique across the world, so a search for it
is unambiguous) and facts linking them: a person was born in a city in a year, a city lies in a
country on a river and was founded in a year, a river flows into a sea, an organisation was
founded by a person in a year and has its headquarters in a city, a country has a capital.
Each entity becomes one short passage; the passages are shipped as `agentflow/data/corpus.jsonl`
(regenerate with `python -m agentflow.tasks.make_corpus`; a test checks the file equals the generator).

Multi-hop questions chain 2-3 of these facts (e.g. "In which country was the founder of X born?"
needs the organisation's passage, then the founder's, then the birth city's); every fact needed
is in the corpus, one hop per passage.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

CORPUS_SEED = 2510
CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "corpus.jsonl"

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "st",
    "th",
    "sh",
]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "nd", "rk"]
_PROFESSIONS = [
    "painter", "sailor", "engineer", "poet", "merchant", "physician", "astronomer", "architect",
    "composer", "cartographer", "botanist", "weaver", "judge", "historian", "glassmaker", "teacher",
]  # fmt: skip
_ORG_KINDS = ["Works", "Foundry", "Press", "Bank", "Academy", "Observatory", "Shipyard", "Theatre", "Brewery", "Museum"]
SIZES = {"seas": 8, "rivers": 80, "countries": 30, "cities": 300, "people": 1300, "orgs": 600}


@dataclass(frozen=True)
class Person:
    name: str
    profession: str
    born_in: str
    born_year: int


@dataclass(frozen=True)
class City:
    name: str
    country: str
    river: str
    founded: int


@dataclass(frozen=True)
class River:
    name: str
    length_km: int
    sea: str


@dataclass(frozen=True)
class Org:
    name: str
    kind: str
    founder: str
    founded: int
    city: str


@dataclass(frozen=True)
class World:
    seas: tuple[str, ...]
    rivers: dict[str, River]
    countries: dict[str, str]  # country -> capital city
    cities: dict[str, City]
    people: dict[str, Person]
    orgs: dict[str, Org]

    def passages(self) -> list[dict[str, str]]:
        """One passage per entity, in a fixed order: {"id", "title", "text"}."""
        out: list[tuple[str, str]] = []
        for s in self.seas:
            out.append((s, f"The {s} is a sea. Many rivers of the region flow into the {s}."))
        for r in self.rivers.values():
            out.append((r.name, f"The {r.name} is a river {r.length_km} km long that flows into the {r.sea}."))
        for country, capital in self.countries.items():
            out.append((country, f"{country} is a country. Its capital is {capital}."))
        for c in self.cities.values():
            out.append(
                (
                    c.name,
                    f"{c.name} is a city in {c.country}, founded in {c.founded}. The {c.river} flows through {c.name}.",
                )
            )
        for p in self.people.values():
            out.append((p.name, f"{p.name} was a {p.profession} born in {p.born_in} in {p.born_year}."))
        for o in self.orgs.values():
            kind = ("an " if o.kind[0] in "AEIOU" else "a ") + o.kind.lower()
            out.append(
                (
                    o.name,
                    f"The {o.name} is {kind} founded by {o.founder} in {o.founded}. Its headquarters are in {o.city}.",
                )
            )
        return [{"id": f"p{i:04d}", "title": t, "text": x} for i, (t, x) in enumerate(out)]


class _Names:
    """Unique made-up words: no word is ever handed out twice."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 2)) -> str:
        while True:
            n = self.rng.randint(*syllables)
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n)) + self.rng.choice(_CODAS)
            if w not in self.used and len(w) >= 4:
                self.used.add(w)
                return w.capitalize()


@functools.cache
def build_world(seed: int = CORPUS_SEED) -> World:
    rng = random.Random(seed)
    names = _Names(rng)
    seas = tuple(f"{names.word()} Sea" for _ in range(SIZES["seas"]))
    rivers = {}
    for _ in range(SIZES["rivers"]):
        n = names.word()
        rivers[n] = River(n, rng.randint(40, 3000), rng.choice(seas))
    country_names = [names.word() + rng.choice(["ia", "land", "or", "a"]) for _ in range(SIZES["countries"])]
    river_names = list(rivers)
    cities = {}
    for i in range(SIZES["cities"]):
        n = names.word()
        country = country_names[i] if i < len(country_names) else rng.choice(country_names)
        cities[n] = City(n, country, rng.choice(river_names), rng.randint(800, 1900))
    city_names = list(cities)
    countries = {c: next(x for x in city_names if cities[x].country == c) for c in country_names}
    first = [names.word((1, 2)) for _ in range(60)]
    people = {}
    for _ in range(SIZES["people"]):
        n = f"{rng.choice(first)} {names.word()}"
        people[n] = Person(n, rng.choice(_PROFESSIONS), rng.choice(city_names), rng.randint(1700, 1960))
    person_names = list(people)
    orgs = {}
    for _ in range(SIZES["orgs"]):
        kind = rng.choice(_ORG_KINDS)
        n = f"{names.word()} {kind}"
        founder = rng.choice(person_names)
        year = people[founder].born_year + rng.randint(20, 60)
        orgs[n] = Org(n, kind, founder, year, rng.choice(city_names))
    return World(seas, rivers, countries, cities, people, orgs)


Hop = tuple[str, str, str, list[str]]  # question, answer, judge, titles of the passages on the path


def _q_founder_country(w: World, rng: random.Random) -> Hop:
    o = w.orgs[rng.choice(list(w.orgs))]
    p = w.people[o.founder]
    return (
        f"In which country was the founder of the {o.name} born?",
        w.cities[p.born_in].country,
        "exact",
        [o.name, p.name, p.born_in],
    )


def _q_person_river(w: World, rng: random.Random) -> Hop:
    p = w.people[rng.choice(list(w.people))]
    return (
        f"Which river flows through the city where {p.name} was born?",
        w.cities[p.born_in].river,
        "exact",
        [p.name, p.born_in],
    )


def _q_hq_city_year(w: World, rng: random.Random) -> Hop:
    o = w.orgs[rng.choice(list(w.orgs))]
    q = f"In which year was the city that hosts the headquarters of the {o.name} founded?"
    return q, str(w.cities[o.city].founded), "numeric", [o.name, o.city]


def _q_person_capital(w: World, rng: random.Random) -> Hop:
    p = w.people[rng.choice(list(w.people))]
    country = w.cities[p.born_in].country
    return (
        f"What is the capital of the country where {p.name} was born?",
        w.countries[country],
        "exact",
        [p.name, p.born_in, country],
    )


def _q_founder_year(w: World, rng: random.Random) -> Hop:
    o = w.orgs[rng.choice(list(w.orgs))]
    return (
        f"In which year was the founder of the {o.name} born?",
        str(w.people[o.founder].born_year),
        "numeric",
        [o.name, o.founder],
    )


def _q_hq_sea(w: World, rng: random.Random) -> Hop:
    o = w.orgs[rng.choice(list(w.orgs))]
    river = w.cities[o.city].river
    q = f"Into which sea flows the river of the city where the {o.name} has its headquarters?"
    return q, w.rivers[river].sea, "exact", [o.name, o.city, river]


QUESTION_TEMPLATES = (
    _q_founder_country,
    _q_person_river,
    _q_hq_city_year,
    _q_person_capital,
    _q_founder_year,
    _q_hq_sea,
)


def multihop_questions(n: int, seed: int) -> list[Hop]:
    """`n` (question, answer, judge, hop titles) over the shipped world, chosen with `seed`.

    The hop titles name the passages on the reasoning path, in order; each passage names the next
    hop, and the last one contains the answer."""
    w = build_world(CORPUS_SEED)
    rng = random.Random(seed)
    return [rng.choice(QUESTION_TEMPLATES)(w, rng) for _ in range(n)]


def corpus_lines(seed: int = CORPUS_SEED) -> list[str]:
    return [json.dumps(p, ensure_ascii=False) for p in build_world(seed).passages()]
