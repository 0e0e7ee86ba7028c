"""``ftlab demo``: the embedded SmolLM2-135M-Instruct learns invented capitals with every registered method.

It shows the trade-off ftlab exists for: full fine-tuning learns the new facts and forgets real ones (world
knowledge, instruction following), the other methods land elsewhere on the gain-vs-retained plane, and a repair
sweep on the full fine-tune (delta scaling, LiNeS) shows how much can be won back after training.
"""

from __future__ import annotations

from ftlab.config import from_dict
from ftlab.experiment import ExperimentConfig

# Per-method settings for the demo: learning rates differ because the number of trainable entries differs.
DEMO_ARMS: dict[str, dict] = {
    "full": {"train": {"lr": 1e-4}, "post": {"scale": [0.5, 0.7, 0.9], "lines": [0.3, 0.6]}},
    "lora": {"method": {"params": {"r": 16, "alpha": 32}}, "train": {"lr": 1e-3}},
}


def demo_config(out: str = "out/demo", steps: int = 60) -> ExperimentConfig:
    """The demo experiment: one stage (fictional capitals), one arm per registered method, a repair sweep on full."""
    from ftlab.methods import METHODS

    arms = []
    for name in METHODS:
        spec = DEMO_ARMS.get(name, {"train": {"lr": 1e-4}})
        arms.append(
            {
                "name": name,
                "method": {"name": name, "params": spec.get("method", {}).get("params", {})},
                "train": spec.get("train", {}),
                "post": spec.get("post", {}),
            }
        )
    data = {
        "name": "demo",
        "base": "smollm2-135m-instruct",
        "out": out,
        "train": {"max_steps": steps, "batch_size": 8, "scheduler": "constant", "logging_steps": 10, "save_steps": 0},
        "stages": [{"name": "capitals", "data": "fictional-capitals", "targets": ["fictional-capitals"]}],
        "retained": ["world-facts", "arithmetic", "instructions", "general-text"],
        "arms": arms,
        "eval": {"batch_size": 32},
    }
    return from_dict(ExperimentConfig, data)
