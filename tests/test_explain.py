"""Per-item explanations (``ftlab.analysis.explain``): the worst-forgotten items, the stored TuCo, the best repair
point, and where they show (summary.json, the HTML report, ``ftlab explain``); the run-time hooks of ``ftlab run``
(per-item TuCo, conjugate forms) on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _util import write_jsonl
from typer.testing import CliRunner

from ftlab.analysis import explain as ex
from ftlab.evals.runner import ItemResult, SuiteResult
from ftlab.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


def row(item_id: str, score: float, output: str = "", prompt: str = "") -> dict:
    return {"item_id": item_id, "score": score, "output": output, "prompt": prompt, "reference": ""}


def test_worst_items_rank_by_drop_then_id():
    base = [row("a", 1.0), row("b", 1.0), row("c", 0.5), row("d", 0.0), row("e", 1.0)]
    tuned = [row("e", 0.0), row("b", 0.0), row("a", 1.0), row("c", 0.25), row("d", 1.0), row("z", 0.0)]
    got = ex.worst_items(base, tuned, k=3)
    assert [(b["item_id"], t["score"]) for b, t in got] == [("b", 0.0), ("e", 0.0), ("c", 0.25)]
    assert [b["item_id"] for b, _ in ex.worst_items(base, tuned, k=1)] == ["b"]
    # lower is better (perplexity): a rise is the loss
    assert [b["item_id"] for b, _ in ex.worst_items(base, tuned, k=5, higher_is_better=False)] == ["d"]


def items(suite: str, scores: list[float], outputs: list[str] | None = None) -> SuiteResult:
    outputs = outputs or [f"answer {i}" for i in range(len(scores))]
    rows = [
        ItemResult(f"i{i}", f"<b>Question {i}</b>?", out, f"ref{i}", s)
        for i, (s, out) in enumerate(zip(scores, outputs, strict=True))
    ]
    return SuiteResult(suite, "contains", sum(scores) / len(scores), len(scores), 0.1, True, rows)


def synthetic_run(tmp_path: Path) -> tuple[Store, str]:
    """base answers wf's 8 items right; full loses i0-i5; full+scale=0.5 wins back i0, i1 and i3; full+scale=0.7
    wins back i0 only (so 0.5 has the better retention)."""
    store = Store(tmp_path / "s.db")
    config = {"stages": [{"name": "s", "targets": ["tgt"]}], "retained": ["wf"], "eval": {"explain": 3}}
    store.start_run("run1", "syn", str(tmp_path), config, 0, "", {})
    store.add_arm("run1", "base", "base", "none", None, {})
    store.add_arm("run1", "full", "train", "full", None, {})
    store.add_arm("run1", "full+scale=0.5", "edit", "scale", "full", {})
    store.add_arm("run1", "full+scale=0.7", "edit", "scale", "full", {})
    store.add_result("run1", "base", 0, "retained", items("wf", [1.0] * 8, [f"<i>base {i}</i>" for i in range(8)]))
    store.add_result("run1", "base", 0, "target", items("tgt", [0.0] * 4))
    store.add_result("run1", "full", 1, "retained", items("wf", [0.0] * 6 + [1.0] * 2))
    store.add_result("run1", "full", 1, "target", items("tgt", [1.0] * 4))
    store.add_result("run1", "full+scale=0.5", 1, "retained", items("wf", [1, 1, 0, 1, 0, 0, 1, 1]))
    store.add_result("run1", "full+scale=0.5", 1, "target", items("tgt", [1.0] * 4))
    store.add_result("run1", "full+scale=0.7", 1, "retained", items("wf", [1, 0, 0, 0, 0, 0, 1, 1]))
    store.add_result("run1", "full+scale=0.7", 1, "target", items("tgt", [1.0] * 4))
    tuco = tmp_path / "tuco.json"
    tuco.write_text(json.dumps({"tuco": {"wf": {"i0": 0.25, "i2": 0.5}}}))
    store.add_artifact("run1", "full", ex.TUCO_KIND, str(tuco))
    return store, "run1"


def test_explanations_pair_answers_tuco_and_the_best_repair_point(tmp_path):
    from ftlab.report.summary import load_summary

    store, run_id = synthetic_run(tmp_path)
    summary = load_summary(store, run_id)
    assert ex.best_repair_point(summary, "full") == "full+scale=0.5"
    got = ex.explanations(store, summary)
    assert list(got) == ["full"] and list(got["full"]) == ["wf"]
    rows = got["full"]["wf"]
    assert [r["item_id"] for r in rows] == ["i0", "i1", "i2"]  # eval.explain = 3, ties by id
    assert rows[0]["base_answer"] == "<i>base 0</i>" and rows[0]["tuned_answer"] == "answer 0"
    assert rows[0]["prompt"] == "<b>Question 0</b>?" and rows[0]["reference"] == "ref0"
    assert [r["tuco"] for r in rows] == [0.25, None, 0.5]
    assert [r["repaired"] for r in rows] == [True, True, False]
    assert {r["repair_point"] for r in rows} == {"full+scale=0.5"}
    # the budget search's recommended point wins over the best swept one
    rec = {"arm": "full", "chosen": {"name": "full+scale=0.7"}}
    again = ex.explanations(store, summary, recommended=rec, k=2)["full"]["wf"]
    assert [r["repaired"] for r in again] == [True, False] and again[0]["repair_point"] == "full+scale=0.7"
    budget = {"full": {"arm": "full", "met": True, "name": "full+scale=0.7"}}  # summary.json's `budget`, per arm
    assert ex.explanations(store, summary, recommended=budget)["full"]["wf"][0]["repair_point"] == "full+scale=0.7"
    assert ex.explanations(store, summary, k=0) == {}


def test_summary_report_and_cli_show_the_explanations(tmp_path):
    from ftlab.cli import app
    from ftlab.report.digest import build_summary
    from ftlab.report.html import render_report

    store, run_id = synthetic_run(tmp_path)
    summary = build_summary(store, run_id)
    assert [r["item_id"] for r in summary["explanations"]["full"]["wf"]] == ["i0", "i1", "i2"]
    page = render_report(store, run_id, tmp_path / "r.html").read_text()
    section = page[page.index('id="explanations"') :]
    assert 'id="explain-full-wf"' in section
    assert "&lt;b&gt;Question 0&lt;/b&gt;?" in section and "<b>Question" not in section  # escaped
    assert "&lt;i&gt;base 0&lt;/i&gt;" in section and "0.250" in section and "full+scale=0.5" in section
    result = CliRunner().invoke(app, ["explain", run_id, "--store", str(store.path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["run_id"] == run_id and payload["explanations"] == summary["explanations"]
    table = CliRunner().invoke(app, ["explain", run_id, "--store", str(store.path), "--items", "1"])
    assert table.exit_code == 0 and "i0" in table.stdout and "i1" not in table.stdout


def test_explain_arm_computes_and_stores_tuco(tmp_path):
    import torch

    from ftlab.models import tiny_model, tiny_tokenizer

    store, run_id = synthetic_run(tmp_path)
    base = tiny_model()
    tuned = tiny_model()
    tuned.load_state_dict(base.state_dict())
    got = ex.explain_arm(store, run_id, "full", 1, ["wf"], 2, base, tuned, tiny_tokenizer(), tmp_path / "arm")
    assert set(got["wf"]) == {"i0", "i1"} and all(v == 0.0 for v in got["wf"].values())  # no fine-tune, no TuCo
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = ex.explain_arm(store, run_id, "full", 1, ["wf"], 2, base, tuned, tiny_tokenizer(), tmp_path / "arm")
    assert all(0.0 < v < 1.0 for v in got["wf"].values())
    assert ex.stored_tuco(store, run_id, "full") == got and ex.has_tuco(store, run_id, "full")
    assert json.loads((tmp_path / "arm" / ex.TUCO_FILE).read_text())["tuco"] == got


def test_run_computes_tuco_and_conjugate_forms(tmp_path):
    from ftlab.recipes.experiment import load_experiment
    from ftlab.recipes.run import run_experiment

    train = [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(8)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"Say {w}", "answer": w} for w in "abcde"])
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""
base: tiny-test
out: {tmp_path / "o"}
train: {{lr: 0.003, max_steps: 2, batch_size: 4, save_steps: 0, logging_steps: 2}}
stages:
  - {{name: s, data: {tmp_path / "train.jsonl"}}}
retained: [{tmp_path / "qa.jsonl"}]
arms:
  - {{name: full, method: {{name: full}}}}
eval: {{batch_size: 8, max_new_tokens: {{{tmp_path / "qa.jsonl"}: 3}}, conjugate: [plain, fewshot], explain: 2}}
""")
    store = Store(tmp_path / "r.db")
    summary = run_experiment(load_experiment(exp), store)
    run_id = summary["run_id"]
    roles = {(r["arm"], r["suite"]): r["role"] for r in store.results(run_id)}
    for arm in ("base", "full"):
        assert roles[arm, "qa"] == "retained"
        assert roles[arm, "qa@plain"] == roles[arm, "qa@fewshot"] == "conjugate"
    assert set(summary["conjugate"]["full"]["qa"]) == {"plain", "fewshot"}
    assert summary["conjugate"]["full"]["qa"]["plain"]["n"] == 5
    assert ex.has_tuco(store, run_id, "full")
    assert (tmp_path / "o" / "arms" / "full" / ex.TUCO_FILE).is_file()
