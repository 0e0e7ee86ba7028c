"""lm-eval tasks as suites (``lm-eval:TASK``): a custom multiple-choice task in YAML over a local JSONL, scored on the
tiny model through lm-eval; item rows match lm-eval's own samples, in the CLI and as a retained suite of a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from ftlab.cli import app  # noqa: E402
from ftlab.evals import SuiteFormatError, evaluate, load_suite  # noqa: E402
from ftlab.models import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data" / "harness_mc.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text().splitlines()]
TASK = "ftlab_mc"


def task_yaml(name: str, cache: Path, prompt: str = "Question: {{question}}\\nAnswer:") -> str:
    """A two-option multiple-choice task over the fixture JSONL (the datasets cache kept in the test's folder)."""
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {DATA}\n  cache_dir: {cache}\n"
        f'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{prompt}"\n'
        'doc_to_choice: "{{options}}"\ndoc_to_target: label\nmetric_list:\n'
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )


@pytest.fixture
def tasks(tmp_path: Path) -> Path:
    """A folder with the task, a second task over the same data and a group of both."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / f"{TASK}.yaml").write_text(task_yaml(TASK, tmp_path / "hf"))
    (folder / "ftlab_mc_q.yaml").write_text(task_yaml("ftlab_mc_q", tmp_path / "hf", "Q: {{question}}\\nA:"))
    (folder / "group.yaml").write_text(
        "group: ftlab_mc_group\ntask: [ftlab_mc, ftlab_mc_q]\n"
        "aggregate_metric_list:\n  - {metric: acc, aggregation: mean, weight_by_size: true}\n"
    )
    return folder


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), tiny_tokenizer()


def lm_eval_samples(model, tok, folder: Path, name: str) -> dict:
    """lm-eval's own run of a task on the model (every document), for comparison."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    return lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, log_samples=True)


def test_item_rows_are_lm_evals_samples(tiny, tasks):
    model, tok = tiny
    suite = load_suite(f"lm-eval:{TASK}", lm_eval_include=tasks)
    assert suite.name == f"lm-eval:{TASK}" and suite.kind == "lm-eval" and suite.metric == "acc"
    assert suite.floor == 0.5 and len(suite.items) == len(ROWS)
    result = evaluate(model, tok, suite, batch_size=4, progress=False)

    reference = lm_eval_samples(model, tok, tasks, TASK)
    samples = {str(s["doc_id"]): s for s in reference["samples"][TASK]}
    assert [r.item_id for r in result.items] == [str(i) for i in range(len(ROWS))]
    for row in result.items:
        doc = ROWS[int(row.item_id)]
        sample = samples[row.item_id]
        # the row is the document its id names: its prompt, its gold option, lm-eval's score of it
        assert row.prompt == f"Question: {doc['question']}\nAnswer:" == sample["arguments"][0][0]
        assert row.reference == doc["options"][doc["label"]]
        assert row.score == sample["acc"]
        assert row.output in doc["options"] and (row.output == row.reference) == (row.score == 1.0)
    scores = [r.score for r in result.items]
    assert result.n == len(ROWS) and result.metric == "acc" and result.higher_is_better
    assert result.score == pytest.approx(sum(scores) / len(scores))
    assert result.score == pytest.approx(reference["results"][TASK]["acc,none"])
    assert result.stderr == pytest.approx(reference["results"][TASK]["acc_stderr,none"])


def test_limit_and_another_metric(tiny, tasks):
    model, tok = tiny
    full = evaluate(model, tok, load_suite(f"lm-eval:{TASK}", lm_eval_include=tasks), progress=False)
    # a limit keeps the first documents, scored exactly as in the full run
    part = evaluate(model, tok, load_suite(f"lm-eval:{TASK}", limit=3, lm_eval_include=[tasks]), progress=False)
    assert [(r.item_id, r.score) for r in part.items] == [(r.item_id, r.score) for r in full.items[:3]]
    norm = evaluate(model, tok, load_suite(f"lm-eval:{TASK}", scorer="acc_norm", lm_eval_include=tasks))
    reference = lm_eval_samples(model, tok, tasks, TASK)
    assert norm.metric == "acc_norm"
    assert [r.score for r in norm.items] == [s["acc_norm"] for s in reference["samples"][TASK]]
    assert norm.score == pytest.approx(reference["results"][TASK]["acc_norm,none"])


