"""The top floor's contracts: registries that take one line, validation before any work, one source for every figure,
the CLI's one error handler and light imports, adapters wherever a model is taken."""

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from _util import write_jsonl
from test_report import Result, make_run
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.config import ConfigError
from ftlab.recipes.experiment import load_experiment
from ftlab.recipes.run import run_experiment
from ftlab.store import Store

runner = CliRunner()


def tiny_experiment(tmp_path: Path, arms: str, stages: str = "", retained: str = "") -> Path:
    """A one-stage experiment on the tiny model (2 steps), with the given arms (YAML flow list items)."""
    rows = [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(8)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "a_test.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]} for r in rows[:4]])
    stages = stages or f"  - {{name: a, data: {tmp_path / 'a.jsonl'}, targets: [{tmp_path / 'a_test.jsonl'}]}}"
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"name: t\nbase: tiny-test\nout: {tmp_path / 'out'}\n"
        "train: {lr: 0.003, max_steps: 2, batch_size: 4, save_steps: 0}\n"
        f"stages:\n{stages}\nretained: [{retained}]\narms:\n{arms}\neval: {{batch_size: 8}}\n"
    )
    return path


# ---------------------------------------------------------------- a new trainer: one module + one registry line
@dataclass
class EchoSettings:
    """The settings of a toy objective that trains exactly like SFT and records what it was handed."""

    tag: str = "none"


SEEN: list = []


def echo_train_stage(job):
    """The toy objective's ``train_stage``: record the job, then train it as SFT does."""
    from ftlab.train import sft

    SEEN.append(job)
    return sft.train_stage(job)


def test_a_new_trainer_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    from ftlab.recipes.trainers import TRAINERS, Trainer

    monkeypatch.setitem(TRAINERS, "echo", Trainer(echo_train_stage, EchoSettings))  # the one registry line
    SEEN.clear()
    exp = tiny_experiment(tmp_path, "  - {name: e, method: {name: full}, trainer: echo, settings: {tag: hello}}")
    summary = run_experiment(load_experiment(exp), Store(tmp_path / "s.db"))
    (job,) = SEEN
    assert job.settings == EchoSettings(tag="hello") and job.stage == 0 and job.fmt == "completion"
    assert summary["arms"]["e"]["target_gain"] is not None
    # its settings are checked against its dataclass before anything trains
    with pytest.raises(ConfigError, match=r"arms\[0\]\.settings\.volume"):
        load_experiment(exp, ["arms=[{name: e, method: {name: full}, trainer: echo, settings: {volume: 11}}]"])


# ---------------------------------------------------------------- a new sweepable edit: one module + one registry line
def halve_apply(base_sd, tuned_sd, keep: float = 0.5):
    """A toy weight edit: keep a share of the delta (the same as ``scale``, under another name)."""
    return {k: b + keep * (tuned_sd[k] - b) for k, b in base_sd.items()}


def test_a_new_sweepable_edit_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    from ftlab.edits import EDITS, Edit

    monkeypatch.setitem(EDITS, "halve", Edit(halve_apply, sweep="keep"))  # the one registry line
    arms = "  - {name: full, method: {name: full}, post: {halve: [0.0, 1.0], scale: [0.0]}}"
    (tmp_path / "text.txt").write_text("The river runs to the sea. Boats sail on the sea every day.\n" * 4)
    exp = tiny_experiment(tmp_path, arms, retained=str(tmp_path / "text.txt"))
    s = run_experiment(load_experiment(exp), Store(tmp_path / "s.db"))
    suite = "text"  # perplexity: every weight change shows
    assert s["arms"]["full"]["stages"][-1][suite] != s["base"][suite]
    # keep 0 is the base model and keep 1 the tuned model, on every figure; equal to the built-in scale=0
    assert s["arms"]["full+halve=0.0"]["stages"][-1][suite] == s["base"][suite]
    assert s["arms"]["full+halve=0.0"]["stages"] == s["arms"]["full+scale=0.0"]["stages"]
    assert s["arms"]["full+halve=1.0"]["stages"][-1] == pytest.approx(s["arms"]["full"]["stages"][-1], rel=1e-5)
    with pytest.raises(ConfigError, match=r"post\.halve.*unexpected keyword"):
        load_experiment(exp, ["arms=[{name: full, method: {name: full}, post: {halve: {factor: [0.5]}}}]"])


