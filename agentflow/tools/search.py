"""Search: Okapi BM25 over the shipped corpus (`agentflow/data/corpus.jsonl`), fully deterministic.

score(q, d) = Σ_{t ∈ q} idf(t) · tf(t,d)·(k1+1) / (tf(t,d) + k1·(1 − b + b·|d|/avgdl)),
idf(t) = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5)), k1 = 1.5, b = 0.75. Tokens are lower-cased
alphanumeric runs of title + text; a few English stop words are dropped from queries. Ties break by
passage order. The index is built once per process (~2,300 passages, well under a second).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from pathlib import Path

from agentflow.tools.base import Tool, ToolResult, error

_TOKEN = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    ["a", "an", "the", "of", "in", "on", "at", "to", "for", "by", "with", "from", "and", "or", "is", "was", "were",
     "be", "which", "what", "who", "whom", "where", "when", "how", "did", "does", "do", "that", "this", "it", "its",
     "into", "find", "search", "look", "up", "about"]
)  # fmt: skip


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class BM25:
    def __init__(self, passages: list[dict[str, str]], k1: float = 1.5, b: float = 0.75) -> None:
        if not passages:
            raise ValueError("BM25 needs at least one passage")
        self.passages = passages
        self.k1, self.b = k1, b
        self.docs = [Counter(tokenize(p["title"] + " " + p["text"])) for p in passages]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avgdl = sum(self.lengths) / len(self.lengths)
        df: Counter[str] = Counter()
        for d in self.docs:
            df.update(d.keys())
        n = len(passages)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.postings: dict[str, list[int]] = {}
        for i, d in enumerate(self.docs):
            for t in d:
                self.postings.setdefault(t, []).append(i)

    def search(self, query: str, k: int = 3) -> list[tuple[float, dict[str, str]]]:
        """The top `k` passages with a positive score, best first (ties: earlier passage first)."""
        terms = [t for t in tokenize(query) if t not in _STOP] or tokenize(query)
        scores: dict[int, float] = {}
        for t in dict.fromkeys(terms):
            idf = self.idf.get(t)
            if idf is None:
                continue
            for i in self.postings[t]:
                tf = self.docs[i][t]
                norm = tf + self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avgdl)
                scores[i] = scores.get(i, 0.0) + idf * tf * (self.k1 + 1) / norm
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [(s, self.passages[i]) for i, s in best if s > 0]


def load_corpus(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"search corpus {str(path)!r} not found; regenerate it with `python -m agentflow.tasks.make_corpus`"
        )
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            p = json.loads(line)
            if not {"id", "title", "text"} <= p.keys():
                raise ValueError(f"{path}:{n}: a corpus line needs 'id', 'title' and 'text'")
            out.append(p)
    return out


@functools.cache
def default_index() -> BM25:
    from agentflow.tasks.world import CORPUS_PATH

    return BM25(load_corpus(CORPUS_PATH))


class Search(Tool):
    name = "search"
    description = "finds passages about people, places and organisations in the local encyclopedia"
    command_format = "a few keywords, e.g. the name to look up"

    def __init__(self, index: BM25 | None = None, top_k: int = 3) -> None:
        self._index = index
        self.top_k = top_k

    @property
    def index(self) -> BM25:
        if self._index is None:
            self._index = default_index()
        return self._index

    def run(self, command: str) -> ToolResult:
        if not command.strip():
            return error("empty search query")
        hits = self.index.search(command, self.top_k)
        if not hits:
            return error(
                f"no passage matches {command.strip()[:80]!r}; try the exact name of a person, place or organisation"
            )
        return ToolResult(True, "\n".join(f"[{p['title']}] {p['text']}" for _, p in hits))
