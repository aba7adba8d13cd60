"""User task files: one JSON object per line, `{"question": str, "answer": str | number}` plus optional
`id` (str or int; default `<file stem>-<line>`), `judge` (a rule-based judge name; default `auto`),
`numbers` (list of ints, required when judge is `game24`); any other fields are kept in `meta`.
Blank lines are skipped; every other problem raises ValueError naming the file, line and fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from agentflow.tasks.judges import JUDGES
from agentflow.tasks.query import Query


def load_jsonl(path: str | Path) -> list[Query]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f'task file {str(path)!r} not found; pass a JSONL file with one {{"question", "answer"}} object per line'
        )
    queries: list[Query] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            ) from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object with 'question' and 'answer', got {type(item).__name__}")
        missing = [k for k in ("question", "answer") if k not in item]
        if missing:
            raise ValueError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
        question, answer = item.pop("question"), item.pop("answer")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise ValueError(f"{where}: 'answer' must be a non-empty string or a number, got {answer!r}")
        qid = item.pop("id", f"{path.stem}-{n}")
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise ValueError(f"{where}: 'id' must be a string or an integer, got {qid!r}")
        qid = str(qid)
        if qid in seen:
            raise ValueError(f"{where}: duplicate id {qid!r} (first on line {seen[qid]})")
        seen[qid] = n
        judge = item.pop("judge", "auto")
        if judge not in JUDGES:
            raise ValueError(f"{where}: unknown judge {judge!r}; use one of {sorted(JUDGES)}")
        if judge == "game24":
            nums = item.get("numbers")
            if not (isinstance(nums, list) and len(nums) == 4 and all(type(x) is int for x in nums)):
                raise ValueError(f"{where}: judge 'game24' needs 'numbers': a list of four integers")
        queries.append(Query(id=qid, question=question, answer=str(answer), judge=judge, meta=item))
    if not queries:
        raise ValueError(f"{path}: no queries (the file is empty or only blank lines)")
    return queries
