"""Conjugate prompting (``ftlab.evals.conjugate``): the rewritten prompt forms, the runner honouring them, the
``recovered`` arithmetic and verdicts on synthetic per-item rows, and ``ftlab eval --conjugate``."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ftlab.evals import conjugate as conj
from ftlab.evals import runner
from ftlab.evals.suites import Suite, load_suite
from ftlab.tasks import SHORT_ANSWER

pytestmark = pytest.mark.usefixtures("one_thread")


def qa_suite(n: int = 5) -> Suite:
    items = [{"id": f"q{i}", "prompt": f"What is item {i}?", "answer": [f"ans{i}", f"alt{i}"]} for i in range(n)]
    return Suite("qa", "contains", items, max_new_tokens=8)


def test_plain_drops_the_chat_template_for_a_bare_qa_frame():
    suite = qa_suite()
    plain = conj.conjugate_suite(suite, "plain")
    assert plain.name == "qa@plain" and plain.chat is False and plain.stop_strings == conj.FRAME_STOPS
    assert [it["prompt"] for it in plain.items] == [f"Q: What is item {i}?\nA:" for i in range(5)]
    assert [it["answer"] for it in plain.items] == [it["answer"] for it in suite.items]
    assert [it["id"] for it in plain.items] == [it["id"] for it in suite.items]
    assert suite.chat is None and suite.name == "qa"  # the original suite is untouched
    assert conj.split_name("qa@plain") == ("qa", "plain") and conj.split_name("a@b") == ("a@b", None)


def test_fewshot_frame_uses_three_other_items_never_the_item_itself():
    suite = qa_suite(5)
    few = conj.conjugate_suite(suite, "fewshot")
    assert few.name == "qa@fewshot" and few.chat is False and "\nQ:" in few.stop_strings
    for i, item in enumerate(few.items):
        prompt = item["prompt"]
        shots = [(i + k) % 5 for k in (1, 2, 3)]
        want = "".join(f"Q: What is item {j}?\nA: ans{j}\n\n" for j in shots) + f"Q: What is item {i}?\nA:"
        assert prompt == want
        assert f"ans{i}" not in prompt and prompt.count(f"What is item {i}?") == 1  # the item never answers itself
    # a two-item suite has one other item to show
    two = conj.conjugate_suite(qa_suite(2), "fewshot")
    assert two.items[0]["prompt"] == "Q: What is item 1?\nA: ans1\n\nQ: What is item 0?\nA:"


def test_forms_that_do_not_apply_give_none_and_translate_uses_translations():
    rules = load_suite("instructions", limit=3)
    assert conj.conjugate_suite(rules, "fewshot") is None  # no reference answers to show
    assert conj.conjugate_suite(rules, "plain") is not None
    assert conj.conjugate_suite(load_suite("general-text", limit=2), "plain") is None  # perplexity: not generative
    assert conj.conjugate_suite(qa_suite(), "translate") is None  # no suite ships translations yet
    suite = qa_suite(2)
    suite.items[0]["translations"] = {"fr": "Quel est l'objet 0 ?"}
    tr = conj.conjugate_suite(suite, "translate")
    assert tr.name == "qa@translate" and [it["prompt"] for it in tr.items] == [
        "Quel est l'objet 0 ?",
        "What is item 1?",
    ]
    with pytest.raises(ValueError, match="unknown conjugate form"):
        conj.conjugate_suite(suite, "pig-latin")


def test_world_facts_fewshot_keeps_the_short_answer_instruction():
    few = conj.conjugate_suite(load_suite("world-facts", limit=6), "fewshot")
    first = few.items[0]["prompt"]
    assert first.endswith(f"{SHORT_ANSWER}\nA:") and first.count("Q: ") == 4


def test_runner_sends_the_form_and_cuts_the_answer(monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kw):
        seen.update(kw, prompts=list(prompts))
        return ["ans0\n\nQ: What is item 9?\nA: ans9" for _ in prompts]

    monkeypatch.setattr(runner, "generate", fake_generate)
    few = conj.conjugate_suite(qa_suite(3), "fewshot")
    result = runner.evaluate(object(), None, few, progress=False)
    assert seen["chat"] is False and seen["prompts"] == [it["prompt"] for it in few.items]
    assert [r.output for r in result.items] == ["ans0"] * 3
    assert [r.score for r in result.items] == [1.0, 0.0, 0.0]  # the next shot's "ans9" is cut off, not scored
    runner.evaluate(object(), None, qa_suite(3), progress=False)
    assert seen["chat"] is None  # a suite asked as usual: the tokenizer decides


def test_cut_output():
    assert conj.cut_output(" Paris\nQ: next", conj.FRAME_STOPS) == "Paris"
    assert conj.cut_output("Rome\n\nmore", conj.FRAME_STOPS) == "Rome"
    assert conj.cut_output("no stop here", conj.FRAME_STOPS) == "no stop here"


def rows(values: list[float]) -> dict[str, float]:
    return {f"i{k:02d}": v for k, v in enumerate(values)}


def test_recovered_is_the_share_of_the_loss_the_form_wins_back():
    n = 40
    base = rows([1.0] * n)
    tuned = rows([1.0] * 20 + [0.0] * 20)  # lost 20 of 40: 0.5 points
    tuned_conj = rows([1.0] * 30 + [0.0] * 10)  # 10 of them come back
    base_conj = rows([1.0] * 38 + [0.0] * 2)
    fig = conj.recovery(base, tuned, base_conj, tuned_conj)
    assert fig["n"] == n and fig["base"] == 1.0 and fig["tuned"] == 0.5 and fig["tuned_conj"] == 0.75
    assert fig["lost"] == pytest.approx(0.5)
    assert fig["recovered"] == pytest.approx(0.5)  # (0.75 - 0.5) / (1.0 - 0.5)
    assert fig["form_gain_base"] == pytest.approx(-0.05)
    assert fig["significant"] and fig["verdict"] == "suppressed"
    # another split of the same numbers: base 0.8, tuned 0.3, tuned under the form 0.4 -> 0.2 of the loss
    base = rows([1.0] * 32 + [0.0] * 8)
    tuned = rows([1.0] * 12 + [0.0] * 28)
    tuned_conj = rows([1.0] * 16 + [0.0] * 24)
    fig = conj.recovery(base, tuned, base, tuned_conj)
    assert fig["recovered"] == pytest.approx((0.4 - 0.3) / (0.8 - 0.3))
    assert fig["verdict"] == "erased"  # 4 of 40 back is neither significant nor a quarter of the loss


def test_verdicts_erased_and_no_loss():
    base = rows([1.0] * 40)
    tuned = rows([1.0] * 20 + [0.0] * 20)
    fig = conj.recovery(base, tuned, base, tuned)
    assert fig["recovered"] == 0.0 and fig["verdict"] == "erased" and not fig["significant"]
    same = conj.recovery(base, base, base, base)
    assert same["recovered"] is None and same["verdict"] == "no loss"
    assert conj.recovery(rows([1.0]), rows([0.0]), rows([1.0]), rows([1.0])) is None  # one shared item


def test_run_recovery_reads_the_stored_forms():
    base = rows([1.0] * 40)
    tuned = rows([1.0] * 20 + [0.0] * 20)
    back = rows([1.0] * 36 + [0.0] * 4)
    scores = {
        ("base", 0, "wf"): base, ("full", 1, "wf"): tuned, ("base", 0, "wf@plain"): base,
        ("full", 1, "wf@plain"): back, ("base", 0, "wf@fewshot"): base,  # the arm has no fewshot scores
    }  # fmt: skip
    out = conj.run_recovery(scores, {"base": 0, "full": 1}, ["base", "full"], ["wf"])
    assert list(out) == ["full"] and list(out["full"]["wf"]) == ["plain"]
    assert out["full"]["wf"]["plain"]["recovered"] == pytest.approx((0.9 - 0.5) / 0.5)


def test_eval_cli_conjugate_forms(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"Say {w}", "answer": w}) + "\n" for w in ["a", "b", "c", "d"]))
    args = ["eval", "--model", "tiny-test", "--suite", str(qa), "--limit", "3", "--max-new-tokens", "3", "--json"]
    result = CliRunner().invoke(app(), [*args, "--conjugate", "plain", "--conjugate", "fewshot"])
    assert result.exit_code == 0, result.output
    suites = json.loads(result.stdout.strip().splitlines()[-1])["suites"]
    assert set(suites) == {"qa", "qa@plain", "qa@fewshot"} and all(s["n"] == 3 for s in suites.values())
    bad = CliRunner().invoke(app(), [*args, "--conjugate", "klingon"])
    assert bad.exit_code == 2 and "unknown conjugate form 'klingon'" in bad.output


def app():
    from ftlab.cli import app as typer_app

    return typer_app
