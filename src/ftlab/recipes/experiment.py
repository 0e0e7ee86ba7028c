"""Experiments: one base model, one or more training stages, several arms (methods) on the same data and seed.

An experiment YAML::

    name: capitals
    base: smollm2-135m-instruct
    load: {dtype: bf16}                                 # how the base and every arm load (ftlab.loading)
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
``stage:<name>`` for an earlier stage's data. DMT is two stages: ``data: [math.jsonl, code.jsonl]`` (the union of the
specialised sets), then ``data: general.jsonl`` with ``replay: {math.jsonl: 0.0039, code.jsonl: 0.0039}`` (a
fraction ``k`` of each specialised set, drawn per set). ``post`` lists repair edits to sweep on the arm's final
model; each point is scored like an arm, named ``<arm>+<edit>=<value>``. Every key is described in docs/config.md.

``validate`` checks everything that can be checked without loading a model, before anything is written: names,
trainers (``TRAINERS``), each stage's and arm's training settings, trainer ``settings``, ``masked_thought``, each
repair point's settings against its edit (``ftlab.edits.EDITS``) and the evaluation settings.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ftlab.config import (
    DATA_FORMATS,
    ConfigError,
    MethodConfig,
    TrainConfig,
    at_least,
    from_dict,
    load_config,
    to_dict,
)
from ftlab.loading import ModelSettings, check_method


@dataclass
class StageConfig:
    name: str = ""
    data: str | list[str] = ""  # a file, folder, built-in or hub data set; a list is their union (DMT's stage 1)
    format: str = "auto"
    trainer: str = "sft"  # a name in ftlab.recipes.trainers.TRAINERS: sft | grpo | dpo
    targets: list[str] = field(default_factory=list)  # suites that measure what this stage teaches
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for this stage
    max_length: int = 512
    limit: int | None = None  # use only the first N training records
    split: str = "train"  # split of a hub data set or load_from_disk folder named by `data`
    columns: dict[str, str] = field(default_factory=dict)  # record field -> column of `data` (every source of it)
    settings: dict[str, Any] = field(default_factory=dict)  # the stage trainer's settings (GRPO/DPO)
    mix: dict[str, float] = field(default_factory=dict)  # other sources -> weight (this stage's data weighs 1)
    replay: dict[str, float] = field(default_factory=dict)  # source -> fraction of its records added (DMT's k)
    context_indicator: bool = False  # mark context-dependent training prompts (ftlab.data.context)


@dataclass
class ArmConfig:
    name: str = ""
    method: MethodConfig = field(default_factory=MethodConfig)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for this arm (after the stage's)
    post: dict[str, Any] = field(default_factory=dict)  # repair sweep: {scale: [0.5, 0.7], lines: {alpha: [0.3]}}
    masked_thought: dict[str, Any] = field(default_factory=dict)  # SFT input masking: {ratio: 0.2, replace: random}
    trainer: str = ""  # over the stage's trainer (to set SFT against GRPO on the same data)
    settings: dict[str, Any] = field(default_factory=dict)  # trainer settings, over the stage's (same trainer)
    save: str = ""  # how the arm's models are saved: auto | model | adapter | diff ("": the experiment's `save`)
    context_indicator: bool | None = None  # over the stage's: mark context-dependent prompts (ftlab.data.context)
    keep: float | None = None  # forgetting budget of this arm, over the experiment's `keep` (ftlab.budget)


@dataclass
class EvalSettings:
    limit: int | None = None  # items per suite (None: all; a suite of several subjects gives each its share)
    limits: dict[str, int] = field(default_factory=dict)  # per-suite item caps, over `limit`
    scorers: dict[str, str] = field(default_factory=dict)  # per-suite scorer, over the suite's default
    max_new_tokens: dict[str, int] = field(default_factory=dict)  # per-suite generation cap, over the suite's
    batch_size: int = 16
    confidence: float = 0.95  # level of every interval and test of the run's figures
    lm_eval_include: str | list[str] | None = None  # folder(s) of custom lm-eval task YAMLs for lm-eval:TASK suites
    conjugate: list[str] = field(default_factory=list)  # retained suites also asked in these forms (evals.conjugate)
    explain: int = 5  # per retained suite, the worst-forgotten items of each arm whose TuCo is computed (0: none)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    base: str = "smollm2-135m-instruct"
    load: ModelSettings = field(default_factory=ModelSettings)  # how the base and every arm load (ftlab.loading)
    out: str = "out/experiment"
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig defaults for every stage and arm
    stages: list[StageConfig] = field(default_factory=list)
    retained: list[str] = field(default_factory=list)
    arms: list[ArmConfig] = field(default_factory=list)
    eval: EvalSettings = field(default_factory=EvalSettings)
    save: str = "auto"  # auto | model | adapter | diff: what each arm's stage outputs hold (save_mode)
    accelerate: str | None = None  # an accelerate config file: `ftlab run` relaunches itself under accelerate
    keep: float | None = None  # forgetting budget: search each arm's repairs for the best point keeping this share


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment YAML (plus dotted overrides) and validate all of it."""
    cfg = load_config(ExperimentConfig, path, overrides)
    try:
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{path or 'experiment'}: {err}") from None
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Check names, trainers, methods and every nested settings mapping before any work starts.

    Raises:
        ConfigError: naming the first bad field (``arms[1].settings.beta: ...``).
    """
    from ftlab.data import check_columns
    from ftlab.evals.conjugate import check_forms
    from ftlab.methods import method_config
    from ftlab.recipes.trainers import TRAINERS

    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"out: {cfg.out} is a file; the output folder must be a folder or not exist yet")
    if not cfg.stages:
        raise ConfigError("stages: at least one stage is needed")
    if not cfg.arms:
        raise ConfigError("arms: at least one arm is needed")
    names = [a.name for a in cfg.arms]
    if len(set(names)) != len(names) or not all(names) or any(n == "base" or "+" in n for n in names):
        raise ConfigError(f"arms: names must be unique, non-empty, not 'base' and without '+': {names}")
    # each layer of training settings alone first, so an error names the layer that holds the bad value
    from_dict(TrainConfig, cfg.train, "train.")
    for i, stage in enumerate(cfg.stages):
        from_dict(TrainConfig, stage.train, f"stages[{i}].train.")
    for i, arm in enumerate(cfg.arms):
        from_dict(TrainConfig, arm.train, f"arms[{i}].train.")
    for i, stage in enumerate(cfg.stages):
        if not stage.data or (isinstance(stage.data, list) and not all(stage.data)):
            raise ConfigError(f"stages[{i}].data: no training data")
        check_columns(stage.columns, f"stages[{i}].columns")
        if stage.format not in DATA_FORMATS:
            raise ConfigError(f"stages[{i}].format: {stage.format!r} is not one of {', '.join(DATA_FORMATS)}")
        if stage.trainer not in TRAINERS:
            raise ConfigError(f"stages[{i}].trainer: {stage.trainer!r} is not one of {', '.join(TRAINERS)}")
        stage.name = stage.name or f"stage{i + 1}"
        train_config(cfg, stage, ArmConfig())
    stage_names = [st.name for st in cfg.stages]
    for stage in cfg.stages:
        for key in ("mix", "replay"):
            for ref in getattr(stage, key):
                if ref.startswith("stage:") and ref[6:] not in stage_names:
                    where = f"stages.{stage.name}.{key}.{ref}"
                    raise ConfigError(f"{where}: no stage named {ref[6:]!r} in this experiment")
    if not 0.5 <= cfg.eval.confidence < 1:
        raise ConfigError(f"eval.confidence: {cfg.eval.confidence} is not in [0.5, 1)")
    at_least("eval", cfg.eval, batch_size=1, limit=1, explain=0)
    check_forms(cfg.eval.conjugate, "eval.conjugate")
    for key in ("limits", "max_new_tokens"):
        at_least(f"eval.{key}", SimpleNamespace(**getattr(cfg.eval, key)), **dict.fromkeys(getattr(cfg.eval, key), 1))
    for stage in cfg.stages:
        at_least(f"stages.{stage.name}", stage, max_length=1, limit=1)
        for key in ("mix", "replay"):
            for ref, value in getattr(stage, key).items():
                if not isinstance(value, (int, float)) or value < 0 or (key == "replay" and value > 1):
                    bound = "in [0, 1]" if key == "replay" else ">= 0"
                    raise ConfigError(f"stages.{stage.name}.{key}.{ref}: {value!r} is not a number {bound}")
    targets, retained = all_suites(cfg)
    for key in ("limits", "scorers", "max_new_tokens"):
        unknown = sorted(set(getattr(cfg.eval, key)) - set(targets + retained))
        if unknown:
            raise ConfigError(f"eval.{key}: {', '.join(unknown)} is not a target or retained suite of this experiment")
    for i, arm in enumerate(cfg.arms):
        where = f"arms[{i}]"
        if arm.trainer and arm.trainer not in TRAINERS:
            raise ConfigError(f"{where}.trainer: {arm.trainer!r} is not one of {', '.join(TRAINERS)}")
        method_config(arm.method.name, arm.method.params)
        check_method(cfg.load, arm.method.name, f"{where}.method.name")  # a quantized base trains only LoRA
        if cfg.load.quantized and len(cfg.stages) > 1:
            raise ConfigError("stages: with load.quantization an arm trains one stage (QLoRA adapters do not stack)")
        if cfg.load.quantized and arm.post:
            raise ConfigError(f"{where}.post: repairs edit weights, which load.quantization packs; sweep unquantized")
        for stage in cfg.stages:
            train_config(cfg, stage, arm)
            trainer_settings(stage, arm, where)
            masked_thought_settings(stage, arm, where)
        sweep_points(arm)
        save_mode(cfg, arm, where)
        if arm.keep is not None:
            check_keep(arm.keep, f"{where}.keep")
    check_accelerate(cfg.accelerate)
    if cfg.keep is not None:
        check_keep(cfg.keep, "keep")


def check_keep(keep: Any, where: str) -> None:
    """A forgetting budget must be a number in (0, 1] (``ftlab.budget``)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ConfigError(f"{where}: {keep!r} is not a number in (0, 1] (the share of each retained score to keep)")


