"""Plain helpers that tests call directly, imported as ``from _util import ...`` (fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list) -> Path:
    """Write dicts (as JSON) or raw strings, one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def record_plans(monkeypatch, module) -> list:
    """Wrap ``module.plan`` for one test so every Plan it returns is also appended to the returned list."""
    plans = []
    original = module.plan
    monkeypatch.setattr(module, "plan", lambda *a: plans.append(original(*a)) or plans[-1])
    return plans


def changed_keys(before: dict, after: dict) -> set[str]:
    """Names of ``before``'s tensors that are not bit-identical in ``after`` (two state dicts)."""
    import torch

    return {k for k in before if not torch.equal(before[k], after[k])}


def assert_toy_plan_held(before: dict, after: dict, toy) -> None:
    """A run of the ``toy_method`` fixture's method moved exactly its two weights, and only the unmasked half of
    ``toy.masked``'s rows (the masked-out rows stay bit-identical)."""
    import torch

    assert changed_keys(before, after) == {toy.masked, toy.open}
    half = before[toy.masked].shape[0] // 2
    assert torch.equal(before[toy.masked][half:], after[toy.masked][half:])  # masked-out rows: bit-identical
    assert not torch.equal(before[toy.masked][:half], after[toy.masked][:half])


def assert_lora_base_bit_identical(before: dict, result) -> set[str]:
    """A LoRA run (DPO / GRPO ``result``) kept the base weights under its adapters bit-identical, and its merged
    model moved no norm, embedding or head; returns the names the merged model moved."""
    import torch

    from ftlab.models import state_dict_fp32

    peft_state = result.model.state_dict()
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in peft_state.items()}
    assert all(torch.equal(before[k], base[k]) for k in before)  # frozen under the adapters
    moved = changed_keys(before, state_dict_fp32(result.final_model()))
    assert not {k for k in moved if "norm" in k or "embed" in k or "lm_head" in k}
    return moved


def layer_inputs(model, ids, mask=None):
    """``(embeddings, layer keyword arguments)`` to call a Llama's decoder layers directly on ``ids``, as its own
    forward does (causal mask, positions, rotary embeddings); for tests that rebuild a forward pass block by block."""
    import torch
    from transformers.masking_utils import create_causal_mask

    inner = model.model
    with torch.no_grad():
        x = inner.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        causal = create_causal_mask(
            config=inner.config, inputs_embeds=x, attention_mask=mask, cache=None, position_ids=pos
        )
    return x, {"attention_mask": causal, "position_ids": pos, "position_embeddings": inner.rotary_emb(x, pos)}


def spy_kwargs(monkeypatch, owner, name: str) -> dict:
    """Wrap ``owner.name`` (a class or function) so every call's keyword arguments land in the returned dict."""
    seen: dict = {}
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return seen


def close_summaries(a, b, tol=1e-6, path="summary") -> bool:
    """Equal summaries: floats within ``tol`` (relative), the rest exactly; a failure names the key path."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, a.keys(), b.keys())
        return all(close_summaries(a[k], b[k], tol, f"{path}.{k}") for k in a)
    if isinstance(a, list):
        assert len(a) == len(b), path
        return all(close_summaries(x, y, tol, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= tol * max(1.0, abs(b)), (path, a, b)
        return True
    assert a == b, (path, a, b)
    return True
