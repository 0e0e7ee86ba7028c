"""The memory plan (``ftlab.memory``): its arithmetic on round numbers, its counts on the tiny model against what the
methods really train, and the refusal before any weight is loaded."""

from __future__ import annotations

import pytest

from ftlab.config import TrainConfig
from ftlab.errors import InputError
from ftlab.loading import ModelSettings
from ftlab.memory import (
    ACTIVATION_BYTES,
    CHECKPOINT_BYTES,
    GB,
    NF4_BYTES,
    check_plan,
    plan_for_model,
    plan_memory,
)

B = 1_000_000_000  # a 1B-parameter model


def test_full_adam_fp32_1b_is_16_gb_before_activations():
    plan = plan_memory(params=B, trainable=B, weight_bytes=4)
    assert (plan.weights, plan.gradients, plan.optimizer) == (4 * B, 4 * B, 8 * B)  # two Adam moments
    assert plan.total == 16 * GB  # no activations without a shape


def test_bf16_halves_every_part_and_lora_counts_only_adapters():
    full = plan_memory(params=B, trainable=B, weight_bytes=2)
    assert full.weights + full.gradients + full.optimizer == 8 * GB
    adapters = 10_000_000
    lora = plan_memory(params=B, trainable=adapters, weight_bytes=2, trainable_bytes=4)
    assert (lora.weights, lora.gradients, lora.optimizer) == (2 * B, 4 * adapters, 8 * adapters)


def test_4bit_base_weights_and_sparse_optimizer_state():
    q = plan_memory(params=B, trainable=0, quantized_params=900_000_000, quantization="4bit")
    assert q.weights == pytest.approx(900_000_000 * NF4_BYTES + 100_000_000 * 4)  # the rest upcast to fp32
    assert 0.5 < NF4_BYTES < 0.52
    lift = plan_memory(params=B, trainable=B, optimizer_entries=1000, optimizer_extra=4000, weight_bytes=2)
    assert lift.optimizer == 2 * 1000 * 2 + 4000 and lift.gradients == 2 * B


def test_activations_follow_the_stated_factor_and_checkpointing_cuts_them():
    shape = dict(params=0, trainable=0, batch=8, seq=1024, hidden=2048, layers=16, vocab=32000)
    plain = plan_memory(**shape, compute_bytes=2)
    tokens = 8 * 1024
    assert plain.activations == tokens * 2048 * 16 * ACTIVATION_BYTES + tokens * 32000 * 4 * 2
    ckpt = plan_memory(**shape, compute_bytes=2, gradient_checkpointing=True)
    assert ckpt.activations == tokens * 2048 * (16 * CHECKPOINT_BYTES + ACTIVATION_BYTES) + tokens * 32000 * 8
    assert ckpt.activations < plain.activations / 3
    assert plan_memory(**shape, compute_bytes=4).activations > plain.activations  # fp32 compute doubles the factor


def test_check_plan_says_what_to_try():
    plan = plan_memory(params=8 * B, trainable=8 * B, available=80 * GB, device="H100")
    with pytest.raises(InputError, match=r"needs ~128\.0 GB, H100 has 80\.0 GB; try lora, load.quantization: 4bit"):
        check_plan(plan)
    check_plan(plan_memory(params=B, trainable=0, available=80 * GB))  # fits: no error


@pytest.mark.parametrize(("method", "params"), [("lora", {"r": 4}), ("hft", {}), ("freeze", {"layers": "1"})])
def test_tiny_model_counts_match_what_the_method_trains(method, params):
    """The plan's trainable count (worked out on the meta device) equals the real plan's on the real tiny model."""
    from ftlab.methods import PlanContext, apply_plan, get_method, method_config
    from ftlab.models import tiny_model

    train = TrainConfig(batch_size=2)
    plan = plan_for_model("tiny-test", ModelSettings(), method, params, train, seq=32)
    model = tiny_model()
    real = get_method(method).plan(model, method_config(method, params), PlanContext(train_cfg=train))
    target, _ = apply_plan(model, real)
    trained = sum(p.numel() for p in target.parameters() if p.requires_grad)
    per_entry = 4  # fp32 model, and LoRA's adapters are fp32 either way
    assert plan.gradients == trained * per_entry
    assert plan.optimizer == 2 * trained * per_entry
    assert plan.weights == sum(p.numel() for p in tiny_model().parameters()) * 4


def test_train_refuses_a_plan_that_does_not_fit_before_loading(tiny_config, monkeypatch):
    import transformers

    from ftlab.recipes.train import run_train

    monkeypatch.setattr("ftlab.memory.available_bytes", lambda device: (1e5, "a tiny device"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr("ftlab.models.tiny_model", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr("ftlab.memory.meta_model", _meta_tiny)
    with pytest.raises(InputError, match=r"training needs ~0\.0 GB, a tiny device has 0\.0 GB"):
        run_train(tiny_config)


def _meta_tiny(ref, settings):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftlab.models import TINY_CHARS, TINY_SPECIALS

    config = LlamaConfig(
        vocab_size=len(TINY_SPECIALS) + len(TINY_CHARS), hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_run_plans_every_arm_and_names_the_one_that_does_not_fit(tmp_path, monkeypatch, capsys):
    from ftlab.config import from_dict
    from ftlab.recipes.experiment import ExperimentConfig, validate
    from ftlab.recipes.preflight import plan_arms

    cfg = from_dict(
        ExperimentConfig,
        {
            "base": "tiny-test",
            "out": str(tmp_path / "out"),
            "stages": [{"data": "fictional-capitals", "max_length": 64}],
            "arms": [{"name": "lora", "method": {"name": "lora"}}, {"name": "full", "method": {"name": "full"}}],
        },
    )
    validate(cfg)
    full = plan_for_model("tiny-test", ModelSettings(), "full", {}, TrainConfig(batch_size=8), seq=64).total
    # room for the LoRA arm's plan, not for full fine-tuning's
    monkeypatch.setattr("ftlab.memory.available_bytes", lambda device: (full - 1, "a small device"))
    with pytest.raises(InputError, match=r"^arms\.full: training needs"):
        plan_arms(cfg)
    assert "memory plan: arm lora" in capsys.readouterr().err
    cfg.arms[1].train = {"memory_check": False}
    plan_arms(cfg)  # printed, not checked