def arm_keep(cfg: ExperimentConfig, arm: ArmConfig) -> float | None:
    """The forgetting budget of an arm: its own ``keep``, else the experiment's (None: no search)."""
    return arm.keep if arm.keep is not None else cfg.keep


def train_config(cfg: ExperimentConfig, stage: StageConfig, arm: ArmConfig) -> TrainConfig:
    """Experiment defaults, then the stage's overrides, then the arm's; the seed is the experiment's (a ``seed``
    under any ``train`` is refused rather than silently replaced: arms are compared on one data order)."""
    for where, train in (("train", cfg.train), (f"stages.{stage.name}.train", stage.train),
                         (f"arms.{arm.name or '?'}.train", arm.train)):  # fmt: skip
        if "seed" in train:
            raise ConfigError(
                f"{where}.seed: arms of an experiment share one seed; set the experiment's top-level `seed:` "
                "(or run a second experiment with another seed)"
            )
    merged = {**cfg.train, **stage.train, **arm.train, "seed": cfg.seed}
    merged.setdefault("save_steps", 25)
    return from_dict(TrainConfig, merged, f"arms.{arm.name or '?'}.train.")


def context_indicator(stage: StageConfig, arm: ArmConfig) -> bool:
    """Whether an arm's training prompts in a stage get the context-dependency indicator: the arm's setting, else
    the stage's (``ftlab.data.context``)."""
    return bool(stage.context_indicator if arm.context_indicator is None else arm.context_indicator)


