"""Search: Okapi BM25 over a passage corpus (id, title, text), fully deterministic.

score(q, d) = Σ_{t ∈ q} idf(t) · tf(t,d)·(k1+1) / (tf(t,d) + k1·(1 − b + b·|d|/avgdl)),
idf(t) = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5)), k1 = 1.5, b = 0.75.

Two indexes with that scoring:
- `BM25`: in memory, pure Python, built per process: the default, over the shipped fictional corpus
  (`agentflow/data/corpus.jsonl`, ~2,300 passages, well under a second). Tokens are lower-cased
  alphanumeric runs of title + text; a few English stop words are dropped from queries; ties break
  by passage order.
- `CorpusIndex` (`open_index(corpus)`, the `--corpus FILE` option): a user's corpus (JSONL or
  parquet with id, title, text; a Wikipedia passage dump), indexed with bm25s (sparse score matrix
  precomputed at build time, so a query costs one sparse row-sum: Lucene's BM25 variant, same k1, b
  and idf) and saved to a directory (default `<corpus>.bm25s/`) that later runs load instead of
  rebuilding: it records the corpus's path, size and mtime, the bm25s version and the parameters,
  and is rebuilt (into a temporary directory, then renamed) when any of them differ. The index
  directory keeps its own copy of the passages (read back memory-mapped), so the corpus is only
  read at build time. bm25s's tokenizer: lower-cased runs of two or more word characters, English
  stop words removed, no stemming. Queries are answered under a lock (bm25s's memory-mapped corpus
  is not thread-safe); zero-score passages are not returned.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import sys
import threading
import time
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


def _passage(p: object, where: str) -> dict[str, str]:
    if not isinstance(p, dict) or not {"id", "title", "text"} <= p.keys():
        raise ValueError(f"{where}: a corpus line needs 'id', 'title' and 'text'")
    for k in ("title", "text"):
        if not isinstance(p[k], str):
            raise ValueError(f"{where}: {k!r} must be a string, got {type(p[k]).__name__}")
    if isinstance(p["id"], bool) or not isinstance(p["id"], (str, int)):
        raise ValueError(f"{where}: 'id' must be a string or an integer")
    return {"id": str(p["id"]), "title": p["title"], "text": p["text"]}


def load_corpus(path: str | Path) -> list[dict[str, str]]:
    """Passages {id, title, text} of a JSONL or parquet file; a bad line or row raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"search corpus {str(path)!r} not found; pass a JSONL or parquet file of id, title, text "
            f"(the shipped one is regenerated with `python -m agentflow.tasks.make_corpus`)"
        )
    out = []
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a file that is not parquet
            raise ValueError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        missing = {"id", "title", "text"} - set(pf.schema_arrow.names)
        if missing:
            raise ValueError(f"{path}: the corpus needs columns id, title, text; missing {sorted(missing)}")
        for batch in pf.iter_batches(batch_size=65536, columns=["id", "title", "text"]):
            out += [_passage(p, f"{path}: row {len(out) + i}") for i, p in enumerate(batch.to_pylist())]
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    p = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e.msg}); one passage object per line") from None
                out.append(_passage(p, f"{path}:{n}"))
    if not out:
        raise ValueError(f"{path}: the corpus holds no passages")
    return out


def import_bm25s():
    """bm25s on its numpy backend, imported with numba hidden. bm25s imports numba when it can, numba
    loads llvmlite, and llvmlite's ffi object then breaks vLLM's scan of `sys.modules` when it registers
    its kernel overrides ("'_lib_fn_wrapper' object has no attribute 'get'"): every vLLM engine built
    later in the same process would fail to start."""
    if "bm25s" in sys.modules:
        return sys.modules["bm25s"]
    hidden = "numba" not in sys.modules
    if hidden:
        sys.modules["numba"] = None  # `import numba` raises ImportError while bm25s is imported
    try:
        import bm25s
    finally:
        if hidden:
            del sys.modules["numba"]
    return bm25s


