"""Task generators, the shipped corpus, rule-based and LLM judges, and the JSONL loader."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
from agentflow_fakes import ScriptedEngine

from agentflow.tasks import TASKS, LLMJudge, Query, load_jsonl, load_task, rule_reward
from agentflow.tasks.game24 import solve24
from agentflow.tasks.judges import exact_match, game24_check, normalize_text, numeric_match, parse_number
from agentflow.tasks.world import CORPUS_PATH, CORPUS_SEED, corpus_lines
from agentflow.tools.calculator import evaluate
from agentflow.tools.search import default_index


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_are_seeded_and_their_gold_answers_score_one(task):
    a, b, c = load_task(task, 12, seed=3), load_task(task, 12, seed=3), load_task(task, 12, seed=4)
    assert a == b and a != c
    assert len({q.id for q in a}) == 12
    for q in a:
        assert q.question and q.answer
        assert rule_reward(q.answer, q) == 1.0, q
        assert rule_reward(None, q) == 0.0
        assert rule_reward("definitely wrong", q) == 0.0


def test_arithmetic_answers_match_the_calculator():
    for q in load_task("arithmetic", 50, seed=0):
        assert str(evaluate(q.meta["expression"])) == q.answer
        assert q.meta["expression"] in q.question


def test_game24_questions_are_solvable_and_the_checker_evaluates():
    for q in load_task("game24", 10, seed=1):
        assert game24_check(q.answer, q.meta["numbers"]) == 1.0
    assert solve24([1, 1, 1, 1]) is None
    assert game24_check("8 / (3 - 8 / 3)", [3, 3, 8, 8]) == 1.0  # needs exact fractions
    assert game24_check("(8 / (3 - 8 / 3)) = 24", [8, 3, 8, 3]) == 1.0
    assert game24_check("4 * 6", [4, 6, 1, 1]) == 0.0  # unused numbers
    assert game24_check("4 * 6 * 1 * 1 * 1", [4, 6, 1, 1]) == 0.0  # a number used twice
    assert game24_check("4 * 6 + 1 - 1", [4, 6, 1, 2]) == 0.0  # wrong multiset
    assert game24_check("4 * 6 + 1 - 2", [4, 6, 1, 2]) == 0.0  # 23
    assert game24_check("(4 ** 2) + 6 + 2", [4, 2, 6, 2]) == 0.0  # ** is not allowed
    assert game24_check("24", [24, 0, 0, 0]) == 0.0
    assert game24_check("1 / 0 + 4 * 6", [1, 0, 4, 6]) == 0.0
    assert game24_check("import os", [1, 2, 3, 4]) == 0.0


def test_exact_and_numeric_judges():
    assert normalize_text("  The  Orvel-Sea! ") == "orvelsea"
    assert exact_match("the Draishofith Sea.", "Draishofith Sea") == 1.0
    assert exact_match("Draishofith", "Draishofith Sea") == 0.0
    assert exact_match("", "") == 0.0
    assert numeric_match("42", "42.0") == 1.0
    assert numeric_match("1,234", "1234") == 1.0
    assert numeric_match("= 3/4", "0.75") == 1.0
    assert numeric_match("$5.", "5") == 1.0
    assert numeric_match("0.3333333333", "1/3") == 1.0  # within 1e-6 relative
    assert numeric_match("0.33", "1/3") == 0.0
    assert numeric_match("the answer is 42", "42") == 0.0  # prose around the number is not parsed
    assert parse_number("1/0") is None and parse_number("abc") is None and parse_number("-2.5e1") == -25


def test_auto_judge_picks_numeric_for_numbers():
    assert rule_reward("12.0", Query("a", "q", "12")) == 1.0
    assert rule_reward("paris", Query("b", "q", "Paris")) == 1.0
    with pytest.raises(ValueError, match="unknown judge 'fuzzy'"):
        rule_reward("x", Query("c", "q", "x", judge="fuzzy"))


def test_llm_judge_batches_normalises_and_counts_unparsed_verdicts():
    def reply(role, text):
        assert role == "judge"
        if "Model Response: seven" in text:
            return "<analysis>: seven is 7, not 5.\n<true_false>: False"
        if "Model Response: five" in text:
            return '{"analysis": "five is 5", "true_false": true}'
        return "hmm"

    engine = ScriptedEngine(reply)
    qs = [Query(str(i), "What is 2 + 3?", "5") for i in range(6)]
    answers = ["\\boxed{5}", "seven", "five", "6 apples", "10/2", None]
    counters: dict[str, float] = {}
    scores = LLMJudge(engine, counters=counters).score(qs, answers)
    # boxed 5 and 10/2 match by normalisation, unasked; "hmm" is unparseable -> 0; no answer -> 0 unasked
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert len(engine.calls) == 1 and len(engine.calls[0].prompts) == 3
    assert counters == {"judge_rule_matched": 2, "judge_asked": 3, "judge_unparsed": 1}


def test_answer_normalisation_numbers_math_and_multiple_choice():
    from agentflow.tasks.judges import choice_letter, equivalent, math_value, normalize_answer, parse_verdict

    assert normalize_answer(r"so the answer is $\boxed{\frac{1}{2}}$.") == "(1)/(2)"
    assert math_value(r"\boxed{\dfrac{3}{4}}") == Fraction(3, 4) and math_value("1,000") == 1000
    assert math_value("2*3+1") == 7 and math_value("seven") is None
    assert equivalent("0.5", r"\frac{1}{2}") and equivalent("$1,000", "1000") and not equivalent("0.51", "1/2")
    mcq = "What is the capital of France?\nA) Berlin\nB) Madrid\nC) Paris\nD) Rome"
    assert choice_letter("The correct answer is C.", mcq) == "C" and choice_letter("(B)", mcq) == "B"
    assert choice_letter("Paris", mcq) == "C" and choice_letter("London", mcq) is None
    assert equivalent("paris", "C", mcq) and not equivalent("A", "C", mcq)
    assert equivalent("The Eiffel Tower", "the eiffel tower") and not equivalent("Eiffel", "the eiffel tower")
    assert parse_verdict("<analysis>: x\n<true_false>: **False**") == 0.0
    assert parse_verdict("**true_false**: True") == 1.0 and parse_verdict("Analysis: equal.\nTrue") == 1.0
    assert parse_verdict("The answers might be true or false") is None and parse_verdict("") is None


def test_shipped_corpus_is_the_generators_output_and_small():
    shipped = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    assert shipped == corpus_lines(CORPUS_SEED), "regenerate with `python -m agentflow.tasks.make_corpus`"
    assert 2000 <= len(shipped) <= 5000
    assert CORPUS_PATH.stat().st_size < 400_000
    titles = [json.loads(ln)["title"] for ln in shipped]
    assert len(set(titles)) == len(titles)


def test_multihop_questions_are_answerable_hop_by_hop_with_search():
    """Each hop's passage is the top BM25 hit for its title, names the next hop, and the last has the answer."""
    idx = default_index()
    for q in load_task("multihop", 40, seed=0):
        hops = q.meta["hops"]
        assert 2 <= len(hops) <= 3
        assert hops[0] in q.question
        texts = []
        for title in hops:
            (_, top), *_ = idx.search(title, 1)
            assert top["title"] == title
            texts.append(top["text"])
        for text, nxt in zip(texts, hops[1:]):
            assert nxt in text, (text, nxt)
        assert q.answer in texts[-1]


