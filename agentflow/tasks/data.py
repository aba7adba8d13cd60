"""Task files in the formats AgentFlow (and verl) use: JSONL, parquet, and benchmark JSON.

    load_queries(path, DataSpec(...)) -> list[Query]

Formats, chosen by the path:
- `*.jsonl`: one JSON object per line (blank lines skipped);
- `*.parquet`: one row per query (read with pyarrow, only the needed columns);
- `*.json`: a list of objects: AgentFlow's benchmark layout (`test/<bench>/data/data.json`);
- a directory `<bench>` holding `data/data.json`: that file, with data source `<bench>`.

Fields: each of question, answer, id, source is read from the column the `DataSpec` names, or
else from the first present of the usual names (`QUESTION_KEYS`, ...: AgentFlow's training parquet
has id/question/result/source, its benchmarks pid or idx/query/answer, verl's files data_source).
A dotted name reads a nested field (`reward_model.ground_truth`, `extra_info.ground_truth`).
- question: a non-empty string, or a chat (list of {role, content}): the last user message;
- answer: a non-empty string, a number, or a list of them (several acceptable answers, e.g. NQ's
  golden_answers); with `answer_sep` a string splits into several (AgentFlow's NQ rows: "a; b");
  the first is `Query.answer`, the rest `Query.alternatives`;
- id: a string or integer, unique in the file (default `<file stem>-<line or row>`);
- source: the data source (default `DataSpec.source`, else the benchmark's or the file's name);
- judge: a rule judge name (default `DataSpec.judge`: auto); `numbers` (four integers) makes
  the default judge game24; AgentFlow's Game-of-24 benchmark keeps them in `question` (the text
  is in `query`), which is read the same way.
Other fields of a JSON(L) object are kept in `Query.meta`; parquet reads only the columns used.

Every problem raises ValueError (FileNotFoundError for a missing path) with one line naming the
file, the line/row/record and the field, before anything else runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentflow.tasks.judges import JUDGES
from agentflow.tasks.query import Query

QUESTION_KEYS = ("query", "question", "problem", "Problem", "prompt")
ANSWER_KEYS = ("answer", "answers", "golden_answers", "result", "final_answer", "ground_truth", "Answer")
ID_KEYS = ("id", "pid", "idx")
SOURCE_KEYS = ("source", "data_source")


@dataclass(frozen=True)
class DataSpec:
    """Which column holds each field (None: the first present of the usual names) and the defaults."""

    question_key: str | None = None
    answer_key: str | None = None
    id_key: str | None = None
    source_key: str | None = None
    answer_sep: str | None = None  # split a string answer into several acceptable answers at this separator
    source: str | None = None  # data source of rows without one (None: the benchmark's or the file's name)
    judge: str = "auto"  # judge of rows without a `judge` field

    def __post_init__(self) -> None:
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {sorted(JUDGES)}, got {self.judge!r}")
        if self.answer_sep == "":
            raise ValueError("answer_sep must be a non-empty string (or None for no splitting)")


class _Missing:
    pass


_MISSING = _Missing()


def _get(record: dict[str, Any], key: str) -> Any:
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _pick(record: dict[str, Any], key: str | None, candidates: tuple[str, ...]) -> tuple[str | None, Any]:
    """(the key used, its value) for an explicit `key`, else the first present candidate."""
    for k in (key,) if key else candidates:
        v = _get(record, k)
        if v is not _MISSING:
            return k, v
    return None, _MISSING


def _question(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user"]
        value = users[-1] if users else None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string (or a chat with a user message), got {value!r:.60}")
    return value


def _scalar_answer(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = str(value).strip()
    return text or None


def _answers(key: str, value: Any, sep: str | None) -> list[str]:
    if hasattr(value, "tolist"):  # numpy arrays from pyarrow/pandas conversions
        value = value.tolist()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for item in items:
        text = _scalar_answer(item)
        if text is None:
            raise ValueError(f"{key!r} must be a non-empty string or a number, or a list of them, got {value!r:.60}")
        parts = [p.strip() for p in text.split(sep)] if sep and isinstance(item, str) else [text]
        out += [p for p in parts if p and p not in out]
    if not out:
        raise ValueError(f"{key!r} must be a non-empty string or a number, or a list of them, got {value!r:.60}")
    return out


def _numbers(value: Any) -> list[int] | None:
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(type(x) is int for x in value):
        return list(value)
    return None


def _records_jsonl(path: Path) -> Iterator[tuple[str, int, Any]]:
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            ) from None
        yield f"{path}:{n}", n, item


def _records_json(path: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records (AgentFlow's data.json), got {type(data).__name__}")
    for n, item in enumerate(data):
        yield f"{path}: record {n}", n, item


def _records_parquet(path: Path, spec: DataSpec) -> Iterator[tuple[str, int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow; `pip install pyarrow`") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a file that is not parquet
        raise ValueError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = set(pf.schema_arrow.names)
    wanted = []
    for key, candidates in (
        (spec.question_key, QUESTION_KEYS),
        (spec.answer_key, ANSWER_KEYS),
        (spec.id_key, ID_KEYS),
        (spec.source_key, SOURCE_KEYS),
    ):
        top = [k.split(".")[0] for k in ((key,) if key else candidates)]
        present = [k for k in top if k in names]
        if key and not present:
            raise ValueError(f"{path}: no column {key!r}; its columns are {sorted(names)}")
        wanted += present[:1] if key else present
    wanted += [k for k in ("judge", "numbers") if k in names]
    row = 0
    for batch in pf.iter_batches(batch_size=65536, columns=list(dict.fromkeys(wanted))):
        for item in batch.to_pylist():
            yield f"{path}: row {row}", row, item
            row += 1


def _resolve(path: str | Path) -> tuple[Path, str]:
    """(the file to read, the default data source)."""
    path = Path(path)
    if path.is_dir():
        data = path / "data" / "data.json"
        if not data.is_file():
            raise FileNotFoundError(
                f"{path} is a directory without data/data.json; pass a benchmark directory in AgentFlow's "
                f"layout (<bench>/data/data.json) or a .jsonl/.json/.parquet file"
            )
        return data, path.name
    if not path.is_file():
        raise FileNotFoundError(
            f"task file {str(path)!r} not found; pass a .jsonl, .json or .parquet file (or a benchmark directory)"
        )
    if path.name == "data.json" and path.parent.name == "data":
        return path, path.parent.parent.name
    return path, path.stem


def load_queries(path: str | Path, spec: DataSpec = DataSpec()) -> list[Query]:
    """Every query of the file (see the module doc); raises on the first bad record."""
    path, default_source = _resolve(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _records_jsonl(path)
    elif suffix == ".json":
        records = _records_json(path)
    elif suffix == ".parquet":
        records = _records_parquet(path, spec)
    else:
        raise ValueError(f"{path}: unknown format {suffix!r}; use .jsonl, .json (a list of records) or .parquet")
    queries: list[Query] = []
    seen: dict[str, str] = {}
    for where, n, item in records:
        try:
            queries.append(_query(item, spec, default_source, f"{path.stem}-{n}", seen, where))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if not queries:
        raise ValueError(f"{path}: no queries (the file is empty or only blank lines)")
    return queries


def _query(item: Any, spec: DataSpec, default_source: str, default_id: str, seen: dict[str, str], where: str) -> Query:
    if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object with 'question' and 'answer', got {type(item).__name__}")
    item = dict(item)
    qkey, question = _pick(item, spec.question_key, QUESTION_KEYS)
    akey, answer = _pick(item, spec.answer_key, ANSWER_KEYS)
    missing = [
        f"{want!r}" + ("" if explicit else f" (or any of {', '.join(map(repr, cands[1:]))}; name it with {flag})")
        for key, want, explicit, cands, flag in (
            (qkey, spec.question_key or "question", spec.question_key, QUESTION_KEYS, "--question-key"),
            (akey, spec.answer_key or "answer", spec.answer_key, ANSWER_KEYS, "--answer-key"),
        )
        if key is None
    ]
    if len(missing) == 2 and not spec.question_key and not spec.answer_key:
        raise ValueError("missing fields 'question', 'answer' (name the columns with --question-key/--answer-key)")
    if missing:
        raise ValueError(f"missing field {', '.join(missing)}")
    assert qkey is not None and akey is not None
    text = _question(qkey, question)
    golds = _answers(akey, answer, spec.answer_sep)
    ikey, qid = _pick(item, spec.id_key, ID_KEYS)
    if ikey is None:
        if spec.id_key:
            raise ValueError(f"missing field {spec.id_key!r} (--id-key)")
        qid = default_id
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise ValueError(f"'id' must be a string or an integer, got {qid!r}")
    qid = str(qid)
    if qid in seen:
        raise ValueError(f"duplicate id {qid!r} (first at {seen[qid]})")
    seen[qid] = where
    skey, source = _pick(item, spec.source_key, SOURCE_KEYS)
    if skey is None:
        if spec.source_key:
            raise ValueError(f"missing field {spec.source_key!r} (--source-key)")
        source = spec.source or default_source
    if not isinstance(source, (str, int)) or isinstance(source, bool) or not str(source).strip():
        raise ValueError(f"{skey!r} (the data source) must be a non-empty string, got {source!r}")
    for k in (qkey, akey, ikey, skey):
        if k is not None and "." not in k:
            item.pop(k, None)
    numbers = _numbers(item.get("numbers"))
    if numbers is None and qkey != "question" and _numbers(item.get("question")) is not None:
        numbers = _numbers(item.pop("question"))  # AgentFlow's Game-of-24 benchmark
        item["numbers"] = numbers
    judge = item.pop("judge", "game24" if numbers is not None and spec.judge == "auto" else spec.judge)
    if judge not in JUDGES:
        raise ValueError(f"unknown judge {judge!r}; use one of {sorted(JUDGES)}")
    if judge == "game24" and numbers is None:
        raise ValueError("judge 'game24' needs 'numbers': a list of four integers")
    return Query(
        id=qid,
        question=text,
        answer=golds[0],
        judge=judge,
        meta=item,
        source=str(source).strip(),
        alternatives=tuple(golds[1:]),
    )


def load_jsonl(path: str | Path) -> list[Query]:
    """`load_queries` with the default column names (kept for the JSONL-only callers)."""
    return load_queries(path)
