"""Fixtures for method tests: one thread (the CI box is shared), a tiny tokenized data set, a tiny training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftlab.config import MethodConfig, TrainConfig
from ftlab.data import sft_dataset
from ftlab.models import tiny_model, tiny_tokenizer
from ftlab.train.sft import TrainResult, train_sft


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from threads, and on a loaded 2-core box two spinning threads run 10-20x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data():
    tok = tiny_tokenizer()
    records = [{"prompt": f"Capital of Land{i}?", "completion": f"City{i}"} for i in range(16)]
    return sft_dataset(records, "completion", tok, 128)


@pytest.fixture
def train_tiny(tiny_data, tmp_path: Path):
    """``train_tiny(method, params, steps=3, stage=0, model=None, **train) -> (base_sd, model, result)``."""

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
    """``changed(base_sd, model)``: name -> bool tensor of entries that differ (names with at least one change)."""

    def diff(base: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        now = model.state_dict()
        out = {k: now[k] != v for k, v in base.items()}
        return {k: v for k, v in out.items() if bool(v.any())}

    return diff
