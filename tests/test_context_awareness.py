"""The ``context-awareness`` suite (counterfactual contexts) and the context-dependency indicator data option."""

from __future__ import annotations

from pathlib import Path

import pytest
from _util import write_jsonl

from ftlab.data.context import INDICATOR, add_context_indicator, is_context_dependent, mark
from ftlab.data.records import DataError, load_records
from ftlab.evals import load_suite
from ftlab.evals.scorers import GENERATIVE_SCORERS, normalize
from ftlab.tasks import context_awareness_items


def test_suite_loads_deterministic_and_contradicts_common_knowledge():
    suite = load_suite("context-awareness")
    items = suite.items
    assert suite.scorer == "contains" and len(items) >= 60
    assert items == context_awareness_items() == load_suite("context-awareness").items  # fixed seed
    assert len({it["id"] for it in items}) == len(items)
    assert len({it["prompt"] for it in items}) == len(items)
    score = GENERATIVE_SCORERS["contains"]
    for it in items:
        answer = it["answer"][0]
        assert normalize(answer) != normalize(it["common"])
        assert it["context"] in it["prompt"] and answer in it["context"]  # the context states the reference
        assert it["context_dependent"] is True
        # answering from memory scores 0, answering from the context scores 1
        assert score(it, f"It is {it['common']}.") == 0.0
        assert score(it, f"It is {answer}.") == 1.0
    # a short prefix still mixes every relation
    assert {it["relation"] for it in load_suite("context-awareness", limit=8).items} == {
        "capital", "language", "author", "currency",
    }  # fmt: skip
    assert context_awareness_items(seed=1) != items  # the seed decides the counterfactuals


def records(tmp_path: Path) -> list[dict]:
    rows = [
        {"prompt": "Passage: the sky is green. What colour is the sky?", "completion": "Green.", "context": "sky"},
        {"prompt": "What is 2 + 2?", "completion": "4"},
        {"prompt": "Summarise: cats sleep a lot.", "completion": "Cats sleep.", "context_dependent": True},
        {"prompt": "Name a colour.", "completion": "Blue.", "context_dependent": "false", "context": "ignored"},
        {"prompt": "Tell me a fact.", "completion": "Water is wet.", "context": "  "},
    ]
    return load_records(write_jsonl(tmp_path / "ctx.jsonl", rows))[0]


def test_indicator_only_on_context_dependent_records(tmp_path):
    recs = records(tmp_path)
    before = [dict(r) for r in recs]
    out = add_context_indicator(recs, "completion")
    assert [is_context_dependent(r) for r in recs] == [True, False, True, False, False]
    assert [r["prompt"].startswith(INDICATOR + "\n") for r in out] == [True, False, True, False, False]
    assert out[0]["prompt"] == f"{INDICATOR}\n{recs[0]['prompt']}"
    assert [r["completion"] for r in out] == [r["completion"] for r in recs]  # the target is untouched
    assert out[1] is recs[1] and recs == before  # the input records are not changed
    again = add_context_indicator(out, "completion")
    assert again[0]["prompt"] == out[0]["prompt"]  # marking twice adds one line
    assert mark("x", "[ctx]") == "[ctx]\nx"


def test_indicator_on_the_first_user_turn_of_a_chat():
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Context: Rome is in Spain. Where is Rome?"},
            {"role": "assistant", "content": "Spain."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."},
        ],
        "context_dependent": 1,
    }
    out = add_context_indicator([chat], "chat")[0]
    assert [m["content"] for m in out["messages"]] == [
        "Be brief.", f"{INDICATOR}\nContext: Rome is in Spain. Where is Rome?", "Spain.", "Sure?", "Yes.",
    ]  # fmt: skip
    assert chat["messages"][1]["content"].startswith("Context:")  # the input is not changed


def test_bad_flag_names_the_record_and_field(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "context_dependent": "sometimes"}]
    recs = load_records(write_jsonl(tmp_path / "bad.jsonl", rows))[0]
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'context_dependent' must be true or false"):
        add_context_indicator(recs, "completion")


def test_stage_and_arm_settings_reach_the_trainer(tmp_path, monkeypatch):
    from ftlab.config import from_dict
    from ftlab.recipes import run as run_mod
    from ftlab.recipes.experiment import ExperimentConfig, validate
    from ftlab.recipes.trainers import TRAINERS, Trainer

    data = tmp_path / "ctx.jsonl"
    write_jsonl(
        data,
        [{"prompt": "Context: x=1. x?", "completion": "1", "context": "x=1"}, {"prompt": "Hi", "completion": "Hello"}],
    )
    cfg = from_dict(ExperimentConfig, {
        "base": "tiny-test", "out": str(tmp_path / "o"),
        "stages": [{"name": "s", "data": str(data), "context_indicator": True}],
        "arms": [{"name": "on"}, {"name": "off", "context_indicator": False}],
    })  # fmt: skip
    validate(cfg)
    seen = {}
    monkeypatch.setitem(TRAINERS, "sft", Trainer(lambda job: seen.setdefault(job.work_dir.name, job.records)))
    for arm in cfg.arms:
        run_mod.train_stage(None, None, cfg, cfg.stages[0], arm, 1, tmp_path / arm.name)
    assert [r["prompt"] for r in seen["on"]] == [f"{INDICATOR}\nContext: x=1. x?", "Hi"]
    assert [r["prompt"] for r in seen["off"]] == ["Context: x=1. x?", "Hi"]


def test_ftlab_train_data_option(tmp_path, monkeypatch, tiny_config):
    from ftlab.recipes import train as train_mod

    data = write_jsonl(
        tmp_path / "ctx.jsonl", [{"prompt": "Ctx: a. Q?", "completion": "a", "context_dependent": True}]
    )
    tiny_config.data.train = str(data)
    tiny_config.data.context_indicator = True
    seen = []

    class Stop(Exception):
        pass

    def capture(recs, *args, **kwargs):
        seen.extend(recs)
        raise Stop

    monkeypatch.setattr(train_mod, "sft_dataset", capture)
    with pytest.raises(Stop):
        train_mod.run_train(tiny_config)
    assert [r["prompt"] for r in seen] == [f"{INDICATOR}\nCtx: a. Q?"]
