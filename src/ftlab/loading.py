"""How a model is loaded: dtype, device placement, attention kernel, revision, remote code and quantization.

``ModelSettings`` is one plain dataclass shared by every config and command that takes a model: ``ftlab train``
(the ``load:`` section of a run config), ``ftlab run`` (the experiment's ``load:`` section, applied to the base and
every arm), and the ``--dtype``, ``--device-map``, ``--attn``, ``--revision``, ``--trust-remote-code`` and
``--quantization`` options of ``eval``, ``analyze`` and the composite edits. ``ftlab.models.load_model(ref,
settings=...)`` turns it into ``from_pretrained`` keywords.

This module imports no torch at import time (the command line parses options without it); the functions that need
torch or transformers import them when called.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from ftlab.errors import InputError

DTYPES = ("auto", "bf16", "fp16", "fp32")
QUANTIZATIONS = ("none", "4bit", "8bit")
# transformers' attention implementations; a hub kernel ("kernels-community/flash-attn") is also accepted.
ATTENTIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# Methods that can train on a quantized base: only adapters over frozen k-bit weights (QLoRA).
QUANTIZED_METHODS = ("lora",)
BNB_PIP = "pip install bitsandbytes"
REMOTE_CODE_HINT = (
    "this model needs custom code; set trust_remote_code: true (load.trust_remote_code, or --trust-remote-code) "
    "if you trust it"
)


@dataclass
class ModelSettings:
    """How to load a model (every field has the default of a plain fp32 load on the default device).

    Attributes:
        dtype: auto (the checkpoint's own ``dtype``/``torch_dtype`` in config.json; fp32 when it records none),
            bf16, fp16 or fp32. With ``quantization`` it is the dtype of the layers left unquantized.
        device_map: where the weights go: None/"none" (the whole model on CUDA when available, else CPU), "auto"
            (accelerate spreads it over the GPUs, then CPU), "cpu", "cuda", "cuda:1", ...
        attn_implementation: eager, sdpa, flash_attention_2, ... (None: transformers' default).
        revision: a branch, tag or commit of a hub model (None: the default branch).
        trust_remote_code: run the model's own code from the hub; off unless set.
        quantization: none, 4bit (bitsandbytes NF4, double quantization, bf16 compute) or 8bit (LLM.int8); only
            ``lora`` trains on a quantized base (QLoRA).
    """

    dtype: str = "fp32"
    device_map: str | None = None
    attn_implementation: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    quantization: str = "none"

    def __post_init__(self) -> None:
        check_settings(self)

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"


def check_settings(s: ModelSettings, where: str = "load.") -> None:
    """Raise a ``ConfigError`` naming ``<where><field>`` for a value no loader takes."""
    from ftlab.config import ConfigError  # config.py imports this module for its schema

    if s.dtype not in DTYPES:
        raise ConfigError(f"{where}dtype: {s.dtype!r} is not one of {', '.join(DTYPES)}")
    if s.quantization not in QUANTIZATIONS:
        raise ConfigError(f"{where}quantization: {s.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if (
        s.attn_implementation is not None
        and s.attn_implementation not in ATTENTIONS
        and "/" not in s.attn_implementation
    ):
        raise ConfigError(
            f"{where}attn_implementation: {s.attn_implementation!r} is not one of {', '.join(ATTENTIONS)} "
            "(or a hub kernel such as kernels-community/flash-attn)"
        )
    dm = s.device_map
    if dm is not None and not (dm in ("auto", "none", "cpu", "cuda", "mps") or dm.startswith(("cuda:", "xpu", "npu"))):
        raise ConfigError(f"{where}device_map: {dm!r} is not auto, none, cpu, cuda or cuda:N")
    if s.revision is not None and not str(s.revision).strip():
        raise ConfigError(f"{where}revision: empty; leave it out for the default branch")


def settings_from_options(
    dtype: str | None = None,
    device_map: str | None = None,
    attn: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
) -> ModelSettings:
    """``ModelSettings`` from command-line options (None keeps a field's default); errors name the option."""
    from ftlab.config import ConfigError

    values = dict(
        dtype=dtype or "fp32",
        device_map=device_map,
        attn_implementation=attn,
        revision=revision,
        trust_remote_code=trust_remote_code,
        quantization=quantization or "none",
    )
    try:
        return ModelSettings(**values)
    except ConfigError as err:
        name, rest = str(err).split(":", 1)
        flag = {"attn_implementation": "attn"}.get(name.removeprefix("load."), name.removeprefix("load."))
        raise ConfigError(f"--{flag.replace('_', '-')}:{rest}") from None


def check_method(settings: ModelSettings, method: str, where: str = "method.name") -> None:
    """Refuse, before any weight is loaded, a method that cannot train on the settings' weights.

    A quantized base trains only through adapters (``lora``: QLoRA); fp16 weights only under adapters too, since an
    fp16 copy of AdamW's state underflows (bf16 keeps fp32's range and trains as it is).
    """
    from ftlab.config import ConfigError

    if settings.quantized and method not in QUANTIZED_METHODS:
        raise ConfigError(
            f"{where}: {method!r} cannot train a {settings.quantization} quantized base (load.quantization); its "
            f"weights are frozen integers. Use lora (QLoRA) or load.quantization: none"
        )
    if settings.dtype == "fp16" and not settings.quantized and method not in QUANTIZED_METHODS:
        raise ConfigError(
            f"{where}: {method!r} would train fp16 weights, whose AdamW state underflows (load.dtype: fp16); use "
            "load.dtype: bf16, or fp32 with train.bf16: true, or lora"
        )


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def torch_dtype(name: str) -> Any:
    """The torch dtype of ``bf16``/``fp16``/``fp32``."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def checkpoint_dtype(config: Any) -> Any:
    """The dtype a checkpoint's config records (``dtype``, or the older ``torch_dtype``); fp32 when none."""
    import torch

    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and isinstance(getattr(torch, value.replace("torch.", ""), None), torch.dtype):
            return getattr(torch, value.replace("torch.", ""))
    return torch.float32


def resolve_dtype(settings: ModelSettings, config: Any = None) -> Any:
    """The torch dtype the settings ask for; ``auto`` reads ``config`` (a transformers config or a dict)."""
    if settings.dtype == "auto":
        return checkpoint_dtype(config) if config is not None else torch_dtype("fp32")
    return torch_dtype(settings.dtype)


def quantization_config(settings: ModelSettings) -> Any:
    """transformers' ``BitsAndBytesConfig`` for the settings (None without quantization)."""
    if not settings.quantized:
        return None
    if not bitsandbytes_available():
        raise InputError(f"quantization needs bitsandbytes: {BNB_PIP} (or pip install 'ftlab[quant]')")
    import torch
    from transformers import BitsAndBytesConfig

    if settings.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def device_map_value(settings: ModelSettings, default_device: str) -> str | None:
    """What ``from_pretrained`` gets as ``device_map``: None for a plain load that is moved after (the historical
    path); a quantized load must be placed while loading, so it gets the default device when none is named."""
    dm = None if settings.device_map in (None, "none") else settings.device_map
    if dm is None and settings.quantized:
        return default_device
    return dm


def pretrained_kwargs(settings: ModelSettings, config: Any, default_device: str) -> dict[str, Any]:
    """Keywords for ``AutoModelForCausalLM.from_pretrained`` (``config`` is the checkpoint's, for ``auto``)."""
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(settings, config),
        "trust_remote_code": settings.trust_remote_code,
    }
    if settings.revision:
        kwargs["revision"] = settings.revision
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    quant = quantization_config(settings)
    if quant is not None:
        kwargs["quantization_config"] = quant
    dm = device_map_value(settings, default_device)
    if dm is not None:
        kwargs["device_map"] = dm
    return kwargs


def remote_code_error(err: Exception, ref: Any) -> InputError | None:
    """The one-line error for transformers' "needs trust_remote_code" ValueError (None for any other error)."""
    if "trust_remote_code" in str(err):
        return InputError(f"{ref}: {REMOTE_CODE_HINT}")
    return None


def is_quantized(model: Any) -> bool:
    """True for a model loaded with bitsandbytes (4-bit or 8-bit)."""
    return bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "hf_quantizer", None) is not None
    )


def check_device(settings: ModelSettings) -> None:
    """Refuse bf16 weights on a GPU without bf16 arithmetic (before Ampere); CPUs emulate it."""
    from ftlab.config import ConfigError

    if settings.dtype != "bf16":
        return
    import torch

    if torch.cuda.is_available() and settings.device_map not in ("cpu",) and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "load.dtype: bf16 needs a GPU with bf16 support (Ampere or newer); use fp32 with lora, or fp16 with lora"
        )
