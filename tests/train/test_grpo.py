"""GRPO adapter: the method plan decides which weights move; KL reference is the start model; RIF drops 0/N prompts."""

from __future__ import annotations

import pytest
from _util import assert_lora_base_bit_identical, assert_toy_plan_held, changed_keys

from ftlab.config import MethodConfig, TrainConfig
from ftlab.data.records import DataError
from ftlab.models import state_dict_fp32, tiny_model, tiny_tokenizer
from ftlab.train.grpo import GRPOSettings, grpo_dataset, rif_filter, sample_rollouts, train_grpo
from ftlab.train.rewards import REWARDS
from ftlab.train.stage import StageJob

SETTINGS = dict(num_generations=2, max_completion_length=6)
TRAIN = TrainConfig(lr=1e-2, max_steps=2, batch_size=4, logging_steps=1)


@pytest.fixture
def digits_reward():
    """A reward that varies between samples of a random model (share of digits), so every group has a signal."""
    REWARDS["digits"] = lambda c, a: sum(ch.isdigit() for ch in c) / max(len(c), 1)
    yield "digits"
    REWARDS.pop("digits")


def records(n: int = 8, reward: str = "digits") -> list[dict]:
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i), "reward": reward} for i in range(n)]


def test_full_moves_every_weight_and_kl_is_against_the_start_model(tmp_path, digits_reward):
    model, tok = tiny_model(), tiny_tokenizer()
    before = state_dict_fp32(model)
    result = train_grpo(
        StageJob(model, tok, records(), MethodConfig("full"), TRAIN, tmp_path, GRPOSettings(**SETTINGS))
    )
    assert result.steps == 2
    assert changed_keys(before, state_dict_fp32(result.final_model())) == set(before)
    logs = [h for h in result.log_history if "kl" in h]
    assert logs[0]["kl"] == 0.0  # step 1: the policy still equals the reference copy
    assert logs[1]["kl"] > 0.0  # step 2: it moved away from it


def test_beta_zero_uses_no_reference(tmp_path, digits_reward):
    model, tok = tiny_model(), tiny_tokenizer()
    grpo = GRPOSettings(beta=0.0, **SETTINGS)
    result = train_grpo(StageJob(model, tok, records(), MethodConfig("full"), TRAIN, tmp_path, grpo))
    assert not any("kl" in h for h in result.log_history)


def test_lora_keeps_base_weights_bit_identical(tmp_path, digits_reward):
    model, tok = tiny_model(), tiny_tokenizer()
    before = state_dict_fp32(model)
    lora = MethodConfig("lora", {"r": 4})
    result = train_grpo(StageJob(model, tok, records(), lora, TRAIN, tmp_path, GRPOSettings(**SETTINGS)))
    moved = assert_lora_base_bit_identical(before, result)
    assert "model.layers.0.self_attn.q_proj.weight" in moved


def test_plan_trainable_set_and_grad_masks_hold(tmp_path, digits_reward, toy_method):
    model, tok = tiny_model(), tiny_tokenizer()
    before = state_dict_fp32(model)
    method = MethodConfig(toy_method.name)
    result = train_grpo(StageJob(model, tok, records(), method, TRAIN, tmp_path, GRPOSettings(**SETTINGS)))
    assert_toy_plan_held(before, state_dict_fp32(result.final_model()), toy_method)
    assert result.plan_info == {"toy": True}


def fake_rollouts(correct: dict[str, int], n: int):
    """Rollouts where prompt i gets ``correct[i]`` right answers out of n."""

    def fn(prompts, k):
        assert k == n
        out = []
        for p in prompts:
            text = p[-1]["content"]
            right = str(2 * int(text.split("+")[0]))
            out.append([right] * correct[text] + ["wrong"] * (k - correct[text]))
        return out

    return fn


def test_rif_filter_drops_exactly_the_unsolved_prompts():
    tok = tiny_tokenizer()
    recs = records(6, reward="numeric")
    counts = {r["prompt"]: c for r, c in zip(recs, [0, 1, 4, 0, 3, 0], strict=True)}
    grpo = GRPOSettings(rif_filter=True, rif_rollouts=4)
    kept, info = rif_filter(recs, tok, fake_rollouts(counts, 4), grpo)
    assert [r["prompt"] for r in kept] == ["1+1=", "2+2=", "4+4="]
    assert info["correct_counts"] == [0, 1, 4, 0, 3, 0] and info["dropped_unsolved"] == 3
    strict = GRPOSettings(rif_filter=True, rif_rollouts=4, rif_keep_all_correct=False)
    kept, info = rif_filter(recs, tok, fake_rollouts(counts, 4), strict)
    assert [r["prompt"] for r in kept] == ["1+1=", "4+4="] and info["dropped_all_correct"] == 1


def test_train_grpo_trains_only_on_kept_prompts(tmp_path):
    from transformers import TrainerCallback

    seen: list[str] = []

    class ClearSeen(TrainerCallback):  # forget the filter's calls; keep what training scores
        def on_train_begin(self, *args, **kwargs):
            seen.clear()

    REWARDS["spy"] = lambda c, a: (seen.append(a if isinstance(a, str) else a[0]), float(c == a))[1]
    try:
        model, tok = tiny_model(), tiny_tokenizer()
        recs = records(8, reward="spy")
        counts = {r["prompt"]: {"1+1=": 2, "5+5=": 1}.get(r["prompt"], 0) for r in recs}
        grpo = GRPOSettings(rif_filter=True, rif_rollouts=2, **SETTINGS)
        rollouts = fake_rollouts(counts, 2)
        result = train_grpo(
            StageJob(model, tok, recs, MethodConfig("full"), TRAIN, tmp_path, grpo),
            rollout_fn=rollouts,
            callbacks=[ClearSeen()],
        )
    finally:
        REWARDS.pop("spy")
    assert result.plan_info["rif"]["kept"] == 2
    assert set(seen) == {"2", "10"}


def test_bad_reward_name_and_batch_shape_fail_early(tmp_path):
    tok = tiny_tokenizer()
    bad = [{"prompt": "1+1=", "answer": "2", "reward": "nope", "_where": "data.jsonl:3"}]
    with pytest.raises(DataError, match=r"data.jsonl:3.*reward.*nope"):
        grpo_dataset(bad, tok, GRPOSettings())
    with pytest.raises(ValueError, match="num_generations"):
        train_grpo(
            StageJob(
                tiny_model(), tok, records(), MethodConfig("full"), TrainConfig(batch_size=6), tmp_path, GRPOSettings()
            )
        )


def test_default_sampler_returns_n_completions_per_prompt():
    model, tok = tiny_model(), tiny_tokenizer()
    grpo = GRPOSettings(max_completion_length=3, rif_batch_size=2)
    prompts = [[{"role": "user", "content": f"{i}+1="}] for i in range(3)]
    out = sample_rollouts(model, tok, grpo, seed=0)(prompts, 4)
    assert [len(c) for c in out] == [4, 4, 4]
    assert out == sample_rollouts(model, tok, grpo, seed=0)(prompts, 4)  # seeded