class CorpusIndex:
    """A persistent bm25s index of a user's corpus (see the module doc); `search` as `BM25.search`."""

    META = "flowgrpo_index.json"

    def __init__(self, retriever, meta: dict, built_s: float | None) -> None:
        self.retriever = retriever
        self.meta = meta
        self.built_s = built_s  # seconds spent building (None: loaded from disk)
        self.num_passages = int(meta["num_passages"])
        self._lock = threading.Lock()

    @staticmethod
    def fingerprint(corpus: Path, k1: float, b: float) -> dict:
        bm25s = import_bm25s()

        st = corpus.stat()
        return {
            "corpus": str(corpus.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "bm25s": bm25s.__version__,
            "k1": k1,
            "b": b,
            "tokenizer": "bm25s.tokenize(stopwords='en'), no stemming",
        }

    @classmethod
    def open(
        cls, corpus: str | Path, index_dir: str | Path | None = None, k1: float = 1.5, b: float = 0.75
    ) -> CorpusIndex:
        """Load the index of `corpus` from `index_dir` (default `<corpus>.bm25s`), building it when absent or stale."""
        try:
            bm25s = import_bm25s()
        except ImportError:
            raise RuntimeError("--corpus needs the bm25s package; `pip install bm25s`") from None
        corpus = Path(corpus)
        if not corpus.is_file():
            load_corpus(corpus)  # raises the not-found error
        index_dir = Path(index_dir) if index_dir else corpus.with_name(corpus.name + ".bm25s")
        want = cls.fingerprint(corpus, k1, b)
        try:
            meta = json.loads((index_dir / cls.META).read_text())
        except (OSError, ValueError):
            meta = None
        if meta is not None and {k: meta.get(k) for k in want} == want:
            retriever = bm25s.BM25.load(index_dir, load_corpus=True, mmap=True, show_progress=False)
            return cls(retriever, meta, None)
        t0 = time.perf_counter()
        passages = load_corpus(corpus)
        tokens = bm25s.tokenize(
            [p["title"] + " " + p["text"] for p in passages], stopwords="en", show_progress=False, return_ids=True
        )
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(tokens, show_progress=False)
        tmp = index_dir.with_name(f".{index_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        retriever.save(tmp, corpus=passages, show_progress=False)
        meta = {**want, "num_passages": len(passages)}
        (tmp / cls.META).write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = index_dir.with_name(f".{index_dir.name}.old-{os.getpid()}")
        if index_dir.exists():
            os.rename(index_dir, old)
        os.rename(tmp, index_dir)
        shutil.rmtree(old, ignore_errors=True)
        retriever = bm25s.BM25.load(index_dir, load_corpus=True, mmap=True, show_progress=False)
        return cls(retriever, meta, time.perf_counter() - t0)

    def search(self, query: str, k: int = 3) -> list[tuple[float, dict[str, str]]]:
        """The top `k` passages with a positive score, best first."""
        bm25s = import_bm25s()

        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)
        if not tokens[0]:
            return []
        k = min(k, self.num_passages)
        with self._lock:
            docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [(float(s), dict(d)) for d, s in zip(docs[0], scores[0]) if s > 0]


@functools.cache
def open_index(corpus: str, index_dir: str | None = None) -> CorpusIndex:
    """`CorpusIndex.open`, once per process and corpus."""
    return CorpusIndex.open(corpus, index_dir)


@functools.cache
def default_index() -> BM25:
    from agentflow.tasks.world import CORPUS_PATH

    return BM25(load_corpus(CORPUS_PATH))


class Search(Tool):
    name = "search"
    description = "finds passages about people, places and organisations in the local encyclopedia"
    command_format = "a few keywords, e.g. the name to look up"

    def __init__(self, index: BM25 | CorpusIndex | None = None, top_k: int = 3) -> None:
        self._index = index
        self.top_k = top_k

    @property
    def index(self) -> BM25 | CorpusIndex:
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
