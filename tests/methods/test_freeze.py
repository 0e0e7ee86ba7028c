"""Freeze: train chosen blocks / modules / extras, matched by whole name parts (block 2 is never block 20)."""

import pytest

from ftlab.config import ConfigError
from ftlab.methods import freeze
from ftlab.methods.base import PlanContext
from ftlab.models import tiny_model
from ftlab.params import matches, parse_layers


def test_layer_specs():
    assert parse_layers("0-1,3", 4) == [0, 1, 3]
    assert parse_layers(" 2 ,0-1,1", 4) == [0, 1, 2]
    assert parse_layers("", 3) == [0, 1, 2]
    for bad, msg in [("4", "outside 0-3"), ("3-1", "outside"), ("a-b", "cannot read"), ("1,,2", "cannot read")]:
        with pytest.raises(ConfigError, match=msg):
            parse_layers(bad, 4)


def test_patterns_match_whole_name_parts():
    assert matches("model.layers.2.mlp.up_proj.weight", "layers.2")
    assert not matches("model.layers.20.mlp.up_proj.weight", "layers.2")
    assert matches("model.norm.weight", "model.norm")
    assert not matches("model.layers.0.input_layernorm.weight", "norm")
    assert matches("model.layers.0.input_layernorm.weight", "*layernorm")
    assert not matches("model.layers.0.mlp.up_proj.weight", "mlp.up")


def test_block_2_of_24_never_selects_blocks_20_to_23():
    model = tiny_model(n_layer=24, d_model=16)
    plan = freeze.plan(model, freeze.Config(layers="2", modules=["mlp.down_proj"]), PlanContext())
    assert plan.trainable == {"model.layers.2.mlp.down_proj.weight"}


def test_default_trains_every_block_and_nothing_outside():
    model = tiny_model()
    plan = freeze.plan(model, freeze.Config(), PlanContext())
    assert plan.trainable == {n for n, _ in model.named_parameters() if ".layers." in n}


def test_a_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ConfigError, match="'mlp.dwn_proj' matches no parameter"):
        freeze.plan(tiny_model(), freeze.Config(modules=["mlp.dwn_proj"]), PlanContext())
    with pytest.raises(ConfigError, match="extra: 'head'"):
        freeze.plan(tiny_model(), freeze.Config(extra=["head"]), PlanContext())


def test_training_moves_exactly_the_selection(train_tiny, changed):
    params = {"layers": "0-1,3", "modules": ["mlp.down_proj", "self_attn.q_proj"], "extra": ["lm_head"]}
    base, model, result = train_tiny("freeze", params)
    want = {f"model.layers.{i}.{m}.weight" for i in (0, 1, 3) for m in ("mlp.down_proj", "self_attn.q_proj")}
    want.add("lm_head.weight")
    assert set(changed(base, model)) == want
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    assert result.trainable_params == sum(sizes[n] for n in want) == result.plan_info["trainable_params"]
