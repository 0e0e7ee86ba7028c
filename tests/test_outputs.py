"""Run outputs: LoRA arms save PEFT adapters, subset methods save weight diffs (``ftlab.diffs``), full arms whole
models; every command that takes a model loads both kinds, and a second stage continues from the first's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _util import write_jsonl
from typer.testing import CliRunner

from ftlab.diffs import (
    META_FILE,
    SafetensorsReader,
    apply_diff,
    compute_diff,
    diff_base,
    folder_bytes,
    is_diff,
    iter_tensors,
    output_kind,
    save_diff,
)
from ftlab.errors import ModelNotFoundError
from ftlab.models import load_model, save_model, tiny_model, tiny_tokenizer

TEXT = ["The river runs to the sea.", "Boats sail on the sea.", "The sea is wide and blue.", "Birds fly over it."]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- the diff format
def test_diff_round_trip_is_bit_exact_and_stores_only_changes(tmp_path):
    tuned = tiny_model()
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight[3, :5] += 0.01  # 5 entries: sparse
        tuned.model.layers[1].self_attn.o_proj.weight.mul_(1.5)  # every entry: dense
    folder = save_diff("tiny-test", tuned, tmp_path / "d", tokenizer=tiny_tokenizer())
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["base"] == "tiny-test" and meta["dtype"] == "float32" and meta["changed_entries"] == 5 + 64 * 64
    assert {k: v["stored"] for k, v in meta["tensors"].items()} == {
        "model.layers.0.mlp.down_proj.weight": "sparse",
        "model.layers.1.self_attn.o_proj.weight": "dense",
    }
    full = save_model(tuned, None, tmp_path / "full")
    assert folder_bytes(folder / "diff.safetensors") < 0.05 * folder_bytes(full)
    assert is_diff(folder) and output_kind(folder) == "diff" and output_kind(full) == "model"
    loaded, tok = load_model(folder)
    want = _weights(tuned)
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)  # the tuned values, not base + delta
    assert tok.chat_template == tiny_tokenizer().chat_template
    # the per-tensor reader streams the same tensors from a base folder on disk
    base_dir = save_model(tiny_model(), tiny_tokenizer(), tmp_path / "base")
    streamed = dict(iter_tensors(save_diff(base_dir, tuned, tmp_path / "d2"), SafetensorsReader(base_dir)))
    assert diff_base(tmp_path / "d2") == str(base_dir.resolve())
    assert streamed.keys() == want.keys() and all(torch.equal(streamed[k], want[k]) for k in want)


def test_tied_weights_are_stored_once_and_carried_by_the_tie():
    def tied():
        m = tiny_model()
        m.lm_head.weight = m.model.embed_tokens.weight
        return m

    tuned = tied()
    with torch.no_grad():
        tuned.model.embed_tokens.weight[7] += 1.0
    tensors, table = compute_diff(_weights(tied()), tuned.state_dict())
    assert list(table) == ["model.embed_tokens.weight"] and table["model.embed_tokens.weight"]["changed"] == 64


def test_a_diff_that_does_not_fit_its_base_is_refused(tmp_path):
    tuned = tiny_model()
    with torch.no_grad():
        tuned.model.norm.weight[0] = 2.0
    folder = save_diff("tiny-test", tuned, tmp_path / "d")
    with pytest.raises(ModelNotFoundError, match="shape"):
        apply_diff(tiny_model(d_model=32), folder)
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, "version": 9}))
    with pytest.raises(ModelNotFoundError, match=r"ftlab_diff.json: field 'version' is 9"):
        load_model(folder)


# ---------------------------------------------------------------- outputs of `ftlab run`
def _experiment(tmp: Path, out: Path, extra: str = "", base: str = "tiny-test", arms: str | None = None) -> Path:
    a = [{"prompt": f"Capital of Aland{i}?", "completion": f"Ax{i}"} for i in range(8)]
    b = [{"prompt": f"Capital of Bland{i}?", "completion": f"Bx{i}"} for i in range(8)]
    write_jsonl(tmp / "a.jsonl", a)
    write_jsonl(tmp / "b.jsonl", b)
    write_jsonl(tmp / "a_test.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]} for r in a[:4]])
    write_jsonl(tmp / "text.jsonl", [{"text": t} for t in TEXT])
    arms = (
        arms
        or """
  - {name: lora, method: {name: lora, params: {r: 4}}, train: {lr: 0.01}}
  - {name: sparse, method: {name: sparse, params: {proportion: 0.02, full_ft_steps: 1}}}"""
    )
    path = tmp / f"{out.name}.yaml"
    path.write_text(f"""