# ---------------------------------------------------------------- every nested setting is checked before any work
@pytest.mark.parametrize(
    "arm, message",
    [
        ("{name: g, method: {name: full}, trainer: grpo, settings: {beta: -1}}", "grpo.beta must be >= 0"),
        ("{name: g, method: {name: full}, trainer: grpo, settings: {bogus: 1}}", "arms[0].settings.bogus"),
        ("{name: d, method: {name: full}, trainer: dpo, settings: {reference: parent}}", "dpo.reference"),
        ("{name: d, method: {name: full}, trainer: dpo, settings: {beta: 0}}", "dpo.beta must be > 0"),
        ("{name: s, method: {name: full}, settings: {beta: 0.1}}", "the sft trainer takes no settings"),
        ("{name: m, method: {name: full}, masked_thought: {ratio: 2}}", "masked_thought.ratio must be in [0, 1]"),
        ("{name: m, method: {name: full}, masked_thought: {rate: 0.2}}", "arms[0].masked_thought.rate"),
        ("{name: m, method: {name: full}, trainer: grpo, masked_thought: {ratio: 0.2}}", "not SFT"),
        ("{name: p, method: {name: full}, post: {scale: {alpha: [0.5]}}}", "post.scale"),
        ("{name: p, method: {name: full}, post: {merge: [0.5]}}", "not a repair that can be swept"),
        ("{name: x, method: {name: full}, trainer: ppo}", "arms[0].trainer"),
    ],
)
def test_nested_settings_fail_as_one_line_before_anything_is_written(tmp_path, arm, message):
    exp = tiny_experiment(tmp_path, f"  - {arm}")
    store = tmp_path / "s.db"
    result = runner.invoke(app, ["run", str(exp), "--store", str(store)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0  # one line
    assert not (tmp_path / "out").exists() and not store.exists()


def test_replay_of_an_unknown_stage_fails_before_anything_is_written(tmp_path):
    stage = f"  - {{name: a, data: {tmp_path / 'a.jsonl'}, replay: {{'stage:nope': 0.5}}}}"
    exp = tiny_experiment(tmp_path, "  - {name: f, method: {name: full}}", stages=stage)
    result = runner.invoke(app, ["run", str(exp), "--store", str(tmp_path / "s.db")])
    assert result.exit_code == 2 and "no stage named 'nope'" in result.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- one source for every figure
def test_a_lower_is_better_target_reads_the_same_in_summary_table_report_and_compare(tmp_path):
    """Target = perplexity (lower is better): 10 -> 5 is a gain of +5 everywhere (the old run summary said -5)."""
    from ftlab.cli.train import print_table
    from ftlab.report.digest import build_summary, compare_rows
    from ftlab.report.html import render_report
    from ftlab.report.summary import load_summary

    store = Store(tmp_path / "s.db")
    config = {"name": "ppl", "stages": [{"name": "a", "targets": ["/data/ppl.txt"]}], "retained": ["r1"],
              "suite_names": {"/data/ppl.txt": "ppl", "r1": "r1"}}  # fmt: skip
    store.start_run("run", "ppl", str(tmp_path / "o"), config, seed=0, git_sha="", versions={})
    store.add_arm("run", "base", "base", "none", None, {})
    store.add_arm("run", "full", "train", "full", None, {})
    store.finish_stage("run", "full", 1, "a", train_seconds=1.0, trainable_params=9)
    for arm, stage, ppl, r1 in (("base", 0, 10.0, 0.8), ("full", 1, 5.0, 0.6)):
        store.add_result("run", arm, stage, "target", Result("ppl", ppl, "perplexity", higher_is_better=False))
        store.add_result("run", arm, stage, "retained", Result("r1", r1))

    summary = build_summary(store, "run")
    assert summary["arms"]["full"]["target_gain"] == pytest.approx(5.0)
    assert summary["arms"]["full"]["retained"] == {"r1": pytest.approx(0.75)}
    table = tmp_path / "table.txt"
    with table.open("w") as fh:
        print_table(summary, file=fh)
    row = next(line for line in table.read_text().splitlines() if "│ full" in line)
    assert "+5.000" in row and "0.750" in row
    page = render_report(store, "run", tmp_path / "r.html").read_text()
    assert "<td>+5.000</td>" in page.replace(" ", "") or "+5.000" in page
    (point,) = load_summary(store, "run").points
    assert point.gain == pytest.approx(5.0)
    rows = compare_rows(load_summary(store, "run"), load_summary(store, "run"))
    assert next(r for r in rows if r["arm"] == "full" and r["metric"] == "target gain")["a"] == pytest.approx(5.0)


def test_summary_json_is_the_report_summary(tmp_path):
    """What `ftlab run` writes is exactly what the report builder computes from the store."""
    from ftlab.report.digest import build_summary

    store = Store(tmp_path / "s.db")
    make_run(store, "r2", tmp_path / "o")
    s = build_summary(store, "r2")
    assert s["arms"]["full"]["target_gain"] == pytest.approx(((0.5 - 0.2) + (0.9 - 0.1)) / 2)
    assert s["arms"]["full"]["retained"]["ppl"] == pytest.approx(10.0 / 15.0)
    assert s["arms"]["full"]["matrix"]["R"] == [[0.2, 0.1], [0.9, 0.15], [0.5, 0.9]]
    assert s["arms"]["full+scale=0.5"]["stages"] == [{"t1": 0.6, "t2": 0.85, "r1": 0.6, "ppl": 10.0 / 0.75}]


# ---------------------------------------------------------------- the command line
def test_cli_imports_no_torch_sqlite_or_matplotlib():
    code = "import sys, ftlab.cli; print(sorted(m for m in ('torch', 'sqlite3', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_embedded_name_matches_the_models_module():
    from ftlab.cli.common import EMBEDDED
    from ftlab.models import EMBEDDED_NAME

    assert EMBEDDED == EMBEDDED_NAME


# ---------------------------------------------------------------- adapters wherever a model is taken
@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter (with non-zero B) over a tiny base saved to a folder, so the adapter records its base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ftlab.models import save_model, tiny_model, tiny_tokenizer

    tmp = tmp_path_factory.mktemp("adapter")
    save_model(tiny_model(), tiny_tokenizer(), tmp / "base")
    from ftlab.models import load_model

    base, tok = load_model(tmp / "base")
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    peft.save_pretrained(tmp / "adapter")
    merged = peft.merge_and_unload()
    save_model(merged, tok, tmp / "merged")
    return tmp


def test_load_model_takes_an_adapter_folder(adapter):
    import torch

    from ftlab.models import load_model

    recorded = json.loads((adapter / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded) == adapter / "base"
    model, _ = load_model(adapter / "adapter")
    merged, _ = load_model(adapter / "merged")
    base, _ = load_model(adapter / "base")
    sd, want, plain = model.state_dict(), merged.state_dict(), base.state_dict()
    assert set(sd) == set(want)  # a plain model, merged
    assert all(torch.allclose(sd[k], want[k], atol=1e-6) for k in sd)
    assert not torch.allclose(
        sd["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"]
    )
    kept, _ = load_model(adapter / "adapter", merge=False)
    from peft import PeftModel

    assert isinstance(kept, PeftModel)


def test_eval_and_edit_take_an_adapter_folder(adapter, tmp_path):
    from ftlab.models import load_model

    suite = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hi", "answer": "x"}, {"prompt": "Yo", "answer": "y"}])
    by_adapter = runner.invoke(app, ["eval", "--model", str(adapter / "adapter"), "--suite", str(suite), "--json"])
    by_merged = runner.invoke(app, ["eval", "--model", str(adapter / "merged"), "--suite", str(suite), "--json"])
    assert by_adapter.exit_code == 0, by_adapter.output
    last = [json.loads(r.stdout.strip().splitlines()[-1])["suites"]["q"] for r in (by_adapter, by_merged)]
    assert last[0] == last[1]
    out = tmp_path / "scaled"
    args = ["edit", "scale", "--base", str(adapter / "base"), "--tuned", str(adapter / "adapter"), "--out", str(out)]
    done = runner.invoke(app, [*args, "--factor", "1.0"])
    assert done.exit_code == 0, done.output
    scaled, merged = load_model(out)[0].state_dict(), load_model(adapter / "merged")[0].state_dict()
    assert all((scaled[k] - merged[k]).abs().max() < 1e-6 for k in merged)


def test_a_folder_that_is_neither_model_nor_adapter_is_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    suite = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hi", "answer": "x"}])
    done = runner.invoke(app, ["eval", "--model", str(tmp_path / "empty"), "--suite", str(suite)])
    assert done.exit_code == 2 and "nor a PEFT adapter folder" in done.output


# ---------------------------------------------------------------- which model anchors DPO/GRPO in later stages
@pytest.mark.parametrize("reference", ["base", "stage_start"])
def test_grpo_reference_in_the_second_stage(tmp_path, monkeypatch, reference):
    """Stage 2's KL reference is the run's base model with `reference: base`, the stage-1 model with
    `stage_start` (the single-stage case cannot tell them apart)."""
    import torch

    from ftlab.models import load_model
    from ftlab.train import reference as reference_module

    refs = []
    real = reference_module.train_against_reference

    def spy(job, *args, ref_model=None, **kwargs):
        refs.append((job.stage, ref_model, {k: v.detach().clone() for k, v in job.model.state_dict().items()}))
        return real(job, *args, ref_model=ref_model, **kwargs)

    monkeypatch.setattr("ftlab.train.grpo.train_against_reference", spy)
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "reward": "numeric"} for i in range(4)]
    write_jsonl(tmp_path / "v.jsonl", rows)
    settings = f"{{max_completion_length: 2, reference: {reference}}}"
    first = f"  - {{data: {tmp_path / 'v.jsonl'}, trainer: sft}}"  # SFT moves the weights (GRPO here has no signal)
    second = f"  - {{data: {tmp_path / 'v.jsonl'}, trainer: grpo, settings: {settings}}}"
    exp = tiny_experiment(tmp_path, "  - {name: g, method: {name: full}}", stages=f"{first}\n{second}")
    cfg = load_experiment(exp, ["train.lr=0.05", "train.max_steps=2"])
    run_experiment(cfg, Store(tmp_path / "s.db"))
    ((stage, ref, start),) = refs
    assert stage == 1
    base = load_model("tiny-test")[0].state_dict()
    assert not all(torch.equal(start[k], base[k]) for k in base)  # stage 2 starts from the stage-1 model
    if reference == "stage_start":
        assert ref is None  # the model as stage 2 starts is copied and frozen inside
    else:
        got = ref.state_dict()
        assert all(torch.equal(got[k], base[k]) for k in base)
        assert not any(p.requires_grad for p in ref.parameters())


def test_dataclass_fields_of_stage_job_are_documented():
    from ftlab.train.stage import StageJob

    doc = StageJob.__doc__
    assert all(f"{f.name}:" in doc for f in dataclasses.fields(StageJob))
