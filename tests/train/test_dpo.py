"""DPO adapter: the method plan decides which weights move, and the reference is the model the stage started from."""

from __future__ import annotations

import pytest
from _util import assert_lora_base_bit_identical, assert_toy_plan_held, changed_keys

from ftlab.config import MethodConfig, TrainConfig
from ftlab.data.records import DataError
from ftlab.models import state_dict_fp32, tiny_model, tiny_tokenizer
from ftlab.train.dpo import DPOSettings, dpo_dataset, train_dpo
from ftlab.train.stage import StageJob

TRAIN = TrainConfig(lr=1e-2, max_steps=3, batch_size=4, logging_steps=1)


def records(n: int = 8) -> list[dict]:
    return [{"prompt": f"Capital of Land{i}?", "chosen": f"City{i}", "rejected": f"Town{i}"} for i in range(n)]


def test_full_moves_every_weight_and_prefers_chosen(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    before = state_dict_fp32(model)
    result = train_dpo(StageJob(model, tok, records(), MethodConfig("full"), TRAIN, tmp_path))
    assert result.steps == 3
    assert changed_keys(before, state_dict_fp32(result.final_model())) == set(before)
    logs = [h for h in result.log_history if "rewards/margins" in h]
    assert logs[0]["rewards/margins"] == 0.0  # step 1: policy == reference copy of the start model
    assert logs[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    assert logs[-1]["rewards/margins"] > 0.0 and logs[-1]["loss"] < logs[0]["loss"]


def test_lora_keeps_base_weights_bit_identical(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    before = state_dict_fp32(model)
    result = train_dpo(StageJob(model, tok, records(), MethodConfig("lora", {"r": 4}), TRAIN, tmp_path))
    moved = assert_lora_base_bit_identical(before, result)
    assert "model.layers.0.mlp.up_proj.weight" in moved


def test_plan_trainable_set_and_grad_masks_hold(tmp_path, toy_method):
    model, tok = tiny_model(), tiny_tokenizer()
    before = state_dict_fp32(model)
    result = train_dpo(
        StageJob(model, tok, records(), MethodConfig(toy_method.name), TRAIN, tmp_path, DPOSettings(beta=0.5))
    )
    assert_toy_plan_held(before, state_dict_fp32(result.final_model()), toy_method)


def test_dataset_is_conversational_and_bad_records_fail():
    rows = dpo_dataset(records(2), tiny_tokenizer())
    assert rows[0]["prompt"] == [{"role": "user", "content": "Capital of Land0?"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "City0"}]
    with pytest.raises(DataError, match=r"pairs.jsonl:2.*rejected"):
        dpo_dataset([{"prompt": "p", "chosen": "c", "_where": "pairs.jsonl:2"}], tiny_tokenizer())
    with pytest.raises(ValueError, match="beta"):
        DPOSettings(beta=0)