base: {base}
out: {out}
train: {{lr: 0.003, max_steps: 1, batch_size: 4, save_steps: 0, logging_steps: 10}}
stages:
  - {{name: a, data: {tmp / "a.jsonl"}, targets: [{tmp / "a_test.jsonl"}]}}
  - {{name: b, data: {tmp / "b.jsonl"}}}
retained: [{tmp / "text.jsonl"}]
arms:{arms}
eval: {{batch_size: 4, max_new_tokens: {{{tmp / "a_test.jsonl"}: 4}}}}
{extra}""")
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A two-stage run with a lora and a sparse arm on the tiny model, one step a stage (trained once for the
    module); the full arm's whole-model output is covered by ``test_a_run_starts_from_an_adapter_or_diff_folder``."""
    from ftlab.recipes.experiment import load_experiment
    from ftlab.recipes.run import run_experiment
    from ftlab.store import Store

    tmp = tmp_path_factory.mktemp("outputs")
    store = Store(tmp / "s.db")
    summary = run_experiment(load_experiment(_experiment(tmp, tmp / "run")), store)
    return tmp, tmp / "run", store, summary


def _suite(tmp: Path, name: str):
    from ftlab.evals import load_suite

    return load_suite(str(tmp / name))


def test_run_saves_adapters_and_diffs_that_reproduce_the_scored_models(study):
    from ftlab.evals import evaluate

    tmp, out, store, summary = study
    arms = out / "arms"
    kinds = {(a, s): output_kind(arms / a / s) for a in ("lora", "sparse") for s in ("stage-1", "model")}
    assert kinds == {
        ("lora", "stage-1"): "adapter", ("lora", "model"): "adapter",
        ("sparse", "stage-1"): "diff", ("sparse", "model"): "diff",
    }  # fmt: skip
    # each stage sits on the model it started from: the base, then the previous stage's output
    adapter_base = lambda f: json.loads((f / "adapter_config.json").read_text())["base_model_name_or_path"]  # noqa: E731
    assert adapter_base(arms / "lora" / "stage-1") == "tiny-test"
    assert adapter_base(arms / "lora" / "model") == str((arms / "lora" / "stage-1").resolve())
    assert diff_base(arms / "sparse" / "stage-1") == "tiny-test"
    assert diff_base(arms / "sparse" / "model") == str((arms / "sparse" / "stage-1").resolve())
    # the sparse diff holds at most the entries the method selected in stage 2
    stages = {(r["arm"], r["stage"]): r for r in store.stages(summary["run_id"])}
    info = json.loads(stages["sparse", 2]["info"]) if isinstance(stages["sparse", 2]["info"], str) else None
    info = info or stages["sparse", 2]["info"]
    meta = json.loads((arms / "sparse" / "model" / META_FILE).read_text())
    assert 0 < meta["changed_entries"] <= info["selected"]
    assert info["output"] == "diff" and info["output_bytes"] == folder_bytes(arms / "sparse" / "model")
    # sizes: the adapter and the diff are a small part of a whole model
    whole = folder_bytes(save_model(tiny_model(), tiny_tokenizer(), out.parent / "whole"))
    assert folder_bytes(arms / "lora" / "model") < 0.5 * whole
    assert folder_bytes(arms / "sparse" / "model") < 0.5 * whole
    # loading each final output gives back the model the run scored, bit for bit (same outputs, same perplexity)
    text = _suite(tmp, "text.jsonl")
    for arm in ("lora", "sparse"):
        model, tok = load_model(arms / arm / "model", device="cpu")
        got = evaluate(model, tok, text, batch_size=4, progress=False)
        stored = [r for r in store.results(summary["run_id"], arm) if r["stage"] == 2 and r["suite"] == text.name]
        assert got.score == pytest.approx(stored[0]["score"], rel=1e-6), arm


