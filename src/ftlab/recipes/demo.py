"""``ftlab demo``: the embedded SmolLM2-135M-Instruct learns invented capitals, forgets, and is repaired.

It shows the trade-off ftlab exists for: full fine-tuning learns the new facts and forgets real ones, LoRA and a
selective method (HFT) land elsewhere on the gain-vs-retained plane, and a repair sweep on the full fine-tune (delta
scaling, LiNeS) shows how much can be won back after training.

The default keeps the story at about a quarter of the old demo's compute (see ``compute_estimate`` and docs/speed.md):
three arms instead of seven, two repair points instead of three, the near and mid retained suites (the far suites,
among them the long generations of ``instructions``, and general-text perplexity only with ``--all``), and the training
speed switches (bf16 autocast where the hardware has it). ``all_methods=True`` (``ftlab demo --all``) is the previous
demo exactly: every registered method, all five retained suites, and fp32 training without length grouping.
"""

from __future__ import annotations

from typing import Any

from ftlab.config import from_dict
from ftlab.recipes.experiment import ExperimentConfig

# Per-method settings for the demo (16 invented countries, 48 records; 18 steps of batch 8 are three epochs;
# at 16 steps full fine-tuning learned 0.56 of the capitals, at 18 steps 0.94).
# Learning rates differ because the number of trainable entries differs. The sparse methods get cheaper selection
# settings than their papers' defaults (LT-SFT's phase 1 is 4 full fine-tuning steps; LIFT uses the randomized SVD).
# LocFT trains one matrix, so its steps are cheap; it runs twice the steps (six epochs; its paper runs 25), since in
# three epochs it learned nothing here.
DEMO_ARMS: dict[str, dict] = {
    "full": {"train": {"lr": 1e-4}, "post": {"scale": [0.5, 0.7], "lines": [0.6]}},
    "lora": {"method": {"params": {"r": 16, "alpha": 32}}, "train": {"lr": 2e-3}},
    "hft": {"train": {"lr": 1e-4}},
    "lift": {"method": {"params": {"lora_rank": 16, "filter_rank": 16, "svd": "lowrank"}}, "train": {"lr": 2e-3}},
    "sparse": {"method": {"params": {"proportion": 0.05, "full_ft_steps": 4}}, "train": {"lr": 5e-4}},
    "freeze": {"method": {"params": {"layers": "20-29"}}, "train": {"lr": 1e-4}},
    "locft": {"train": {"lr": 2e-3}, "steps_factor": 2},
}
# The default demo's arms: full fine-tuning (with the repair sweep), LoRA, and one selective method.
DEFAULT_ARMS = ("full", "lora", "hft")

# Retained suites: near (real capitals, the target's question format), mid (other facts), far (sums the base gets
# right, instruction following), and general-text perplexity; every suite well above its floor for the base.
# The default keeps the near and mid suites, where the demo's significant loss is (world-knowledge: 8 of 48 items net
# on the full arm); it drops the far suites (`instructions`, whose 128-token answers were the largest single
# evaluation cost, and `single-digit-sums`) and general-text perplexity.
ALL_RETAINED = ["world-capitals", "world-knowledge", "single-digit-sums", "instructions", "general-text"]
DEFAULT_RETAINED = ["world-capitals", "world-knowledge"]
# 48 items per 0/1 suite: fewer would lose the significance of the world-knowledge loss (docs/figures.md).
LIMITS = {"world-capitals": 48, "world-knowledge": 48, "single-digit-sums": 48, "instructions": 48, "general-text": 8}
# The default sweeps delta scaling only (two points); --all also sweeps LiNeS.
DEFAULT_POST = {"scale": [0.5, 0.7]}


def demo_config(out: str = "out/demo", steps: int = 18, all_methods: bool = False) -> ExperimentConfig:
    """The demo experiment: one stage (fictional capitals), a repair sweep on full.

    Args:
        out: output folder.
        steps: optimizer steps per arm (batch 8).
        all_methods: the previous demo: one arm per registered method, every retained suite, fp32 training without
            length grouping; otherwise full, LoRA and HFT on the near and mid retained suites with the default speed
            switches.
    """
    return from_dict(ExperimentConfig, demo_dict(out, steps, all_methods))


