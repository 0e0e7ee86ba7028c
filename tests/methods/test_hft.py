"""HFT: half of every block's attention, FFN and norms train; the half is seeded, re-drawn per stage, and exact."""

import torch

from ftlab.methods import apply_plan, hft
from ftlab.methods.base import PlanContext
from ftlab.models import tiny_model

OUTSIDE = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
GROUP = {"attn": "self_attn", "mlp": "mlp", "norm": None}


def planned_names(mask: dict) -> set[str]:
    names = set(OUTSIDE)
    for i, groups in mask.items():
        for group, units in groups.items():
            for unit in units:
                parent = f"{GROUP[group]}." if GROUP[group] else ""
                names.add(f"model.layers.{i}.{parent}{unit}.weight")
    return names


def test_mask_follows_the_category_rule_for_even_and_odd_depth():
    for n_layer in (4, 5):
        mask = hft.draw_mask(n_layer, seed=3, stage=0)
        assert all(len(m["attn"]) == 2 and len(m["norm"]) == 1 for m in mask.values())
        ffn_sizes = sorted(len(m["mlp"]) for m in mask.values())
        # half the blocks train 2 of 3 FFN matrices, the other half 1; an odd extra block goes to the 2-of-3 half
        assert ffn_sizes == [1] * (n_layer // 2) + [2] * ((n_layer + 1) // 2)


def test_same_stage_and_seed_reproduce_other_stage_or_seed_redraws():
    model = tiny_model()
    a = hft.plan(model, hft.Config(), PlanContext(stage=0, seed=0))
    b = hft.plan(model, hft.Config(), PlanContext(stage=0, seed=0))
    c = hft.plan(model, hft.Config(), PlanContext(stage=1, seed=0))
    d = hft.plan(model, hft.Config(seed=7), PlanContext(stage=0, seed=0))
    assert a.trainable == b.trainable and a.info["mask"] == b.info["mask"]
    assert a.trainable != c.trainable and a.info["mask"] != c.info["mask"]
    assert a.trainable != d.trainable
    assert a.info["stage"] == 0 and c.info["stage"] == 1


def test_training_moves_exactly_the_planned_half(train_tiny, changed):
    base, model, result = train_tiny("hft", stage=2)
    expected = planned_names(result.plan_info["mask"])
    assert set(changed(base, model)) == expected  # every planned tensor moved; every other one is bit-identical
    sizes = {n: p.numel() for n, p in tiny_model().named_parameters()}
    assert result.trainable_params == sum(sizes[n] for n in expected)
    assert result.plan_info["trainable_fraction"] == round(result.trainable_params / sum(sizes.values()), 6)
    attn = [n for n in sizes if ".self_attn." in n]
    want = sum(sizes[n] for n in attn if n in expected) / sum(sizes[n] for n in attn)
    assert result.plan_info["attention_fraction"] == round(want, 6)  # GQA: k/v are smaller, so this is not 0.5


def test_frozen_half_gets_no_gradient_at_all():
    model = tiny_model()
    plan = hft.plan(model, hft.Config(), PlanContext(stage=0, seed=0))
    target, handles = apply_plan(model, plan)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    target(input_ids=ids, labels=ids).loss.backward()
    for name, p in target.named_parameters():
        assert p.requires_grad == (name in plan.trainable), name
        assert (p.grad is not None) == (name in plan.trainable), name  # autograd skipped frozen weights
    assert not handles


def test_embedding_head_and_final_norm_flags():
    model = tiny_model()
    plan = hft.plan(
        model,
        hft.Config(train_embeddings=False, train_head=False, train_final_norm=False),
        PlanContext(stage=0, seed=0),
    )
    assert not plan.trainable & OUTSIDE
    assert plan.trainable == planned_names(plan.info["mask"]) - OUTSIDE


def test_tied_embedding_is_frozen_by_default_and_trains_on_request():
    from transformers import LlamaForCausalLM

    config = tiny_model().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = LlamaForCausalLM(config)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    default = hft.plan(tied, hft.Config(), PlanContext(stage=0, seed=0))
    assert "model.embed_tokens.weight" not in default.trainable and "model.norm.weight" in default.trainable
    assert default.info["tied_embeddings"] and not default.info["embeddings_trained"]
    asked = hft.plan(tied, hft.Config(train_embeddings=True), PlanContext(stage=0, seed=0))
    assert "model.embed_tokens.weight" in asked.trainable and asked.info["embeddings_trained"]
    untied = hft.plan(tiny_model(), hft.Config(), PlanContext(stage=0, seed=0))  # the paper's setting
    assert OUTSIDE <= untied.trainable and not untied.info["tied_embeddings"]


def test_epoch_redraw_changes_the_half_mid_stage(train_tiny, changed):
    # 16 records / batch 4 = 4 steps per epoch; 8 steps run two epochs with two different halves
    base, model, result = train_tiny("hft", {"redraw": "epoch"}, steps=8)
    first = planned_names(result.plan_info["mask"])
    second = planned_names(result.plan_info["epoch_masks"]["1"])
    assert first != second
    assert set(changed(base, model)) == first | second


def test_ftlab_train_cli_runs_hft_and_logs_the_mask(tmp_path, completion_file):
    import json

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from ftlab.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: tiny-test\ndata: {{train: {completion_file}}}\nmethod: {{name: hft}}\n")
    out = tmp_path / "o"
    sets = ["--set", "train.max_steps=2", "--set", "train.lr=0.01", "--set", f"output.dir={out}"]
    result = CliRunner().invoke(app, ["train", str(cfg), *sets, "--set", "method.params.seed=5"])
    assert result.exit_code == 0, result.output
    log = json.loads((out / "train_log.json").read_text())
    assert log["plan_info"]["seed"] == 5
    tuned, base = load_file(out / "model" / "model.safetensors"), tiny_model().state_dict()
    moved = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert moved == planned_names(log["plan_info"]["mask"])
    assert log["trainable_params"] == sum(base[k].numel() for k in moved)
