"""The training speed switches (``ftlab.train.trainer_args.speed_kwargs``): what each resolves to, and that length
grouping keeps every record's loss what it is alone (attention never crosses records)."""

from __future__ import annotations

import pytest
import torch

from ftlab.config import ConfigError, TrainConfig
from ftlab.train import trainer_args
from ftlab.train.trainer_args import BF16_MIN_PARAMS, base_trainer_kwargs, resolve_bf16

pytestmark = pytest.mark.usefixtures("one_thread")


class _Sized(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))


def test_bf16_auto_follows_hardware_and_model_size(monkeypatch):
    big, small = _Sized(BF16_MIN_PARAMS), _Sized(BF16_MIN_PARAMS - 1)
    auto = TrainConfig()
    assert auto.bf16 == "auto"
    monkeypatch.setattr(trainer_args, "bf16_hardware", lambda: True)
    assert resolve_bf16(auto, big) is True
    assert resolve_bf16(auto, small) is False  # casting costs more than it wins on a tiny model
    assert resolve_bf16(auto, None) is False  # DPO / GRPO: no model given, fp32
    assert resolve_bf16(TrainConfig(bf16=False), big) is False
    assert resolve_bf16(TrainConfig(bf16=True), small) is True
    monkeypatch.setattr(trainer_args, "bf16_hardware", lambda: False)
    assert resolve_bf16(auto, big) is False


def test_bf16_must_be_true_false_or_auto():
    with pytest.raises(ConfigError, match=r"train\.bf16: 'yes'"):
        TrainConfig(bf16="yes")


def test_trainer_kwargs_carry_the_switches(monkeypatch, tmp_path):
    monkeypatch.setattr(trainer_args, "bf16_hardware", lambda: True)
    big = _Sized(BF16_MIN_PARAMS)
    on = base_trainer_kwargs(TrainConfig(), tmp_path, big)
    assert on["bf16"] is True and on["train_sampling_strategy"] == "group_by_length"
    assert on["optim"] == "adamw_torch_fused"
    assert on["use_cpu"] is (not torch.cuda.is_available())  # transformers needs it for bf16 on a CPU
    off = base_trainer_kwargs(TrainConfig(bf16=False, group_by_length=False), tmp_path, big)
    assert off["bf16"] is False and off["train_sampling_strategy"] == "random"
    # DPO and GRPO pass no model: their rows have no input_ids to group, and bf16 auto stays fp32
    other = base_trainer_kwargs(TrainConfig(), tmp_path)
    assert other["bf16"] is False and other["train_sampling_strategy"] == "random"


def _varied_data():
    from ftlab.data import sft_dataset
    from ftlab.models import tiny_tokenizer

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    records = [
        {"prompt": f"Say {i}", "completion": " ".join(words[: 1 + (i * 7) % len(words)] * (1 + i % 3))}
        for i in range(32)
    ]
    return sft_dataset(records, "completion", tiny_tokenizer(), 256)


def _token_losses(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    lp = logits[:, :-1].log_softmax(-1)
    tgt = labels[:, 1:]
    nll = -lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll * (tgt != -100)


def test_length_grouping_keeps_each_records_loss_and_cuts_padding(tmp_path):
    """One epoch of the trainer's own dataloader, grouped vs random: the same records, each record's summed loss in
    its grouped batch equals its loss alone, and the grouped batches hold fewer padded positions."""
    from trl import SFTTrainer

    from ftlab.models import tiny_model, tiny_tokenizer
    from ftlab.train.sft import sft_config

    torch.manual_seed(0)
    model = tiny_model().eval()
    data = _varied_data()
    alone = {}
    with torch.no_grad():
        for row in data:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            alone[tuple(row["input_ids"])] = float(_token_losses(model, ids, labels, torch.ones_like(ids)).sum())

    def epoch(group: bool):
        train = TrainConfig(batch_size=4, bf16=False, group_by_length=group, seed=3)
        args = sft_config(train, tmp_path / str(group), 256, model)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer())
        return list(trainer.get_train_dataloader())

    grouped, shuffled = epoch(True), epoch(False)
    padded = {
        name: sum(b["input_ids"].numel() for b in batches) for name, batches in [("g", grouped), ("r", shuffled)]
    }
    seen = []
    with torch.no_grad():
        for batch in grouped:
            losses = _token_losses(model, batch["input_ids"], batch["labels"], batch["attention_mask"]).sum(-1)
            for r in range(len(losses)):
                key = tuple(batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist())
                seen.append(key)
                assert float(losses[r]) == pytest.approx(alone[key], rel=1e-4, abs=1e-4)
    assert sorted(seen) == sorted(alone)  # every record once per epoch
    real = sum(len(r["input_ids"]) for r in data)
    assert padded["g"] < padded["r"] and padded["g"] - real < 0.75 * (padded["r"] - real)  # about half here


def test_grouped_training_still_learns(train_tiny):
    """The SFT path with the switches on trains: the loss falls over a few steps."""
    _, _, result = train_tiny("full", steps=6, logging_steps=1, lr=3e-3)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_default_demo_is_the_short_story_and_all_is_the_old_demo():
    from ftlab.methods import METHODS
    from ftlab.recipes.demo import DEFAULT_ARMS, demo_config
    from ftlab.recipes.experiment import sweep_points, validate

    short, old = demo_config("out/x"), demo_config("out/x", all_methods=True)
    validate(short)
    assert [a.name for a in short.arms] == list(DEFAULT_ARMS) == ["full", "lora", "hft"]
    assert [a.name for a in old.arms] == list(METHODS)
    full = next(a for a in short.arms if a.name == "full")  # `ftlab repair` reads arms/full/model
    assert [p[0] for p in sweep_points(full)] == ["full+scale=0.5", "full+scale=0.7"]
    # the retained suites where the demo's loss is significant keep the items significance needs
    assert short.eval.limits["world-knowledge"] == old.eval.limits["world-knowledge"] == 48
    assert "bf16" not in short.train  # the default: train.bf16 auto
    assert old.train["bf16"] is False and old.train["group_by_length"] is False


@pytest.mark.slow
def test_default_demo_costs_under_a_third_of_the_old_in_model_passes():
    from ftlab.recipes.demo import compute_estimate, demo_config

    short, old = demo_config("out/x"), demo_config("out/x", all_methods=True)
    new_cost, old_cost = compute_estimate(short), compute_estimate(old)
    assert new_cost["total"] < 0.33 * old_cost["total"]  # ~0.27 in model passes, before bf16's speed-up


def test_length_grouped_order_is_a_function_of_seed_and_epoch():
    """A resumed run skips finished epochs without drawing them: each epoch's order must not depend on the past."""
    from ftlab.train.trainer_args import EpochSeededLengthSampler

    lengths = [3, 40, 7, 22, 15, 9, 31, 4, 18, 27, 12, 36, 5, 25, 8, 30]
    a = EpochSeededLengthSampler(4, lengths, seed=1)
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        torch.manual_seed(epoch)  # the global RNG must not matter
        orders.append(list(a))
    b = EpochSeededLengthSampler(4, lengths, seed=1)
    b.set_epoch(2)  # a run resumed in epoch 2 draws epoch 2's order first
    assert list(b) == orders[2]
    assert sorted(orders[0]) == list(range(len(lengths)))  # every record once
    assert orders[0] != orders[1]  # a new order each epoch
    c = EpochSeededLengthSampler(4, lengths, seed=2)
    assert list(c) != orders[0]
