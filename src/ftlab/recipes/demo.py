"""``ftlab demo``: the embedded SmolLM2-135M-Instruct learns invented capitals with every registered method.

It shows the trade-off ftlab exists for: full fine-tuning learns the new facts and forgets real ones (world
knowledge, instruction following), the other methods land elsewhere on the gain-vs-retained plane, and a repair
sweep on the full fine-tune (delta scaling, LiNeS) shows how much can be won back after training.
"""

from __future__ import annotations

from ftlab.config import from_dict
from ftlab.recipes.experiment import ExperimentConfig

# Per-method settings for the demo (16 invented countries, 48 records; 18 steps of batch 8 are three epochs;
# at 16 steps full fine-tuning learned 0.56 of the capitals, at 18 steps 0.94).
# Learning rates differ because the number of trainable entries differs. The sparse methods get cheaper selection
# settings than their papers' defaults so that the whole demo fits in 15 minutes on a 2-core CPU (LT-SFT's phase 1
# is 4 full fine-tuning steps; LIFT uses the randomized SVD). LocFT trains one matrix, so its steps are cheap; it
# runs twice the steps (six epochs; its paper runs 25), since in three epochs it learned nothing here.
DEMO_ARMS: dict[str, dict] = {
    "full": {"train": {"lr": 1e-4}, "post": {"scale": [0.5, 0.7], "lines": [0.6]}},
    "lora": {"method": {"params": {"r": 16, "alpha": 32}}, "train": {"lr": 2e-3}},
    "hft": {"train": {"lr": 1e-4}},
    "lift": {"method": {"params": {"lora_rank": 16, "filter_rank": 16, "svd": "lowrank"}}, "train": {"lr": 2e-3}},
    "sparse": {"method": {"params": {"proportion": 0.05, "full_ft_steps": 4}}, "train": {"lr": 5e-4}},
    "freeze": {"method": {"params": {"layers": "20-29"}}, "train": {"lr": 1e-4}},
    "locft": {"train": {"lr": 2e-3}, "steps_factor": 2},
}


def demo_config(out: str = "out/demo", steps: int = 18) -> ExperimentConfig:
    """The demo experiment: one stage (fictional capitals), one arm per registered method, a repair sweep on full."""
    from ftlab.methods import METHODS

    arms = []
    for name in METHODS:
        spec = DEMO_ARMS.get(name, {"train": {"lr": 2e-4}})
        train = dict(spec.get("train", {}))
        if "steps_factor" in spec:
            train["max_steps"] = steps * spec["steps_factor"]
        arms.append(
            {
                "name": name,
                "method": {"name": name, "params": spec.get("method", {}).get("params", {})},
                "train": train,
                "post": spec.get("post", {}),
            }
        )
    data = {
        "name": "demo",
        "base": "smollm2-135m-instruct",
        "out": out,
        "train": {"max_steps": steps, "batch_size": 8, "scheduler": "constant", "logging_steps": 10, "save_steps": 0},
        "stages": [{"name": "capitals", "data": "fictional-capitals", "targets": ["fictional-capitals"]}],
        # near (real capitals, the target's question format), mid (other facts), far (sums the base gets right,
        # instruction following), and general-text perplexity; every suite well above its floor for the base
        "retained": ["world-capitals", "world-knowledge", "single-digit-sums", "instructions", "general-text"],
        "arms": arms,
        "eval": {
            "batch_size": 48,
            "limits": {
                "world-capitals": 48,
                "world-knowledge": 48,
                "single-digit-sums": 48,
                "instructions": 48,
                "general-text": 8,
            },  # fmt: skip
            "max_new_tokens": {"instructions": 128},
        },
    }
    return from_dict(ExperimentConfig, data)
