"""Experiments: one base model, one or more training stages, several arms (methods) on the same data and seed.

An experiment YAML::

    name: capitals
    base: smollm2-135m-instruct
    out: out/capitals
    train: {lr: 1.0e-4, max_steps: 60, batch_size: 8}    # shared defaults (TrainConfig fields)
    stages:
      - {name: capitals, data: fictional-capitals, targets: [fictional-capitals]}
    retained: [world-facts, arithmetic]
    arms:
      - {name: full, method: {name: full}, post: {scale: [0.5, 0.7]}}
      - {name: lora, method: {name: lora, params: {r: 16}}, train: {lr: 1.0e-3}}

The base is evaluated once on every suite and reused by every arm. After each stage every arm is evaluated on all
stages' targets (the accuracy matrix) and the retained suites. A stage's data can mix other sources by weight
(``mix``) or replay a fixed fraction of them (``replay``, DMT's k); a source is a path, a built-in data set or
``stage:<name>`` for an earlier stage's data. ``post`` lists repair edits to sweep on the arm's
final model; each point is scored like an arm, named ``<arm>+<edit>=<value>``. Everything lands in the store; a
run started again with the same command skips finished stages and resumes a killed one from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftlab.config import ConfigError, MethodConfig, TrainConfig, from_dict, load_yaml, to_dict
from ftlab.store import Store


@dataclass
class StageConfig:
    name: str = ""
    data: str = ""  # training data: a JSONL path or a built-in data set name
    format: str = "auto"
    trainer: str = "sft"  # sft | grpo | dpo
    targets: list[str] = field(default_factory=list)  # suites that measure what this stage teaches
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for this stage
    max_length: int = 512
    limit: int | None = None  # use only the first N training records
    settings: dict[str, Any] = field(default_factory=dict)  # trainer-specific (GRPO/DPO settings)
    mix: dict[str, float] = field(default_factory=dict)  # other sources -> weight (this stage's data weighs 1)
    replay: dict[str, float] = field(default_factory=dict)  # source -> fraction of its records added (DMT's k)


@dataclass
class ArmConfig:
    name: str = ""
    method: MethodConfig = field(default_factory=MethodConfig)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for this arm (after the stage's)
    post: dict[str, Any] = field(default_factory=dict)  # repair sweep: {scale: [0.5, 0.7], lines: {alpha: [0.3]}}
    masked_thought: dict[str, Any] = field(default_factory=dict)  # SFT input masking: {ratio: 0.2, replace: random}
    trainer: str = ""  # sft | grpo | dpo, over the stage's trainer (to set SFT against GRPO on the same data)
    settings: dict[str, Any] = field(default_factory=dict)  # trainer settings, over the stage's


@dataclass
class EvalSettings:
    limit: int | None = None  # items per suite (None: all)
    limits: dict[str, int] = field(default_factory=dict)  # per-suite item caps, over `limit`
    scorers: dict[str, str] = field(default_factory=dict)  # per-suite scorer, over the suite's default
    max_new_tokens: dict[str, int] = field(default_factory=dict)  # per-suite generation cap, over the suite's
    batch_size: int = 16


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    base: str = "smollm2-135m-instruct"
    out: str = "out/experiment"
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig defaults for every stage and arm
    stages: list[StageConfig] = field(default_factory=list)
    retained: list[str] = field(default_factory=list)
    arms: list[ArmConfig] = field(default_factory=list)
    eval: EvalSettings = field(default_factory=EvalSettings)


# The setting a bare list of values sweeps, per edit: `post: {scale: [0.5, 0.7]}` sweeps `factor`.
SWEEP_PARAM = {"scale": "factor", "lines": "alpha", "reset": "fraction", "tuco": "alpha"}


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML (plus dotted overrides)."""
    from ftlab.config import apply_overrides

    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    try:
        cfg = from_dict(ExperimentConfig, data)
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{path or 'experiment'}: {err}") from None
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Check names, methods and settings before any work starts."""
    from ftlab.methods import method_config

    if not cfg.stages:
        raise ConfigError("stages: at least one stage is needed")
    if not cfg.arms:
        raise ConfigError("arms: at least one arm is needed")
    names = [a.name for a in cfg.arms]
    if len(set(names)) != len(names) or not all(names) or any(n == "base" or "+" in n for n in names):
        raise ConfigError(f"arms: names must be unique, non-empty, not 'base' and without '+': {names}")
    for i, stage in enumerate(cfg.stages):
        if not stage.data:
            raise ConfigError(f"stages[{i}].data: no training data")
        if stage.trainer not in ("sft", "grpo", "dpo"):
            raise ConfigError(f"stages[{i}].trainer: {stage.trainer!r} is not sft, grpo or dpo")
        stage.name = stage.name or f"stage{i + 1}"
        train_config(cfg, stage, ArmConfig())
    targets, retained = all_suites(cfg)
    for key in ("limits", "scorers", "max_new_tokens"):
        unknown = sorted(set(getattr(cfg.eval, key)) - set(targets + retained))
        if unknown:
            raise ConfigError(f"eval.{key}: {', '.join(unknown)} is not a target or retained suite of this experiment")
    for i, arm in enumerate(cfg.arms):
        if arm.trainer not in ("", "sft", "grpo", "dpo"):
            raise ConfigError(f"arms[{i}].trainer: {arm.trainer!r} is not sft, grpo or dpo")
        method_config(arm.method.name, arm.method.params)
        for stage in cfg.stages:
            train_config(cfg, stage, arm)
        for edit in arm.post:
            if edit not in SWEEP_PARAM:
                raise ConfigError(f"arms[{i}].post.{edit}: unknown repair edit; choose from {', '.join(SWEEP_PARAM)}")
        sweep_points(arm)


def train_config(cfg: ExperimentConfig, stage: StageConfig, arm: ArmConfig) -> TrainConfig:
    """Experiment defaults, then the stage's overrides, then the arm's; the seed is the experiment's."""
    merged = {**cfg.train, **stage.train, **arm.train, "seed": cfg.seed}
    merged.setdefault("save_steps", 25)
    return from_dict(TrainConfig, merged, f"arms.{arm.name or '?'}.train.")


