"""QLoRA: ``lora`` on a 4-bit NF4 base (bitsandbytes) trains the adapters and leaves the packed base bit-identical.

bitsandbytes' CPU backend (0.49 and later) runs NF4 matmuls in plain PyTorch, so this runs on CPU; where it cannot,
the test is skipped with the backend's own error, and ``bench/gpu_scale.py`` covers QLoRA on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from ftlab.loading import ModelSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cpu_4bit():
    """Skip (with the reason) unless bitsandbytes can run a 4-bit forward and backward on this CPU."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        pytest.skip(f"bitsandbytes is not installed ({err}); pip install 'ftlab[quant]'")
    try:
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")  # quantizes
        assert layer.weight.dtype == torch.uint8, "the weights were not packed"
        x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
        layer(x).float().sum().backward()
    except Exception as err:  # noqa: BLE001 - whatever the backend raises is the reason to report
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot run 4-bit layers on this CPU: {type(err).__name__}: {err}")
    return bnb


def test_qlora_trains_adapters_over_a_frozen_4bit_base(cpu_4bit, train_tiny):
    from ftlab.models import load_model

    settings = ModelSettings(dtype="bf16", quantization="4bit", device_map="cpu")
    model, _ = load_model("tiny-test", settings=settings)
    linear = model.model.layers[0].self_attn.q_proj
    assert isinstance(linear, cpu_4bit.nn.Linear4bit) and linear.weight.dtype == torch.uint8  # packed NF4
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert len(packed) == 4 * 7  # every Linear of the 4 blocks (the head stays unquantized)

    _, _, result = train_tiny("lora", {"r": 4}, steps=4, model=model, lr=1e-2)

    peft_model = result.model
    params = dict(peft_model.named_parameters())
    lora_b = {n: p for n, p in params.items() if "lora_B" in n}
    assert lora_b and all(p.requires_grad for p in lora_b.values())
    moved = [n for n, p in lora_b.items() if p.detach().abs().sum() > 0]  # B starts at zero
    assert len(moved) == len(lora_b)
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in params.items()}
    assert all(torch.equal(after[n], v) for n, v in packed.items())  # the 4-bit base did not move
    assert not any(p.requires_grad for n, p in params.items() if "lora_" not in n)
    assert result.trainable_params == sum(p.numel() for n, p in params.items() if "lora_" in n)
    assert 0 < result.log_history[-1]["train_loss"] < 10  # finite: the bf16 compute did not blow up


def test_qlora_adapter_loads_back_on_the_quantized_base(cpu_4bit, tmp_path, tiny_config):
    """``ftlab train`` with ``load.quantization: 4bit`` writes an adapter (no merged model) that loads again."""
    from ftlab.models import load_model
    from ftlab.recipes.train import run_train

    tiny_config.method.name = "lora"
    tiny_config.load = ModelSettings(dtype="bf16", quantization="4bit")
    out, result = run_train(tiny_config)
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "model").exists()
    model, _ = load_model(out / "adapter", settings=tiny_config.load)
    assert type(model).__name__ == "PeftModelForCausalLM"  # not merged into the 4-bit weights
    trained = {n: p for n, p in result.model.named_parameters() if "lora_B" in n}
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[n].cpu(), p.detach().cpu()) for n, p in trained.items())


def test_gpu_scale_bench_runs_both_arms_on_cpu(cpu_4bit, monkeypatch, capsys):
    """``bench/gpu_scale.py --device cpu``: the GPU check's code, on its tiny size (``--size small``, ~13M, takes
    under a minute by hand), two steps an arm."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "gpu_scale.py"
    spec = importlib.util.spec_from_file_location("gpu_scale", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert bench.main(["--size", "tiny", "--device", "cpu", "--steps", "2", "--peak-flops", "1e12"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert lines[0]["peak_flops"] == 1e12 and lines[0]["peak_source"] == "--peak-flops"
    rows = {r["arm"]: r for r in lines[1:]}
    assert set(rows) == {"full", "qlora"}
    for r in rows.values():
        assert {"arm", "tokens_per_s", "mfu", "peak_gpu_mem_mb", "seconds"} <= set(r)
        assert r["steps"] == 2 and r["tokens"] == 2 * 2 * 32 and r["tokens_per_s"] > 0
        assert r["mfu"] == pytest.approx(6 * r["params"] * r["tokens_per_s"] / 1e12, rel=0.01)
    assert all(isinstance(r["planned_mb"], int) for r in rows.values())
