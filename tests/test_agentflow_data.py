"""Task files in AgentFlow's formats: its training parquet (NQ + DeepMath), its benchmark JSON, verl's
columns; several acceptable answers, LaTeX answers, the data source per query, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentflow.tasks import DataSpec, load_queries, rule_reward
from agentflow.tasks.judges import math_match, normalize_latex

DATA = Path(__file__).resolve().parent / "data"
BENCH = DATA / "bench"


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _agentflow_rows() -> list[dict]:
    return [json.loads(line) for line in (DATA / "agentflow_train.jsonl").read_text().splitlines()]


def test_agentflow_training_parquet_with_nq_answer_lists_and_latex(tmp_path):
    path = _parquet(tmp_path / "combined_train.parquet", _agentflow_rows())
    qs = load_queries(path, DataSpec(answer_sep="; "))
    assert [q.id for q in qs] == [str(i) for i in range(6)]
    assert [q.source for q in qs] == ["nq", "mathhard", "nq", "mathhard", "mathhard", "nq"]
    assert qs[0].golds == ("Georges Bizet", "Bizet") and qs[5].golds == ("4", "four")
    assert qs[0].meta == {}  # parquet reads only the columns it uses
    # several acceptable answers: any of them scores
    assert rule_reward("bizet", qs[0]) == rule_reward("Georges Bizet", qs[0]) == 1.0
    assert rule_reward("four", qs[5]) == rule_reward("4.0", qs[5]) == 1.0 and rule_reward("five", qs[5]) == 0.0
    # LaTeX answers (DeepMath's final_answer)
    assert rule_reward("0.5", qs[1]) == rule_reward(r"\boxed{\frac12}", qs[1]) == 1.0
    assert rule_reward(r"\frac{1}{2}", qs[1]) == 1.0 and rule_reward("1/3", qs[1]) == 0.0
    assert rule_reward(r"2^{1/2}", qs[4]) == 1.0 and rule_reward(r"\sqrt{3}", qs[4]) == 0.0
    # without the separator, the NQ string is one answer
    assert load_queries(path)[0].golds == ("Georges Bizet; Bizet",)
    # the same rows as JSONL give the same queries (JSONL keeps the extra fields in meta)
    as_jsonl = load_queries(DATA / "agentflow_train.jsonl", DataSpec(answer_sep="; "))
    assert [(q.id, q.golds, q.source) for q in as_jsonl] == [(q.id, q.golds, q.source) for q in qs]
    assert as_jsonl[0].meta["extra_info"]["idx"] == 0


def test_math_judge():
    assert normalize_latex(r"\boxed{\dfrac{1}{2}}") == r"\frac{1}{2}"
    for answer, gold in [
        ("1/2", r"\frac{1}{2}"),
        (r"\frac{\pi}{4}", r"\dfrac{\pi}{4}"),
        ("pi/4", r"\frac{\pi}{4}"),
        (r"2\sqrt{3}", r"\sqrt{12}"),
        ("e^2", r"e^{2}"),
        (r"\infty", r"\infty"),
        ("x^2+2x+1", r"(x+1)^{2}"),
        (r"$x = 3$", "3"),
        ("90", r"90^\circ"),
    ]:
        assert math_match(answer, gold) == 1.0, (answer, gold)
    for answer, gold in [("3", r"\frac{1}{2}"), ("__import__('os')", "1"), (r"\sqrt{2}", r"\sqrt{3}"), (None, "1")]:
        assert math_match(answer, gold) == 0.0, (answer, gold)


def test_verl_columns_by_flag_and_dotted_names(tmp_path):
    rows = [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}],
            "reward_model": {"style": "rule", "ground_truth": "4"},
        }
    ]
    path = _parquet(tmp_path / "train.parquet", rows)
    (q,) = load_queries(path, DataSpec(answer_key="reward_model.ground_truth"))
    assert (q.question, q.answer, q.source, q.id) == ("2+2?", "4", "openai/gsm8k", "train-0")
    with pytest.raises(ValueError, match=r"train.parquet: no column 'solution'; its columns are"):
        load_queries(path, DataSpec(answer_key="solution"))


def test_agentflow_benchmark_layout():
    bam = load_queries(BENCH / "bamboogle_mini")
    assert [q.source for q in bam] == ["bamboogle_mini"] * 3 and bam[1].golds == ("bern", "berne")
    assert bam[0].question.startswith("Who was president") and bam[0].id == "0"
    g24 = load_queries(BENCH / "gameof24_mini" / "data" / "data.json")
    assert all(q.judge == "game24" for q in g24) and g24[0].meta["numbers"] == [1, 1, 1, 8]
    assert g24[0].question.startswith("Using the numbers")
    assert rule_reward("(1+1+1)×8", g24[0]) == 1.0 and rule_reward("8*3", g24[0]) == 0.0
    aime = load_queries(BENCH / "aime_mini", DataSpec(source="aime"))
    assert [q.answer for q in aime] == ["2", "1", "9"] and {q.source for q in aime} == {"aime"}


@pytest.mark.parametrize(
    ("rows", "spec", "message"),
    [
        (
            [{"question": "q", "answer": "a"}, {"question": "q"}],
            DataSpec(),
            r"x.parquet: row 1: 'answer' must be a non-empty",
        ),
        ([{"question": "q", "answer": []}], DataSpec(), r"row 0: 'answer' must be a non-empty string"),
        ([{"question": "q", "answer": "a", "source": ""}], DataSpec(), r"row 0: 'source' \(the data source\)"),
        ([{"id": 1, "question": "q", "answer": "a"}] * 2, DataSpec(), r"row 1: duplicate id '1' \(first at"),
        ([{"q": "q", "answer": "a"}], DataSpec(question_key="question"), r"no column 'question'"),
    ],
)
def test_parquet_errors_name_the_file_row_and_field(tmp_path, rows, spec, message):
    path = _parquet(tmp_path / "x.parquet", rows)
    with pytest.raises(ValueError, match=message) as e:
        load_queries(path, spec)
    assert "\n" not in str(e.value)


def test_other_file_errors(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable parquet file"):
        load_queries(tmp_path / "bad.parquet")
    (tmp_path / "d.json").write_text('{"question": "q"}')
    with pytest.raises(ValueError, match="expected a JSON list of records"):
        load_queries(tmp_path / "d.json")
    (tmp_path / "e.json").write_text('[{"query": "q", "answer": "a"}, {"query": 3, "answer": "a"}]')
    with pytest.raises(ValueError, match=r"e.json: record 1: 'query' must be a non-empty string"):
        load_queries(tmp_path / "e.json")
    (tmp_path / "f.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"unknown format '\.csv'"):
        load_queries(tmp_path / "f.csv")
    (tmp_path / "empty_bench").mkdir()
    with pytest.raises(FileNotFoundError, match=r"without data/data\.json"):
        load_queries(tmp_path / "empty_bench")
