"""`flowgrpo bench retrieval`: build time, load time and queries/s of the search tool's indexes.

    flowgrpo bench retrieval --passages 100000 --queries 1000 --json bench/results/retrieval_cpu.json

A corpus of `--passages` generated passages (seeded: a title of two words, a text of 60-140 words
drawn from a Zipf(1.1) vocabulary of 50 000 made-up words, a Wikipedia-passage-like length) is
written as JSONL; then, for the persistent bm25s index (`agentflow.tools.search.CorpusIndex`):
the cold open (read corpus, tokenize, index, save), the warm open (load from disk), and queries
one at a time as the tool issues them (3-6 words of a random passage, top-k 3); and, unless
`--skip-python`, the same for the in-memory pure-Python `BM25` (build, and a twentieth of the queries). Single process,
wall clock (`time.perf_counter`), the machine as it is (other load included: say so when quoting).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any


def make_corpus(path: Path, n: int, seed: int = 0, vocab: int = 50_000) -> list[dict[str, str]]:
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    words = list(
        dict.fromkeys(
            "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 4)))
            for _ in range(vocab * 2)
        )
    )[:vocab]
    cum = list(itertools.accumulate(1.0 / (i + 1) ** 1.1 for i in range(len(words))))
    passages = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            title = " ".join(rng.choices(words[1000:], k=2)).title()
            text = " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(60, 140)))
            p = {"id": str(i), "title": title, "text": text}
            passages.append(p)
            f.write(json.dumps(p) + "\n")
    return passages


def _qps(index: Any, queries: list[str], k: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    hits = sum(len(index.search(q, k)) > 0 for q in queries)
    return len(queries) / (time.perf_counter() - t0), hits


def run(passages: int, queries: int, k: int, seed: int, python_bm25: bool, work: Path) -> dict[str, Any]:
    from agentflow.tools.search import BM25, CorpusIndex, import_bm25s

    bm25s = import_bm25s()

    corpus = work / "corpus.jsonl"
    t0 = time.perf_counter()
    docs = make_corpus(corpus, passages, seed)
    gen_s = time.perf_counter() - t0
    rng = random.Random(seed + 1)
    qs = []
    for _ in range(queries):
        words = rng.choice(docs)["text"].split()
        start = rng.randrange(max(1, len(words) - 6))
        qs.append(" ".join(words[start : start + rng.randint(3, 6)]))
    out: dict[str, Any] = {
        "conditions": {
            "passages": passages,
            "corpus_mb": corpus.stat().st_size / 1e6,
            "queries": queries,
            "top_k": k,
            "seed": seed,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(),
            "bm25s": bm25s.__version__,
            "generate_s": gen_s,
            "load_average_1min": os.getloadavg()[0],  # other processes on the machine during the run
        }
    }
    t0 = time.perf_counter()
    cold = CorpusIndex.open(corpus, work / "index")
    out["bm25s"] = {"build_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    warm = CorpusIndex.open(corpus, work / "index")
    out["bm25s"]["load_s"] = time.perf_counter() - t0
    assert cold.built_s is not None and warm.built_s is None
    out["bm25s"]["index_mb"] = sum(f.stat().st_size for f in (work / "index").iterdir()) / 1e6
    out["bm25s"]["queries_per_s"], out["bm25s"]["queries_with_hits"] = _qps(warm, qs, k)
    if python_bm25:
        t0 = time.perf_counter()
        py = BM25(docs)
        out["python_bm25"] = {"build_s": time.perf_counter() - t0}
        few = qs[: max(1, queries // 20)]  # ~1000x slower per query: a twentieth of the queries is enough
        out["python_bm25"]["queries_per_s"], out["python_bm25"]["queries_with_hits"] = _qps(py, few, k)
        out["python_bm25"]["queries"] = len(few)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passages", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-python", action="store_true", help="skip the pure-Python BM25 comparison")
    p.add_argument("--json", dest="json_out", help="write the figures here")


def main(args: argparse.Namespace) -> int:
    from engine.fsio import atomic_write_json

    with tempfile.TemporaryDirectory() as d:
        res = run(args.passages, args.queries, args.top_k, args.seed, not args.skip_python, Path(d))
    c = res["conditions"]
    print(
        f"retrieval: {c['passages']} generated passages ({c['corpus_mb']:.1f} MB JSONL), {c['queries']} queries, k={c['top_k']}"
    )
    for name, r in ((k, v) for k, v in res.items() if k != "conditions"):
        extra = f"  load {r['load_s']:.2f}s  index {r['index_mb']:.1f} MB" if "load_s" in r else ""
        print(
            f"  {name:<12} build {r['build_s']:.2f}s{extra}  {r['queries_per_s']:.0f} queries/s "
            f"(one at a time; {r['queries_with_hits']}/{r.get('queries', c['queries'])} with hits)"
        )
    if args.json_out:
        atomic_write_json(args.json_out, res, indent=1)
    return 0