def test_commands_take_adapter_and_diff_folders(study, tmp_path):
    from ftlab.cli import app

    tmp, out, _, _ = study
    runner = CliRunner()
    for arm in ("lora", "sparse"):
        folder = out / "arms" / arm / "model"
        want = _weights(load_model(folder, device="cpu")[0])
        got = runner.invoke(app, ["eval", "--model", str(folder), "--suite", str(tmp / "text.jsonl"), "--json"])
        assert got.exit_code == 0, got.output
        assert json.loads(got.stdout.strip().splitlines()[-1])
        # --base names the root of a two-stage chain: stage 2 still sits on stage 1 (factor 1 = the tuned model)
        edited = tmp_path / f"{arm}-scaled"
        got = runner.invoke(app, ["edit", "scale", "--factor", "1", "--base", "tiny-test", "--tuned", str(folder),
                                  "--out", str(edited)])  # fmt: skip
        assert got.exit_code == 0, got.output
        scaled = load_model(edited, device="cpu")[0].state_dict()
        assert all(torch.allclose(scaled[k], want[k], atol=1e-6) for k in want), arm
        assert any(not torch.equal(want[k], v) for k, v in tiny_model().state_dict().items())
        got = runner.invoke(app, ["analyze", "intruders", "--base", "tiny-test", "--tuned", str(folder), "--json"])
        assert got.exit_code == 0, got.output


@pytest.mark.parametrize("kind", ["lora", "sparse"])
def test_a_run_starts_from_an_adapter_or_diff_folder(study, tmp_path, kind):
    """`base:` is a run output; the base scores are the folder's model's; `save: model` writes a whole model."""
    from ftlab.evals import evaluate
    from ftlab.recipes.experiment import load_experiment
    from ftlab.recipes.run import run_experiment
    from ftlab.store import Store

    tmp, out, _, _ = study
    folder = out / "arms" / kind / "model"
    arms = "\n  - {name: l, method: {name: lora, params: {r: 2}}, save: model}"
    exp = _experiment(tmp_path, tmp_path / "again", base=str(folder), arms=arms)
    exp.write_text(exp.read_text().replace("  - {name: b, data:", "  # "))
    summary = run_experiment(load_experiment(exp), Store(tmp_path / "s.db"))
    text = _suite(tmp_path, "text.jsonl")
    model, tok = load_model(folder, device="cpu")
    want = evaluate(model, tok, text, batch_size=4, progress=False).score
    raw = evaluate(*load_model("tiny-test", device="cpu"), text, batch_size=4, progress=False).score
    assert summary["base"][text.name] == pytest.approx(want, rel=1e-6) and want != pytest.approx(raw, rel=1e-6)
    assert output_kind(tmp_path / "again" / "arms" / "l" / "model") == "model"


def test_save_setting_is_checked(tmp_path):
    from ftlab.config import ConfigError
    from ftlab.recipes.experiment import load_experiment, save_mode

    exp = _experiment(tmp_path, tmp_path / "o", extra="save: everything")
    with pytest.raises(ConfigError, match=r"save: 'everything' is not one of auto, model, adapter, diff"):
        load_experiment(exp)
    arms = "\n  - {name: s, method: {name: sparse}, save: adapter}"
    with pytest.raises(ConfigError, match=r"arms\[0\].save: 'adapter' needs method lora; arm 's' uses sparse"):
        load_experiment(_experiment(tmp_path, tmp_path / "o", arms=arms))
    cfg = load_experiment(_experiment(tmp_path, tmp_path / "o", extra="save: diff"))
    assert [save_mode(cfg, a) for a in cfg.arms] == ["diff", "diff"]
    arms = "".join(f"\n  - {{name: {m[0]}, method: {{name: {m}}}}}" for m in ("full", "lora", "hft"))
    cfg = load_experiment(_experiment(tmp_path, tmp_path / "o", arms=arms))
    assert [save_mode(cfg, a) for a in cfg.arms] == ["model", "adapter", "diff"]
