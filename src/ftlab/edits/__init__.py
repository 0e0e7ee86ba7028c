"""Post-hoc repairs of a fine-tune: weight edits as pure functions on state dicts, and decode-time composites.

``EDITS`` is the registry of repairs, one ``Edit`` entry each. Weight edits map ``(base_sd, tuned_sd, **settings)`` to
a new state dict of fp32 tensors; each is written as statistics passes plus an elementwise step over row chunks
(``chunks.py``), so ``stream.py`` runs the same code over safetensors shards on disk (``ftlab edit``):
``scale`` (interpolate / extrapolate the delta), ``lines`` (LiNeS layer-increasing scaling), ``merge`` (task
arithmetic, TIES; ``tuned_sd`` may be a list), ``reset`` (copy a fraction back from the base), ``half_reset``
(HFT-style) and ``graft`` (apply a skill-localization mask; ``graft.localize`` learns one).
Decode-time composites, callable like a model and scored by the evaluation runner: ``TuCoModel`` (scaled
fine-tuning component; in the registry as ``tuco``) and ``EFTModel`` (emulated fine-tuning / up-scaling).

An entry's ``sweep`` names the setting that a bare list of values varies in an experiment's repair sweep
(``post: {scale: [0.5, 0.7]}`` sweeps ``factor``); entries without one cannot be swept. A new repair is one module
here plus one line in ``EDITS``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from ftlab.edits import graft, lines, merge, reset, scale
from ftlab.edits.chunks import run_in_memory
from ftlab.edits.eft import EFTModel
from ftlab.edits.tuco import TuCoModel
from ftlab.params import StateDict, tied_aliases


@dataclass(frozen=True)
class Edit:
    """One repair of the registry.

    Attributes:
        apply: a weight edit ``(base_sd, tuned_sd, **settings) -> state dict``, or for a composite
            ``(base_model, tuned_model, **settings) -> model``.
        sweep: the setting a bare list of values sweeps in ``post:``; None when the edit cannot be swept.
        composite: a decode-time composite (scored as a model; writes no weights).
        prepare: for a weight edit, ``prepare(inputs, **settings) -> step``: its statistics passes and elementwise
            step (``ftlab.edits.chunks``), which both ``apply_edit`` and the streaming ``ftlab.edits.stream`` run.
            An edit without one runs ``apply`` on whole fp32 state dicts, in memory (it cannot stream).
    """

    apply: Callable[..., Any]
    sweep: str | None = None
    composite: bool = False
    prepare: Callable[..., Any] | None = None

    def check_settings(self, name: str, settings: dict[str, Any]) -> None:
        """Raise a ValueError naming the setting when ``settings`` do not fit this edit's signature."""
        try:
            inspect.signature(self.apply).bind(None, None, **settings)
        except TypeError as err:
            allowed = [p for p in list(inspect.signature(self.apply).parameters)[2:] if p not in ("self",)]
            raise ValueError(f"{name}: {err}; its settings are {', '.join(allowed)}") from None


EDITS: dict[str, Edit] = {
    "scale": Edit(scale.apply, sweep="factor", prepare=scale.prepare),
    "lines": Edit(lines.apply, sweep="alpha", prepare=lines.prepare),
    "merge": Edit(merge.apply, prepare=merge.prepare),
    "reset": Edit(reset.apply, sweep="fraction", prepare=reset.prepare),
    "half_reset": Edit(reset.half_reset, prepare=reset.prepare_half_reset),
    "graft": Edit(graft.apply, prepare=graft.prepare),
    "tuco": Edit(TuCoModel, sweep="alpha", composite=True),
}


