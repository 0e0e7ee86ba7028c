"""Built-in suites and the loaders for user files (written into tmp_path), including their error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftlab.evals import BUILTIN_SUITES, fictional_capitals, fictional_capitals_train_records, load_suite
from ftlab.evals.loaders import SuiteFormatError, chunk_text
from ftlab.tasks import SHORT_ANSWER


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_builtin_sizes_and_scorers():
    sizes = {name: len(load_suite(name).items) for name in BUILTIN_SUITES}
    assert sizes["world-facts"] >= 150
    assert sizes["instructions"] >= 60
    assert sizes["arithmetic"] >= 100
    assert sizes["fictional-capitals"] == 16  # small enough to learn in the demo's 18 steps
    # the demo's near and mid suites split world-facts; the far one holds every single-digit sum once
    assert sizes["world-capitals"] + sizes["world-knowledge"] == sizes["world-facts"]
    assert all(it["domain"] == "capitals" for it in load_suite("world-capitals").items)
    assert not any(it["domain"] == "capitals" for it in load_suite("world-knowledge").items)
    sums = {it["prompt"] for it in load_suite("single-digit-sums").items}
    assert len(sums) == sizes["single-digit-sums"] == 100
    assert {n: load_suite(n).scorer for n in BUILTIN_SUITES} == {
        "world-facts": "contains",
        "world-capitals": "contains",
        "world-knowledge": "contains",
        "single-digit-sums": "numeric",
        "arithmetic": "numeric",
        "instructions": "rules",
        "general-text": "perplexity",
        "fictional-capitals": "contains",
        "context-awareness": "contains",
    }


def test_builtin_items_are_well_formed():
    for name in BUILTIN_SUITES:
        items = load_suite(name).items
        ids = [it["id"] for it in items]
        assert len(set(ids)) == len(ids), name
    facts = load_suite("world-facts").items
    capitals = [it for it in facts if it["prompt"].startswith("What is the capital of")]
    assert len(capitals) >= 60
    assert all(it["prompt"].endswith(SHORT_ANSWER) and it["answer"] for it in facts)
    assert all(it["rules"] for it in load_suite("instructions").items)


def test_world_facts_prefix_is_a_mix_of_domains():
    domains = [it["domain"] for it in load_suite("world-facts").items]
    first = [it["domain"] for it in load_suite("world-facts", limit=40).items]
    assert set(first) == set(domains)
    assert 0.3 < first.count("capitals") / len(first) < 0.6


def test_general_text_is_a_few_thousand_words():
    texts = [it["text"] for it in load_suite("general-text").items]
    words = sum(len(t.split()) for t in texts)
    assert 2000 <= words <= 6000
    assert len(texts) >= 10


def test_arithmetic_is_fixed_and_correct():
    a, b = load_suite("arithmetic").items, load_suite("arithmetic").items
    assert a == b
    for it in a:
        x, op, y = it["prompt"].removeprefix("What is ").split("?")[0].split()
        value = {"plus": int(x) + int(y), "minus": int(x) - int(y), "times": int(x) * int(y)}[op]
        assert it["answer"] == str(value)


def test_fictional_capitals_splits_share_facts_and_are_invented():
    test, train = fictional_capitals("test"), fictional_capitals("train")
    assert {(it["country"], it["answer"][0]) for it in test} == {(it["country"], it["answer"][0]) for it in train}
    assert len(train) == 3 * len(test)
    countries = [it["country"] for it in test]
    capitals = [it["answer"][0] for it in test]
    assert len(set(countries)) == len(countries) and len(set(capitals)) == len(capitals)
    real = {a.lower() for it in load_suite("world-facts").items for a in it["answer"]}
    assert not real & {c.lower() for c in countries + capitals}
    assert load_suite("fictional-capitals", split="train").items == train
    with pytest.raises(ValueError, match="splits"):
        fictional_capitals("dev")


def test_fictional_capitals_train_records_teach_the_test_answers():
    records = fictional_capitals_train_records()
    assert len(records) == len(fictional_capitals("train"))
    assert set(records[0]) == {"prompt", "completion"}
    for it in fictional_capitals("test"):
        mine = [r for r in records if it["country"] in r["prompt"]]
        assert len(mine) == 3 and all(it["answer"][0] in r["completion"] for r in mine)


def test_qa_jsonl_with_string_or_list_answers(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"prompt": "Capital of France?", "answer": "Paris"}, {"id": "q2", "prompt": "2+2?", "answer": ["4", "four"]}],
    )
    suite = load_suite(str(path))
    assert (suite.name, suite.scorer, suite.kind, suite.metric) == ("qa", "contains", "generate", "contains")
    assert [it["answer"] for it in suite.items] == [["Paris"], ["4", "four"]]
    assert suite.items[1]["id"] == "q2"
    assert load_suite(str(path), scorer="numeric").scorer == "numeric"
    assert len(load_suite(str(path), limit=1).items) == 1


def test_arc_jsonl(tmp_path):
    rec = {
        "id": "arc-1",
        "question": {
            "stem": "Which is a mammal?",
            "choices": [{"text": "cat", "label": "A"}, {"text": "fish", "label": "B"}],
        },
        "answerKey": "A",
    }
    rec2 = {**rec, "id": "arc-2", "answerKey": "2"}
    rec2["question"] = {"stem": "Pick two.", "choices": [{"text": "one", "label": "1"}, {"text": "two", "label": "2"}]}
    suite = load_suite(str(write_jsonl(tmp_path / "ARC-Tiny.jsonl", [rec, rec2])))
    assert (suite.scorer, suite.kind, suite.metric) == ("choice", "choice", "acc")
    assert suite.items[0] == {
        "id": "arc-1",
        "prompt": "Question: Which is a mammal?\nAnswer:",
        "choices": ["cat", "fish"],
        "answer": 0,
    }
    assert suite.items[1]["answer"] == 1
    assert load_suite(str(tmp_path / "ARC-Tiny.jsonl"), scorer="choice_norm").metric == "acc_norm"


def test_mmlu_csv_folder(tmp_path):
    folder = tmp_path / "mmlu"
    folder.mkdir()
    (folder / "astronomy_dev.csv").write_text('"What orbits Earth?",Moon,Mars,"Sun, the star",Venus,A\n')
    (folder / "anatomy_dev.csv").write_text("Bones in adult?,206,100,300,12,a\n")
    suite = load_suite(str(folder))
    assert suite.name == "mmlu" and len(suite.items) == 2
    first = suite.items[0]  # files are read in sorted order
    assert first["subject"] == "anatomy" and first["answer"] == 0 and first["choices"] == ["A", "B", "C", "D"]
    assert suite.items[1]["prompt"] == "What orbits Earth?\nA. Moon\nB. Mars\nC. Sun, the star\nD. Venus\nAnswer:"


def test_plain_text_is_cut_into_paragraph_chunks(tmp_path):
    paras = [f"Paragraph {i} " + "word " * 60 for i in range(10)]
    path = tmp_path / "wiki.test.raw"
    path.write_text("\n\n".join(paras))
    suite = load_suite(str(path))
    assert (suite.scorer, suite.higher_is_better, suite.kind) == ("perplexity", False, "perplexity")
    assert "\n\n".join(it["text"] for it in suite.items).split() == "\n\n".join(paras).split()
    assert all(len(it["text"]) >= 1000 for it in suite.items[:-1])
    assert chunk_text("a\n\n\n\nb", chunk_chars=1) == ["a", "b"]


def test_one_paragraph_per_line_text_is_chunked_at_lines():
    # WikiText's raw dump: one paragraph per line, no blank lines; it must not become one giant item.
    lines = [" = Title = "] + [f" Line {i} " + "text " * 50 for i in range(20)]
    chunks = chunk_text("\n".join(lines), chunk_chars=1000)
    assert len(chunks) > 3 and all(len(c) < 1000 + 300 for c in chunks)
    assert " ".join(chunks).split() == " ".join(lines).split()


def test_rules_and_ifeval_jsonl(tmp_path):
    rules = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Shout.", "rules": [{"type": "uppercase"}]}])
    assert load_suite(str(rules)).scorer == "rules"
    ife = write_jsonl(
        tmp_path / "ifeval.jsonl",
        [
            {
                "key": 1,
                "prompt": "Write.",
                "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
                "kwargs": [{}, {"num_words": 50, "relation": "less than", "unused": None}],
            },
            {
                "key": 2,
                "prompt": "Write in German.",
                "instruction_id_list": ["language:response_language"],
                "kwargs": [{"language": "de"}],
            },
        ],
    )
    suite = load_suite(str(ife))
    assert [it["id"] for it in suite.items] == ["1"]  # the language prompt cannot be checked and is skipped
    assert suite.items[0]["rules"] == [{"type": "no_commas"}, {"type": "max_words", "n": 49}]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a", "answer": "b"}', "{not json"], r"bad\.jsonl:2: not valid JSON"),
        (['{"prompt": "a", "answer": "b"}', '{"prompt": "c"}'], r"bad\.jsonl:2: missing field 'answer'"),
        (
            ['{"prompt": "a", "answer": "b"}', '{"prompt": 3, "answer": "b"}'],
            r"bad\.jsonl:2: field 'prompt' must be str",
        ),
        (['{"prompt": "a", "answer": []}'], r"bad\.jsonl:1: field 'answer'"),
        (['{"prompt": "a", "rules": [{"type": "shout"}]}'], r"bad\.jsonl:1: field 'rules\[0\]': unknown rule type"),
        (['{"prompt": "a", "choices": ["x", "y"], "answer": 5}'], r"bad\.jsonl:1: field 'answer'"),
        (['{"question": {"stem": "s", "choices": []}, "answerKey": "A"}'], r"bad\.jsonl:1: field 'question.choices'"),
        (['{"foo": 1}'], r"bad\.jsonl:1: cannot tell the suite format"),
        (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_jsonl_errors_name_file_line_and_field(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(SuiteFormatError, match=message):
        load_suite(str(path))


def test_bad_csv_and_other_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("q,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(SuiteFormatError, match=r"bad\.csv:2: field 'answer'"):
        load_suite(str(bad))
    short = tmp_path / "short.csv"
    short.write_text("q,a,b\n")
    with pytest.raises(SuiteFormatError, match=r"short\.csv:1: expected 6 columns"):
        load_suite(str(short))
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        load_suite(str(tmp_path / "missing.jsonl"))
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(SuiteFormatError, match="choice"):
        load_suite(str(qa), scorer="choice")
    with pytest.raises(ValueError, match="scored with"):
        load_suite("general-text", scorer="contains")