def test_a_group_shares_the_limit_and_reports_lm_evals_score(tiny, tasks):
    model, tok = tiny
    suite = load_suite("lm-eval:ftlab_mc_group", limit=4, lm_eval_include=tasks)
    assert [i["id"] for i in suite.items] == ["ftlab_mc/0", "ftlab_mc/1", "ftlab_mc_q/0", "ftlab_mc_q/1"]
    result = evaluate(model, tok, suite, progress=False)
    assert result.n == 4 and result.score == pytest.approx(sum(r.score for r in result.items) / 4)
    assert result.items[2].prompt == f"Q: {ROWS[0]['question']}\nA:"
    # a limit that leaves a task of the group without items: those items, scored by their mean
    one = evaluate(model, tok, load_suite("lm-eval:ftlab_mc_group", limit=1, lm_eval_include=tasks), progress=False)
    assert [(r.item_id, r.score) for r in one.items] == [(r.item_id, r.score) for r in result.items[:1]]
    assert one.n == 1 and one.score == one.items[0].score


def test_cli_json(tiny, tasks):
    args = ["eval", "--model", "tiny-test", "--suite", f"lm-eval:{TASK}", "--lm-eval-include", str(tasks), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    model, tok = tiny
    want = evaluate(model, tok, load_suite(f"lm-eval:{TASK}", lm_eval_include=tasks), progress=False)
    assert payload["suites"] == {f"lm-eval:{TASK}": want.to_dict()}


@pytest.mark.parametrize(
    "suite, extra, message",
    [
        ("lm-eval:ftlab_mcx", [], "no lm-eval task, group or tag named 'ftlab_mcx'; did you mean ftlab_mc"),
        (f"lm-eval:{TASK}", ["--scorer", "bleu"], "has no metric 'bleu'; it has acc, acc_norm"),
    ],
)
def test_cli_bad_task_is_one_line(tasks, suite, extra, message):
    args = ["eval", "--model", "tiny-test", "--suite", suite, "--lm-eval-include", str(tasks), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output


def test_errors_name_the_fix(tmp_path, tasks, monkeypatch):
    with pytest.raises(SuiteFormatError, match="include folder .* does not exist"):
        load_suite(f"lm-eval:{TASK}", lm_eval_include=tmp_path / "nowhere")
    with pytest.raises(SuiteFormatError, match="lm-eval scores Hugging Face models only"):
        evaluate(object(), None, load_suite(f"lm-eval:{TASK}", lm_eval_include=tasks), progress=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval not installed
    with pytest.raises(SuiteFormatError, match=r"pip install 'ftlab\[harness\]'"):
        load_suite(f"lm-eval:{TASK}", lm_eval_include=tasks)


def test_cli_imports_neither_torch_nor_lm_eval():
    code = "import sys, ftlab.cli; print('torch' in sys.modules, 'lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_retained_suite_of_a_run(tmp_path, tasks):
    from ftlab.recipes.experiment import load_experiment
    from ftlab.recipes.run import run_experiment
    from ftlab.store import Store

    rows = [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(8)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": r["completion"]}) + "\n" for r in rows[:3])
    )
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        f"name: h\nbase: tiny-test\nout: {tmp_path / 'out'}\n"
        "train: {lr: 0.003, max_steps: 2, batch_size: 4, save_steps: 0}\n"
        f"stages:\n  - {{name: a, data: {tmp_path / 'a.jsonl'}, targets: [{tmp_path / 't.jsonl'}]}}\n"
        f"retained: ['lm-eval:{TASK}']\narms:\n  - {{name: full, method: {{name: full}}}}\n"
        f"eval: {{batch_size: 8, lm_eval_include: {tasks}}}\n"
    )
    store = Store(tmp_path / "s.db")
    summary = run_experiment(load_experiment(exp), store)
    (run,) = store.runs()
    suite = f"lm-eval:{TASK}"
    config = json.loads(run["config"])
    assert config["suite_names"][suite] == suite and config["suite_floors"][suite] == 0.5
    for arm, stage in (("base", 0), ("full", 1)):
        items = store.items(run["run_id"], arm, stage, suite)
        assert sorted(int(i["item_id"]) for i in items) == list(range(len(ROWS)))
        (res,) = [r for r in store.results(run["run_id"]) if r["arm"] == arm and r["suite"] == suite]
        assert res["role"] == "retained" and res["n"] == len(ROWS)
        assert res["score"] == pytest.approx(sum(i["score"] for i in items) / len(items))
    assert suite in summary["base"]