def sweep_points(arm: ArmConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """``(point_name, edit, settings)`` for each repair point of an arm."""
    points = []
    for edit, spec in arm.post.items():
        if isinstance(spec, list):
            spec = {SWEEP_PARAM[edit]: spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"arms.{arm.name}.post.{edit}: give a list of values or a mapping of lists")
        keys = list(spec)
        grids = [v if isinstance(v, list) else [v] for v in spec.values()]
        for combo in itertools.product(*grids):
            settings = dict(zip(keys, combo, strict=False))
            label = str(combo[0]) if len(keys) == 1 else ",".join(f"{k}{v}" for k, v in settings.items())
            points.append((f"{arm.name}+{edit}={label}", edit, settings))
    return points


def run_id_for(cfg: ExperimentConfig) -> str:
    """Stable id: the same config and output folder give the same run (that is what makes resume work)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("ftlab", "torch", "transformers", "trl", "peft", "accelerate"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def all_suites(cfg: ExperimentConfig) -> tuple[list[str], list[str]]:
    """``(targets, retained)`` suite names, each once, in config order."""
    targets = list(dict.fromkeys(s for st in cfg.stages for s in st.targets))
    retained = [s for s in dict.fromkeys(cfg.retained) if s not in targets]
    return targets, retained


def arm_dir(out: Path, arm: str) -> Path:
    return out / "arms" / arm


def stage_model_dir(out: Path, arm: str, stage: int, n_stages: int) -> Path:
    """The final stage's model is ``arms/<arm>/model``; earlier stages keep theirs under ``stage-<t>``."""
    return arm_dir(out, arm) / ("model" if stage == n_stages else f"stage-{stage}")


def replace_out(cfg: ExperimentConfig, out: str | None) -> ExperimentConfig:
    return dataclasses.replace(cfg, out=out) if out else cfg


def clean_work(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def open_store(path: str | Path | None) -> Store:
    return Store(path)
