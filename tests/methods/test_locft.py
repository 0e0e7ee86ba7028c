"""LocFT-BF: one block's down_proj trains (exact names), skip/stop rules on the batch and epoch loss."""

import pytest
import torch
import torch.nn.functional as F

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


# One short and one long target: the mean of per-sample means and the mean over all target tokens differ.
UNEVEN = [
    {"prompt": "Capital of Zorland?", "completion": "Q"},
    {"prompt": "Say it", "completion": "The capital city of Zorland is Zorlandopolis, by the river."},
]


def _uneven_losses(model):
    """(mean of per-sample token-mean losses, token-mean loss over the batch), computed one sample at a time."""
    from ftlab.data import sft_dataset
    from ftlab.models import tiny_tokenizer

    dataset = sft_dataset(UNEVEN, "completion", tiny_tokenizer(), 128)
    per_sample, total, tokens = [], 0.0, 0
    for row in dataset:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:] != -100
        nll = F.cross_entropy(logits[target], labels[0, 1:][target], reduction="sum")
        per_sample.append(float(nll) / int(target.sum()))
        total, tokens = total + float(nll), tokens + int(target.sum())
    return sum(per_sample) / len(per_sample), total / tokens, dataset


def test_decision_loss_is_the_mean_of_per_sample_means():
    from ftlab.models import tiny_tokenizer

    model = tiny_model()
    per_sample, token_mean, dataset = _uneven_losses(model)
    assert abs(per_sample - token_mean) > 1e-2  # the case tells the two averages apart
    plan = locft.plan(model, locft.Config(), PlanContext())
    (callback,) = plan.callbacks
    callback.on_train_begin(None, None, None, model=model)
    try:
        pad = tiny_tokenizer().pad_token_id
        width = max(len(r["input_ids"]) for r in dataset)
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in dataset])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in dataset])
        mask = (torch.arange(width) < torch.tensor([len(r["input_ids"]) for r in dataset])[:, None]).long()
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels)  # padded batch, logits path of the hook
    finally:
        callback.on_train_end(None, None, None)
    assert callback.meter.take() == pytest.approx(per_sample, abs=1e-5)
    # the differentiable form gives the same value on the same batch
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert float(locft.sample_mean_loss(logits, labels)) == pytest.approx(per_sample, abs=1e-5)


def test_fused_head_outputs_are_averaged_per_sample():
    log_probs = torch.tensor([[-1.0, 0.0, 0.0, 0.0], [-2.0, -2.0, -2.0, -6.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    # samples: 1.0 and 3.0 (the third has no target token and is left out); the token mean would be 13 / 5
    assert locft.per_sample_loss(log_probs, mask).tolist() == [1.0, 3.0]


def test_skip_and_stop_decisions_use_the_per_sample_average(tmp_path):
    from ftlab.config import MethodConfig, TrainConfig
    from ftlab.models import tiny_tokenizer
    from ftlab.train.sft import train_sft

    model = tiny_model()
    per_sample, token_mean, dataset = _uneven_losses(model)
    assert per_sample < token_mean  # so a threshold between them skips and stops only under the per-sample rule
    mid = (per_sample + token_mean) / 2
    base = {k: v.clone() for k, v in model.state_dict().items()}
    params = {"skip_loss_below": mid, "stop_loss_below": mid}
    train = TrainConfig(lr=1e-2, max_steps=3, batch_size=2, logging_steps=100)  # one batch = one epoch
    result = train_sft(model, tiny_tokenizer(), dataset, MethodConfig("locft", params), train, tmp_path)
    assert result.plan_info["skipped_batches"] == 1 and result.plan_info["stopped_after_epoch"] == 1
    assert result.steps == 1
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_sft_backpropagates_the_per_sample_average(monkeypatch, tiny_data, tmp_path):
    """The plan hands the trainer the released loss (mean over samples of each one's token mean, scaled for
    gradient accumulation), and train_sft passes it to the SFT trainer."""
    from types import SimpleNamespace

    from ftlab.config import MethodConfig, TrainConfig
    from ftlab.models import tiny_tokenizer
    from ftlab.train import sft

    plan = locft.plan(tiny_model(), locft.Config(), PlanContext(train_cfg=TrainConfig(grad_accum=2)))
    logits = torch.randn(2, 9, 20, generator=torch.Generator().manual_seed(0))
    labels = torch.full((2, 9), -100)
    labels[0, 1:3] = torch.tensor([3, 4])  # a short target
    labels[1, 1:9] = torch.arange(5, 13)  # a long one
    token_mean = F.cross_entropy(logits[:, :-1].reshape(-1, 20), labels[:, 1:].reshape(-1), ignore_index=-100)
    got = plan.compute_loss_func(SimpleNamespace(logits=logits), labels)
    assert got == pytest.approx(float(locft.sample_mean_loss(logits, labels)) / 2, rel=1e-6)
    assert abs(float(got) - float(token_mean) / 2) > 1e-3
    from _util import spy_kwargs

    seen = spy_kwargs(monkeypatch, sft, "SFTTrainer")
    train = TrainConfig(lr=1e-3, max_steps=1, batch_size=4)
    sft.train_sft(tiny_model(), tiny_tokenizer(), tiny_data, MethodConfig("locft"), train, tmp_path)
    assert seen["compute_loss_func"] is not None