def _write(tmp_path, lines):
    p = tmp_path / "tasks.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_loader_reads_fields_and_keeps_extras(tmp_path):
    p = _write(
        tmp_path,
        [
            '{"question": "What is 2+2?", "answer": 4}',
            "",
            '{"id": "g", "question": "Make 24", "answer": "4*6", "judge": "game24", "numbers": [4, 6, 1, 1], "src": "x"}',
        ],
    )
    qs = load_jsonl(p)
    assert [q.id for q in qs] == ["tasks-1", "g"]
    assert qs[0].answer == "4" and qs[0].judge == "auto"
    assert qs[1].judge == "game24" and qs[1].meta == {"numbers": [4, 6, 1, 1], "src": "x"}
    assert rule_reward("4 * 6 * 1 * 1", qs[1]) == 1.0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question": "q", "answer": "a"}', "{not json"], ":2: invalid JSON"),
        (['["q", "a"]'], ":1: expected a JSON object"),
        (['{"question": "q"}'], ":1: missing field 'answer'"),
        (["{}"], "missing fields 'question', 'answer'"),
        (['{"question": "", "answer": "a"}'], "'question' must be a non-empty string"),
        (['{"question": "q", "answer": null}'], "'answer' must be a non-empty string or a number"),
        (['{"question": "q", "answer": true}'], "'answer' must be"),
        (['{"question": "q", "answer": "a", "id": [1]}'], "'id' must be a string or an integer"),
        (
            ['{"id": 1, "question": "q", "answer": "a"}', '{"id": "1", "question": "q", "answer": "b"}'],
            ":2: duplicate id '1'",
        ),
        (['{"question": "q", "answer": "a", "judge": "fuzzy"}'], "unknown judge 'fuzzy'"),
        (['{"question": "q", "answer": "a", "judge": "game24"}'], "needs 'numbers'"),
        (["", "  "], "no queries"),
    ],
)
def test_jsonl_loader_errors_name_the_line_and_problem(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_jsonl(_write(tmp_path, lines))


def test_jsonl_loader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_unknown_task_and_bad_count():
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        load_task("chess", 1)
    with pytest.raises(ValueError, match="num_queries must be >= 1"):
        load_task("arithmetic", 0)