SAVE_MODES = ("auto", "model", "adapter", "diff")


def save_mode(cfg: ExperimentConfig, arm: ArmConfig, where: str = "arms") -> str:
    """How an arm's stage outputs are saved: the arm's ``save``, else the experiment's (docs/config.md).

    ``model`` is a whole model (LoRA merged), ``adapter`` the PEFT adapter folder (LoRA only), ``diff`` the tensors
    that changed (``ftlab.diffs``). ``auto`` gives ``adapter`` for LoRA, ``model`` for full fine-tuning and
    ``diff`` for every other method, decided once more at save time (a diff over half the model's size is saved
    as a model instead).
    """
    mode = arm.save or cfg.save
    field_name = f"{where}.save" if arm.save else "save"
    if mode not in SAVE_MODES:
        raise ConfigError(f"{field_name}: {mode!r} is not one of {', '.join(SAVE_MODES)}")
    if mode == "adapter" and arm.method.name != "lora":
        raise ConfigError(f"{field_name}: 'adapter' needs method lora; arm {arm.name!r} uses {arm.method.name}")
    if mode != "auto":
        return mode
    return {"lora": "adapter", "full": "model"}.get(arm.method.name, "diff")


def check_accelerate(path: str | None) -> dict[str, Any] | None:
    """The accelerate config an experiment names (``accelerate:``), read and checked; None when there is none."""
    import yaml

    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"accelerate: {path} is not a file (an accelerate config YAML, see examples/accelerate/)")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"accelerate: {path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict) or not data.get("distributed_type"):
        raise ConfigError(f"accelerate: {path}: field 'distributed_type' is missing (e.g. FSDP, DEEPSPEED, MULTI_GPU)")
    return data


