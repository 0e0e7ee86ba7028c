"""Shared fixtures: offline hub, one thread for tiny models, tiny models and tiny data (some written to tmp folders).

Every fixture of the suite lives here; plain helpers that tests call directly live in ``_util``. Heavy imports
(transformers, TRL) happen inside the fixtures, so a test that needs none of them does not pay for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FTLAB_PROGRESS", "0")

import pytest  # noqa: E402
from _util import write_jsonl  # noqa: E402

if TYPE_CHECKING:
    import torch

    from ftlab.methods import Plan
    from ftlab.train.sft import TrainResult

TESTS = Path(__file__).parent
# Every test in these folders runs on one thread (``one_thread``); a module elsewhere asks for it with
# ``pytestmark = pytest.mark.usefixtures("one_thread")``.
ONE_THREAD_FOLDERS = {TESTS / "data", TESTS / "methods", TESTS / "train"}


def capital_records(n: int = 16) -> list[dict]:
    return [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(n)]


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one thread than on two busy shared cores (threads only contend)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread_in_tiny_model_folders(request):
    """Applies ``one_thread`` to every test under ONE_THREAD_FOLDERS (what their own conftests did before)."""
    if request.path.parent in ONE_THREAD_FOLDERS:
        request.getfixturevalue("one_thread")


@pytest.fixture
def completion_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", capital_records())


@pytest.fixture
def tiny_config(tmp_path: Path, completion_file: Path):
    """A RunConfig for the tiny model that trains a few steps."""
    from ftlab.config import RunConfig, from_dict

    return from_dict(
        RunConfig,
        {
            "model": "tiny-test",
            "data": {"train": str(completion_file), "max_length": 128},
            "method": {"name": "full"},
            "train": {"lr": 1e-3, "max_steps": 4, "batch_size": 4, "logging_steps": 2},
            "output": {"dir": str(tmp_path / "out")},
        },
    )


@pytest.fixture(scope="session")
def tiny_data():
    """The 16 capital records, SFT-tokenized for the tiny model (max length 128)."""
    from ftlab.data import sft_dataset
    from ftlab.models import tiny_tokenizer

    return sft_dataset(capital_records(), "completion", tiny_tokenizer(), 128)


@pytest.fixture
def train_tiny(tiny_data, tmp_path: Path):
    """``train_tiny(method, params, steps=3, stage=0, model=None, **train) -> (base_sd, model, result)``."""
    from ftlab.config import MethodConfig, TrainConfig
    from ftlab.models import tiny_model, tiny_tokenizer
    from ftlab.train.sft import train_sft

    def run(
        method: str, params: dict | None = None, steps: int = 3, stage: int = 0, model=None, **train
    ) -> tuple[dict[str, torch.Tensor], torch.nn.Module, TrainResult]:
        model = model if model is not None else tiny_model()
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        cfg = TrainConfig(**{"lr": 1e-2, "max_steps": steps, "batch_size": 4, "logging_steps": 100, **train})
        work = tmp_path / f"{method}-{stage}"
        result = train_sft(model, tiny_tokenizer(), tiny_data, MethodConfig(method, params or {}), cfg, work, stage)
        return base, model, result

    return run


@pytest.fixture
def changed():
    """``changed(base_sd, model)``: name -> bool tensor of entries that differ (names with at least one change).

    ``_util.changed_keys(before_sd, after_sd)`` is the plain set of names that differ."""

    def diff(base: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        now = model.state_dict()
        out = {k: now[k] != v for k, v in base.items()}
        return {k: v for k, v in out.items() if bool(v.any())}

    return diff


TOY_MASKED = "model.layers.0.mlp.down_proj.weight"  # trains, but only its first half of rows
TOY_OPEN = "model.layers.1.self_attn.o_proj.weight"  # trains fully


@dataclass
class _ToyConfig:
    pass


def _toy_plan(model, cfg, ctx) -> Plan:
    import torch

    from ftlab.methods import Plan

    w = dict(model.named_parameters())[TOY_MASKED]
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[: w.shape[0] // 2] = True
    return Plan(trainable={TOY_MASKED, TOY_OPEN}, grad_masks={TOY_MASKED: mask}, info={"toy": True})


@pytest.fixture
def toy_method(monkeypatch) -> SimpleNamespace:
    """A method ``toy_masked`` that trains ``open`` and the first half of ``masked``'s rows; everything else frozen.

    Registered for one test only; ``_util.assert_toy_plan_held`` checks that a training run kept to it."""
    from ftlab.methods import METHODS

    monkeypatch.setitem(METHODS, "toy_masked", SimpleNamespace(NAME="toy_masked", Config=_ToyConfig, plan=_toy_plan))
    return SimpleNamespace(name="toy_masked", masked=TOY_MASKED, open=TOY_OPEN)
