"""The package-root API (docs/api.md): lazy names that resolve to the library's functions and work on the tiny
model, while ``import ftlab`` stays free of torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _util import write_jsonl

import ftlab

pytestmark = pytest.mark.usefixtures("one_thread")


def test_import_ftlab_loads_no_torch_sqlite_or_matplotlib():
    code = (
        "import ftlab, sys; assert 'torch' not in sys.modules; "
        "print(sorted(m for m in ('torch', 'sqlite3', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_names_resolve_to_the_library_functions():
    from ftlab.edits import edit_model
    from ftlab.models import load_model
    from ftlab.recipes.experiment import load_experiment
    from ftlab.recipes.run import run_experiment

    assert ftlab.load_model is load_model and ftlab.edit is edit_model
    assert ftlab.load_experiment is load_experiment and ftlab.run_experiment is run_experiment
    assert callable(ftlab.evaluate) and ftlab.__version__
    assert set(ftlab.__all__) <= set(dir(ftlab))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ftlab.nope  # noqa: B018


@pytest.fixture(scope="module")
def tiny():
    return ftlab.load_model("tiny-test")


def test_evaluate_takes_names_paths_and_suites(tiny, tmp_path):
    from ftlab.evals import SuiteResult, load_suite

    model, tok = tiny
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Hi", "answer": "x"}, {"prompt": "Yo", "answer": "y"}])
    (tmp_path / "text.txt").write_text("The river runs to the sea.\nBoats sail on the sea every day.\n")
    results = ftlab.evaluate(model, tok, [qa, load_suite(str(tmp_path / "text.txt"))], progress=False)
    assert list(results) == ["qa", "text"]
    assert all(isinstance(r, SuiteResult) for r in results.values())
    assert results["qa"].n == 2 and results["text"].metric == "perplexity" and results["text"].score > 1
    one = ftlab.evaluate(model, tok, str(qa), progress=False)  # one suite, by path
    assert one["qa"].score == results["qa"].score


def test_edit_scale_zero_gives_the_base_weights(tiny):
    import torch

    from ftlab.models import tiny_model

    base, _ = tiny
    tuned = tiny_model(seed=1)
    zero = ftlab.edit(base, tuned, "scale", factor=0.0).state_dict()
    one = ftlab.edit(base, tuned, "scale", factor=1.0).state_dict()
    want, moved = base.state_dict(), tuned.state_dict()
    assert all(torch.equal(zero[k], want[k]) for k in want)
    assert all(torch.equal(one[k], moved[k]) for k in moved)
    assert not torch.equal(zero["model.layers.0.mlp.up_proj.weight"], moved["model.layers.0.mlp.up_proj.weight"])


def test_load_and_run_an_experiment(tmp_path):
    from ftlab.store import Store

    rows = [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(4)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "a_test.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]} for r in rows[:2]])
    (tmp_path / "exp.yaml").write_text(
        f"name: api\nbase: tiny-test\nout: {tmp_path / 'out'}\n"
        "train: {lr: 0.003, max_steps: 1, batch_size: 4, save_steps: 0}\n"
        f"stages:\n  - {{name: a, data: {tmp_path / 'a.jsonl'}, targets: [{tmp_path / 'a_test.jsonl'}]}}\n"
        "arms:\n  - {name: full, method: {name: full}}\neval: {batch_size: 8}\n"
    )
    cfg = ftlab.load_experiment(tmp_path / "exp.yaml", ["train.lr=0.001"])
    assert cfg.train["lr"] == 0.001 and cfg.arms[0].name == "full"
    summary = ftlab.run_experiment(cfg, Store(tmp_path / "s.db"))
    assert summary["name"] == "api" and "a_test" in summary["base"]
    assert summary["arms"]["full"]["target_gain"] is not None
    assert (tmp_path / "out" / "summary.json").is_file()