def arm_trainer(stage: StageConfig, arm: ArmConfig) -> str:
    """The objective an arm trains a stage with: the arm's own, else the stage's."""
    return arm.trainer or stage.trainer


def trainer_settings(stage: StageConfig, arm: ArmConfig, where: str = "arms") -> Any:
    """The trainer settings of one arm in one stage: the stage's (when the arm keeps the stage's trainer), then the
    arm's, filled into the trainer's registered dataclass (None for a trainer without settings)."""
    from ftlab.recipes.trainers import TRAINERS

    name = arm_trainer(stage, arm)
    merged = {**(stage.settings if name == stage.trainer else {}), **arm.settings}
    spec = TRAINERS[name].settings
    if spec is None:
        if merged:
            raise ConfigError(f"{where}.settings: the {name} trainer takes no settings, got {', '.join(merged)}")
        return None
    return from_dict(spec, merged, f"{where}.settings.")


def masked_thought_settings(stage: StageConfig, arm: ArmConfig, where: str = "arms") -> Any:
    """The arm's Masked Thought settings (None when off); only SFT stages take them."""
    from ftlab.data.masked_thought import MaskedThoughtSettings

    if not arm.masked_thought:
        return None
    if arm_trainer(stage, arm) != "sft":
        raise ConfigError(f"{where}.masked_thought: Masked Thought masks SFT inputs; stage {stage.name!r} is not SFT")
    return from_dict(MaskedThoughtSettings, arm.masked_thought, f"{where}.masked_thought.")


def sweep_points(arm: ArmConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """``(point_name, edit, settings)`` for each repair point of an arm, each checked against its edit.

    A bare list of values sweeps the edit's registered ``sweep`` setting; a mapping of lists sweeps their product.
    """
    from ftlab.edits import EDITS

    sweepable = {name: edit for name, edit in EDITS.items() if edit.sweep}
    points = []
    for edit, spec in arm.post.items():
        where = f"arms.{arm.name}.post.{edit}"
        if edit not in sweepable:
            raise ConfigError(f"{where}: not a repair that can be swept; choose from {', '.join(sweepable)}")
        if isinstance(spec, list):
            spec = {sweepable[edit].sweep: spec}
        if not isinstance(spec, dict) or not spec:
            raise ConfigError(f"{where}: give a list of values or a mapping of lists")
        keys = list(spec)
        grids = [v if isinstance(v, list) else [v] for v in spec.values()]
        for combo in itertools.product(*grids):
            settings = dict(zip(keys, combo, strict=True))
            try:
                sweepable[edit].check_settings(edit, settings)
                check_edit_values(edit, settings)
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from None
            label = str(combo[0]) if len(keys) == 1 else ",".join(f"{k}{v}" for k, v in settings.items())
            points.append((f"{arm.name}+{edit}={label}", edit, settings))
    return points


def check_edit_values(edit: str, settings: dict[str, Any]) -> None:
    """Refuse impossible values of a repair's settings before any model loads: a float that is not finite, or a value
    the edit itself rejects (a weight edit run on empty weights checks its settings and touches nothing).

    Raises:
        ValueError: naming the setting.
    """
    import math

    from ftlab.edits import EDITS

    for key, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}: {value} is not a finite number")
    entry = EDITS.get(edit)
    if entry is None or entry.composite:
        return
    try:
        entry.apply({}, [{}, {}] if edit == "merge" else {}, **settings)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - an edit that cannot run on empty weights checks its values when it runs
        return


def run_id_for(cfg: ExperimentConfig) -> str:
    """Stable id: the same config and output folder give the same run (that is what makes resume work)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def git_sha() -> str:
    """The commit of the working directory's repository, or "" outside one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict[str, str]:
    """Versions of ftlab and the libraries whose behaviour shapes a run's figures."""
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
