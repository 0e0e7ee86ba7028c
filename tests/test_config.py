import pytest

from ftlab.config import ConfigError, RunConfig, apply_overrides, from_dict, load_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: tiny-test\ntrain: {lr: 0.001, max_steps: 3}\nmethod: {name: lora, params: {r: 4}}\n")
    cfg = load_config(RunConfig, p, ["train.lr=1e-4", "train.seed=7", "method.params.r=2"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.seed == 7
    assert cfg.train.max_steps == 3
    assert cfg.method.params == {"r": 2}


def test_unknown_key_names_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(RunConfig, p)


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match="train.max_steps"):
        from_dict(RunConfig, {"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="train.max_steps"):
        from_dict(RunConfig, {"train": {"max_steps": True}})


def test_override_syntax():
    assert apply_overrides({}, ["a.b=[1, 2]", "c=true"]) == {"a": {"b": [1, 2]}, "c": True}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])


def test_method_params_checked_by_method_config():
    from ftlab.methods import method_config

    assert method_config("lora", {"r": 4}).r == 4
    with pytest.raises(ConfigError, match="method.params.rank"):
        method_config("lora", {"rank": 4})
    with pytest.raises(ConfigError, match="unknown method"):
        method_config("nope", {})