def apply_edit(name: str, base_sd: StateDict, tuned_sd: StateDict | list[StateDict], **settings: Any) -> StateDict:
    """Run the weight edit ``name`` on fp32 state dicts.

    A head that is a tied copy of the input embedding (in base and every tuned state dict) is edited once, as the
    embedding, and copied back, so the result can be loaded into a model with tied embeddings.

    Args:
        name: a key of ``EDITS``.
        base_sd: base weights.
        tuned_sd: fine-tuned weights (a list of them for ``merge``).
        **settings: the edit's settings (``factor``; ``alpha``, ``beta``; ``fraction``, ``how``, ``seed``; ...).

    Returns:
        The edited state dict, with the same keys as ``base_sd``.
    """
    if name not in EDITS or EDITS[name].composite:
        weights = [k for k, e in EDITS.items() if not e.composite]
        raise ValueError(f"unknown edit {name!r} (a weight edit); choose from {', '.join(weights)}")
    tuned_list = tuned_sd if isinstance(tuned_sd, list) else [tuned_sd]
    aliases = tied_aliases(base_sd, *tuned_list) if all(set(t) == set(base_sd) for t in tuned_list) else {}
    if aliases:
        base_sd = {k: v for k, v in base_sd.items() if k not in aliases}
        tuned_list = [{k: v for k, v in t.items() if k not in aliases} for t in tuned_list]
    if name != "merge" and len(tuned_list) != 1:
        raise ValueError(f"{name} takes one fine-tuned state dict, got {len(tuned_list)}")
    edit = EDITS[name]
    if edit.prepare is None:  # a whole-state-dict edit: runs in memory only
        out = edit.apply(base_sd, tuned_list if name == "merge" else tuned_list[0], **settings)
    else:
        out = run_in_memory(edit.prepare, base_sd, tuned_list, aliases=aliases, **settings)
    for head, embed in aliases.items():
        out[head] = out[embed].clone()
    return out


def edit_model(
    base_model: PreTrainedModel, tuned_model: PreTrainedModel, name: str, inplace: bool = False, **settings: Any
) -> PreTrainedModel:
    """Apply a weight edit and return a model holding the result (a copy of the tuned model unless ``inplace``).

    Args:
        base_model: the base model.
        tuned_model: the fine-tuned model (its config, tokenizer and tied-weight layout are kept).
        name: a key of ``EDITS`` (``merge`` takes extra fine-tunes as ``others=[model, ...]``).
        inplace: load the edited weights into ``tuned_model`` itself instead of a copy (saves memory).
        **settings: the edit's settings.

    Returns:
        The edited model, in eval mode, on the tuned model's device and dtype.
    """
    from ftlab.models import state_dict_fp32

    others = settings.pop("others", None)
    base_sd, tuned_sd = state_dict_fp32(base_model), state_dict_fp32(tuned_model)
    tuned_arg: StateDict | list[StateDict] = tuned_sd
    if others:
        tuned_arg = [tuned_sd, *[state_dict_fp32(m) for m in others]]
    edited = apply_edit(name, base_sd, tuned_arg, **settings)
    del base_sd, tuned_sd, tuned_arg
    model = tuned_model if inplace else copy.deepcopy(tuned_model)
    load_state_dict_into(model, edited)
    return model.eval()


def load_state_dict_into(model: PreTrainedModel, sd: StateDict) -> None:
    """Copy ``sd`` into ``model`` (cast to each parameter's dtype); tied parameters must receive equal values."""
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(sd))
    if missing:
        raise ValueError(f"edited state dict lacks {missing[:5]}")
    seen: dict[int, str] = {}
    with torch.no_grad():
        for k, target in own.items():
            ptr = target.data_ptr()
            if ptr in seen:
                if not torch.equal(sd[k], sd[seen[ptr]]):
                    raise ValueError(
                        f"'{k}' is tied to '{seen[ptr]}' in the model but the edit gave them different values"
                    )
                continue
            seen[ptr] = k
            target.copy_(sd[k].to(target.dtype))


__all__ = ["EDITS", "Edit", "EFTModel", "TuCoModel", "apply_edit", "edit_model", "load_state_dict_into"]
