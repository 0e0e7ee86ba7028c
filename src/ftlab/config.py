"""Run configuration: nested dataclasses are the schema, YAML is their serialised form.

A run config looks like::

    model: smollm2-135m-instruct        # HF id, local folder, or the embedded default
    load: {dtype: bf16}                 # how to load it: dtype, device_map, attn_implementation, revision,
                                        # trust_remote_code, quantization (ftlab.loading.ModelSettings)
    data:
      train: data/train.jsonl           # JSONL/CSV/parquet/arrow file, built-in or hub data set name
    method:
      name: lora                        # any name in ftlab.methods.METHODS
      params: {r: 8}                    # validated by that method's own Config dataclass
    train:
      lr: 1.0e-4
      max_steps: 60
    output:
      dir: out/my-run

Any key can be overridden from the command line with a dotted path: ``--set train.lr=1e-4``. Unknown keys and
values of the wrong type are errors that name the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ftlab.errors import InputError
from ftlab.loading import ModelSettings

T = TypeVar("T")


class ConfigError(InputError):
    """A config value is missing, unknown or of the wrong type; the message names the field."""


# ftlab.data.records.FORMATS and "auto", listed here so that checking a config does not import the data package
DATA_FORMATS = ("auto", "chat", "completion", "preference", "verifiable")


@dataclass
class DataConfig:
    train: str = ""  # JSONL/CSV/parquet/arrow file or folder, built-in data set name, or hub data set name
    split: str = "train"  # split of a hub data set or load_from_disk folder; slices too ("train[:80%]")
    columns: dict[str, str] = field(default_factory=dict)  # record field -> column: {prompt: question}
    format: str = "auto"  # auto | chat | completion | preference | verifiable
    max_length: int = 512  # tokens; a longer record is an error unless truncate is true
    truncate: bool = False  # cut over-long records instead of failing
    limit: int | None = None  # use only the first N records
    validation: float | str | None = None  # held-out fraction of the records (0.1), or a validation data source
    context_indicator: bool = False  # mark context-dependent prompts (ftlab.data.context)

    def __post_init__(self) -> None:
        at_least("data", self, max_length=1, limit=1)
        if self.format not in DATA_FORMATS:
            raise ConfigError(f"data.format: {self.format!r} is not one of {', '.join(DATA_FORMATS)}")
        if isinstance(self.validation, float) and not 0.0 < self.validation < 1.0:
            raise ConfigError(f"data.validation: the fraction {self.validation} is not in (0, 1)")


@dataclass
class MethodConfig:
    name: str = "full"  # a name in ftlab.methods.METHODS
    params: dict[str, Any] = field(default_factory=dict)  # checked against that method's Config


@dataclass
class TrainConfig:
    trainer: str = "sft"  # sft (dpo and grpo are stage kinds of `ftlab run`)
    lr: float = 1e-4  # peak learning rate
    epochs: float = 1.0  # passes over the data (ignored when max_steps > 0)
    max_steps: int = -1  # optimizer steps; -1 means use epochs
    batch_size: int = 8  # per-device micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.0
    scheduler: str = "constant"  # any transformers scheduler name: constant, linear, cosine, ...
    weight_decay: float = 0.0  # keep 0 for masked methods: decay would move frozen entries
    max_grad_norm: float = 1.0
    seed: int = 0
    logging_steps: int = 5
    save_steps: int = 0  # checkpoint every N steps (0: only at the end); used for resume
    bf16: bool | str = "auto"  # bfloat16 autocast: true, false, or auto (on with native bf16; docs/speed.md)
    group_by_length: bool = True  # batch records of similar length together (less padding; docs/speed.md)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower steps
    memory_check: bool = True  # refuse to train when the memory plan (ftlab.memory) exceeds the device
    report_to: list[str] = field(default_factory=list)  # tensorboard, mlflow, wandb, trackio (ftlab.trackers)
    run_name: str = ""  # tracker run name (ftlab run: its prefix); default: the output folder's name
    logging_dir: str = ""  # tensorboard folder; default: <output>/tb

    def __post_init__(self) -> None:
        at_least(
            "train", self, batch_size=1, grad_accum=1, logging_steps=1, save_steps=0, weight_decay=0, max_grad_norm=0
        )
        for name in ("lr", "epochs"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):  # also refuses NaN
                raise ConfigError(f"train.{name}: {value} must be a finite number > 0")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError(f"train.max_steps: {self.max_steps} is neither -1 (train by epochs) nor >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio: {self.warmup_ratio} is not in [0, 1)")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"train.scheduler: {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.bf16 not in (True, False, "auto"):
            raise ConfigError(f"train.bf16: {self.bf16!r} is not true, false or auto")
        check_trackers(self.report_to)


# transformers' scheduler names (SchedulerType), listed here so that checking a config does not import transformers
SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)  # fmt: skip


def at_least(where: str, obj: Any, **bounds: float) -> None:
    """Raise a ConfigError naming ``<where>.<field>`` when a numeric field of ``obj`` is below its bound.

    Args:
        where: the dotted prefix of the fields in messages (``train``, ``eval``, ``data``).
        obj: the config object.
        **bounds: field name -> smallest allowed value (``None`` values of optional fields are skipped).
    """
    for name, low in bounds.items():
        value = getattr(obj, name)
        if value is not None and not value >= low:  # `not >=` also refuses NaN
            raise ConfigError(f"{where}.{name}: {value} is below its minimum {low:g}")


# Trackers `train.report_to` may name: name -> (module to find, how to install it); ftlab.trackers writes to them.
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install mlflow-skinny"),
    "wandb": ("wandb", "pip install wandb"),
    "trackio": ("trackio", "pip install trackio"),
}


def installed(module: str) -> bool:
    """True when ``module`` can be imported (found without importing it)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_trackers(names: list[str]) -> None:
    """Raise a one-line ``ConfigError`` naming ``train.report_to`` for an unknown or uninstalled tracker (no tracker
    library is imported)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: {name!r} is not a tracker; choose from {', '.join(TRACKERS)}")
        module, install = TRACKERS[name]
        if not installed(module):
            raise ConfigError(f"train.report_to: {name} is not installed ({install})")


@dataclass
class OutputConfig:
    dir: str = "out/run"
    merge_lora: bool = False  # also write the LoRA-merged model under model/
    overwrite: bool = False


@dataclass
class RunConfig:
    model: str = "smollm2-135m-instruct"
    load: ModelSettings = field(default_factory=ModelSettings)  # dtype, device_map, quantization, ... (loading.py)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, checking keys and types.

    Args:
        cls: the dataclass type.
        data: the values; missing keys take their defaults.
        where: dotted prefix used in error messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: on unknown keys or values of the wrong type, naming the dotted field.
    """
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {where + unknown[0]!r}; allowed: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, where + k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a valid {tp}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict; values are parsed as YAML (``1e-4``, ``true``, ``[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"override {item!r}: {key.strip()!r} is not a key path like train.lr")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a mapping")
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a YAML config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {err.start + 1} of the file)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{at}: invalid YAML ({_yaml_problem(err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line of a YAML error: its problem and where (``expected ',' or ']' at line 3, column 5``)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load a config dataclass from YAML plus dotted overrides, validating every field.

    Args:
        cls: the config dataclass (e.g. ``RunConfig``).
        path: YAML file, or None for defaults.
        overrides: ``key.path=value`` strings applied after the file.

    Returns:
        The validated config.
    """
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (for YAML/JSON)."""
    return dataclasses.asdict(cfg)