def demo_dict(out: str = "out/demo", steps: int = 18, all_methods: bool = False) -> dict[str, Any]:
    """``demo_config`` as a plain mapping (what ``ftlab run`` would read from YAML)."""
    from ftlab.methods import METHODS

    names = list(METHODS) if all_methods else [n for n in DEFAULT_ARMS if n in METHODS]
    arms = []
    for name in names:
        spec = DEMO_ARMS.get(name, {"train": {"lr": 2e-4}})
        if spec.get("post") and not all_methods:
            spec = {**spec, "post": DEFAULT_POST}
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
    retained = ALL_RETAINED if all_methods else DEFAULT_RETAINED
    train = {"max_steps": steps, "batch_size": 8, "scheduler": "constant", "logging_steps": 10, "save_steps": 0}
    if all_methods:  # the previous demo trained before the speed switches existed
        train.update(bf16=False, group_by_length=False)
    return {
        "name": "demo-all" if all_methods else "demo",
        "base": "smollm2-135m-instruct",
        "out": out,
        "train": train,
        "stages": [{"name": "capitals", "data": "fictional-capitals", "targets": ["fictional-capitals"]}],
        "retained": list(retained),
        "arms": arms,
        "eval": {
            "batch_size": 48,
            "limits": {k: v for k, v in LIMITS.items() if k in retained},
            **({"max_new_tokens": {"instructions": 128}} if "instructions" in retained else {}),
        },
    }


# Training FLOPs per token in units of N (the model's parameters) for each method, for ``compute_estimate``:
# forward 2, gradients of activations 2, gradients of the trained weights 2 times their share. LoRA and LIFT train
# adapters (share ~0); freeze trains layers 20-29 of 30 (backward stops at layer 20); LocFT one matrix (backward
# stops at its layer, about the middle); LT-SFT adds its full fine-tuning phase (4 steps at 6).
_TRAIN_UNITS = {
    "full": 6.0,
    "lora": 4.0,
    "hft": 5.0,
    "lift": 4.0,
    "sparse": 6.0,
    "freeze": 2 + 4 * 10 / 30,
    "locft": 3.0,
}


def compute_estimate(cfg: ExperimentConfig, tokenizer: Any = None) -> dict[str, float]:
    """Rough compute of a demo config, in token-passes of the model (FLOPs / 2N): training steps × tokens × arms plus
    evaluated models × evaluation tokens (prompt tokens plus each generation's cap, an upper bound).

    Args:
        cfg: a demo experiment.
        tokenizer: counts prompt tokens; default: the embedded model's.
    """
    from ftlab.data.sources import resolve_train_data
    from ftlab.evals import load_suite
    from ftlab.evals.generation import encode_prompts

    if tokenizer is None:
        from ftlab.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.base)
    records = list(resolve_train_data(cfg.stages[0].data))
    prompt_tokens = [len(x) for x in encode_prompts(tokenizer, [r["prompt"] + " " + r["completion"] for r in records])]
    per_step = cfg.train["batch_size"] * sum(prompt_tokens) / len(prompt_tokens)
    train = 0.0
    for arm in cfg.arms:
        steps = arm.train.get("max_steps", cfg.train["max_steps"])
        units = _TRAIN_UNITS.get(arm.method.name, 6.0)
        extra = 4 * 6.0 * per_step if arm.method.name == "sparse" else 0.0
        train += steps * per_step * units / 2 + extra / 2
    eval_tokens = 0.0
    for name in [*cfg.stages[0].targets, *cfg.retained]:
        suite = load_suite(name, limit=cfg.eval.limits.get(name, cfg.eval.limit))
        if suite.kind == "perplexity":
            eval_tokens += sum(len(tokenizer(i["text"])["input_ids"]) for i in suite.items)
            continue
        cap = cfg.eval.max_new_tokens.get(name, suite.max_new_tokens) if suite.kind == "generate" else 0
        eval_tokens += sum(len(x) + cap for x in encode_prompts(tokenizer, [i["prompt"] for i in suite.items]))
    points = sum(len(v) if isinstance(v, list) else 1 for a in cfg.arms for v in (a.post or {}).values())
    models = 1 + len(cfg.arms) + points
    return {
        "train": train,
        "eval": models * eval_tokens,
        "models_evaluated": models,
        "total": train + models * eval_tokens,
    }
