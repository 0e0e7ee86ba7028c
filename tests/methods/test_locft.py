"""LocFT-BF: one block's down_proj trains (exact names), skip/stop rules on the batch and epoch loss."""

from ftlab.methods import locft
from ftlab.methods.base import PlanContext
from ftlab.models import tiny_model


def test_default_layer_follows_the_released_configs():
    assert locft.default_layer(32, "llama") == 22  # Llama-3-8B-Instruct
    assert locft.default_layer(28, "qwen2") == 6  # Qwen2.5-7B-Instruct
    assert locft.default_layer(32, "mistral") == 23
    assert locft.default_layer(30, "llama") == 20  # SmolLM2-135M
    assert locft.default_layer(4, "llama") == 2


def test_exact_location_on_a_deep_model():
    model = tiny_model(n_layer=24, d_model=16)
    assert locft.plan(model, locft.Config(), PlanContext()).trainable == {"model.layers.16.mlp.down_proj.weight"}
    assert locft.plan(model, locft.Config(layer=2), PlanContext()).trainable == {"model.layers.2.mlp.down_proj.weight"}


def test_training_moves_only_the_located_matrix(train_tiny, changed):
    base, model, result = train_tiny("locft", {"skip_loss_below": 0.0, "stop_loss_below": 0.0})
    assert set(changed(base, model)) == {"model.layers.2.mlp.down_proj.weight"}
    assert result.trainable_params == 64 * 128 and result.plan_info["skipped_batches"] == 0


def test_low_loss_batches_make_no_update(train_tiny, changed):
    # every batch's loss (about ln 101 on the random model) is below 1e3, so every update is skipped
    base, model, result = train_tiny("locft", {"skip_loss_below": 1e3, "stop_loss_below": 0.0})
    assert changed(base, model) == {}
    assert result.plan_info["skipped_batches"] == result.steps == 3


def test_low_epoch_loss_stops_training(train_tiny):
    # 16 records / batch 4 = 4 steps per epoch: the loss is "low enough" at the first epoch end, so it stops there
    _, _, result = train_tiny("locft", {"skip_loss_below": 0.0, "stop_loss_below": 1e3}, steps=40)
    assert result.steps == 4 and result.plan_info["stopped_after_epoch"] == 1
    _, _, unstopped = train_tiny("locft", {"skip_loss_below": 0.0, "stop_loss_below": 0.0}, steps=8)
    assert unstopped.steps == 8
