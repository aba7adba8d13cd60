"""The search tool over a user's corpus: a persistent bm25s index built once and reused, JSONL or
parquet input, rebuilt when the corpus changes, bad rows named; rankings agree with the in-memory BM25."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agentflow import AgentConfig
from agentflow.runner import build_tools
from agentflow.tasks.world import CORPUS_PATH
from agentflow.tools.search import BM25, CorpusIndex, Search, load_corpus


@pytest.fixture(scope="module")
def passages() -> list[dict[str, str]]:
    return load_corpus(CORPUS_PATH)


def test_index_is_built_once_and_reused_and_ranks_like_bm25(tmp_path, passages):
    corpus = tmp_path / "wiki.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in passages))
    first = CorpusIndex.open(corpus)
    assert first.built_s is not None and first.num_passages == len(passages)
    assert (tmp_path / "wiki.jsonl.bm25s" / CorpusIndex.META).is_file()
    again = CorpusIndex.open(corpus)
    assert again.built_s is None  # loaded, not rebuilt
    reference = BM25(passages)
    for p in passages[:: len(passages) // 25]:
        got = again.search(p["title"], 3)
        assert got == first.search(p["title"], 3)
        assert got[0][1]["id"] == reference.search(p["title"], 1)[0][1]["id"], p["title"]
        assert all(s > 0 for s, _ in got) and [s for s, _ in got] == sorted((s for s, _ in got), reverse=True)
    assert again.search("the of and", 3) == []  # only stop words
    assert again.search("qqqzzzxxy", 3) == []  # unknown word: no zero-score passages
    # the corpus changes: the index is rebuilt (the old one replaced, not kept alongside)
    with open(corpus, "a") as f:
        f.write(json.dumps({"id": "new", "title": "Zanzibarquux Lighthouse", "text": "a lighthouse"}) + "\n")
    os.utime(corpus, ns=(1, 1))
    third = CorpusIndex.open(corpus)
    assert third.built_s is not None and third.num_passages == len(passages) + 1
    assert third.search("Zanzibarquux", 3)[0][1]["id"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wiki.jsonl", "wiki.jsonl.bm25s"]


def test_parquet_corpus_through_the_agent_config(tmp_path, passages):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(passages[:50]), corpus)
    cfg = AgentConfig(
        tools=("search",), search_corpus=str(corpus), search_index_dir=str(tmp_path / "idx"), search_top_k=2
    )
    (tool,) = build_tools(cfg, None)
    assert isinstance(tool, Search) and isinstance(tool.index, CorpusIndex)
    res = tool.run(passages[7]["title"])
    assert res.ok and res.text.startswith(f"[{passages[7]['title']}]") and res.text.count("\n") <= 1
    assert not tool.run("qqqzzzxxy").ok
    assert CorpusIndex.open(corpus, tmp_path / "idx").built_s is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": 1, "title": "a", "text": "b"}\n{"id": 2, "title": "a"}\n', r"x.jsonl:2: a corpus line needs 'id'"),
        ('{"id": 1, "title": "a", "text": 3}\n', r"x.jsonl:1: 'text' must be a string"),
        ("{oops\n", r"x.jsonl:1: invalid JSON"),
        ("\n", r"the corpus holds no passages"),
    ],
)
def test_bad_corpus_rows_are_named(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        CorpusIndex.open(tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl.bm25s").exists()


def test_missing_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"search corpus .* not found"):
        CorpusIndex.open(Path(tmp_path) / "nope.jsonl")


def test_retrieval_benchmark_runs_and_reports_its_conditions(tmp_path):
    from bench.retrieval import run

    res = run(passages=300, queries=40, k=3, seed=0, python_bm25=True, work=tmp_path)
    assert res["conditions"]["passages"] == 300 and res["conditions"]["bm25s"]
    assert res["bm25s"]["build_s"] > 0 and res["bm25s"]["load_s"] > 0 and res["bm25s"]["queries_per_s"] > 0
    assert res["bm25s"]["queries_with_hits"] == 40 and res["python_bm25"]["queries"] == 2


def test_bm25s_loads_no_numba_so_vllm_can_still_start():
    """numba's llvmlite breaks vLLM's kernel-override scan of sys.modules in every later engine start."""
    import subprocess
    import sys

    code = "import sys; from agentflow.tools.search import import_bm25s; import_bm25s(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
