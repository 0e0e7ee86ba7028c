"""Skill localization by grafting (Panigrahi et al., ICML 2023, arXiv 2302.06600; docs/methods.md, "Grafting").

Code: abhishekpanigrahi1996/Skill-Localization-by-grafting (``src/graft_trainer.py``).

A graft is θ0 + γ ⊙ (θ_ft − θ0) with a very sparse 0/1 mask γ. ``localize`` learns γ as the authors do:
1. base patch: γ_base = 1 on the top ``sparsity`` fraction of the selected parameters by |θ_ft − θ0|;
2. relaxation γ = γ_base + (1 − 2γ_base)·σ(S − b), S ~ U[0, 1), b = ``sigmoid_bias`` (10);
3. per epoch, average lr·∂L/∂γ = lr·g_θ ⊙ τ over up to ``max_batches`` batches and step
   S ← S − (1 − 2γ_base)·avg·σ'(S − b) by hand (no optimiser);
4. evaluate the rounded graft, keep the best S (the base patch itself is the epoch-0 candidate).
The loss is the completion-token cross-entropy of ``{"prompt", "completion"}`` records (templated as in SFT).

Differences from the authors' code, and why:
- only the 2-D weight matrices inside the transformer blocks are searched (``include`` narrows further), for
  speed and memory (docs/methods.md, "Grafting": for LLMs the search is restricted to a subset of parameters);
  the authors fix only embeddings and head and also search norms and biases;
- the score is the completion loss (lower is better) on the records plus optional dev records, not accuracy;
- the learning rate of S defaults to an automatic scale (set at the first step so that about a mask's worth of
  entries can flip), because the authors' fixed lr 1e7 is tied to their models' gradient size;
- rounding keeps exactly the top-k entries of γ, k = round(sparsity · selected) (``exact_sparsity=True``), so the
  mask has the requested size; ``exact_sparsity=False`` rounds γ > 0.5 as the authors do (the size then drifts).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ftlab.edits.chunks import Inputs, Step, run_in_memory
from ftlab.params import StateDict, check_compatible, layer_map

NAME = "graft"


@dataclass
class GraftResult:
    """What ``localize`` found."""

    mask: dict[str, torch.Tensor]  # key -> bool tensor; True = take the fine-tuned value
    keys: list[str]  # the parameters searched
    n_selected: int  # entries in those parameters
    n_grafted: int  # entries in the mask
    base_loss: float
    tuned_loss: float
    graft_loss: float
    recovered: float  # (base_loss - graft_loss) / (base_loss - tuned_loss)
    lr: float | None = None  # the learning rate used (set automatically when not given)
    history: list[dict[str, float]] = field(default_factory=list)


def apply(base_sd: StateDict, tuned_sd: StateDict, mask: dict[str, torch.Tensor] | str | Path) -> StateDict:
    """The grafted weights: tuned values where ``mask`` is True, base values everywhere else (keys not in mask too).

    Args:
        base_sd: base weights, fp32.
        tuned_sd: fine-tuned weights, same keys and shapes.
        mask: key -> bool tensor of the key's shape, or the path of a safetensors file of them (read chunk by chunk,
            e.g. the ``graft_mask.safetensors`` that ``ftlab edit graft`` saves).

    Returns:
        A new state dict.
    """
    return run_in_memory(prepare, base_sd, [tuned_sd], mask=mask)


def prepare(inputs: Inputs, mask: dict[str, torch.Tensor] | str | Path) -> Step:
    """The elementwise step of ``apply`` (``ftlab.edits.chunks``); mask entries of a tied head are ignored."""
    if isinstance(mask, (str, Path)):
        from safetensors import safe_open

        path = str(mask)
        with safe_open(path, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

        def rows_of(key: str, rows) -> torch.Tensor:
            with safe_open(path, "pt") as f:
                return f.get_tensor(key) if rows is ... else f.get_slice(key)[rows]

    else:
        shapes = {k: tuple(m.shape) for k, m in mask.items()}

        def rows_of(key: str, rows) -> torch.Tensor:
            return mask[key][rows]

    shapes = {k: v for k, v in shapes.items() if k not in inputs.aliases}
    for k, shape in shapes.items():
        if k not in inputs.shapes or shape != tuple(inputs.shapes[k]):
            raise ValueError(f"mask entry '{k}' does not match the state dict (missing key or shape)")

    def step(key: str, rows, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
        return torch.where(rows_of(key, rows).bool(), tuned[0], base) if key in shapes else base

    return step


def select_keys(keys: list[str], shapes: dict[str, torch.Size], include: str | None = None) -> list[str]:
    """The parameters ``localize`` searches: 2-D matrices inside the blocks, filtered by the regex ``include``."""
    layers, _ = layer_map(keys)
    out = [k for k in keys if layers[k] is not None and len(shapes[k]) == 2]
    if include:
        out = [k for k in out if re.search(include, k)]
    if not out:
        raise ValueError(f"no parameters to graft (include={include!r} matched no 2-D block matrix)")
    return out


def base_patch(base_sd: StateDict, tuned_sd: StateDict, sparsity: float, keys: list[str]) -> dict[str, torch.Tensor]:
    """γ_base: True on the top ``sparsity`` fraction of entries of ``keys`` by |θ_ft − θ0| (the authors' default)."""
    mags = {k: (tuned_sd[k] - base_sd[k]).abs() for k in keys}
    return _top_k(mags, _count(sparsity, sum(m.numel() for m in mags.values())))


def localize(
    base_model: PreTrainedModel,
    tuned_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    sparsity: float = 1e-4,
    include: str | None = None,
    epochs: int = 10,
    lr: float | None = None,
    sigmoid_bias: float = 10.0,
    batch_size: int = 8,
    max_batches: int = 16,
    max_length: int = 256,
    dev_records: list[dict[str, Any]] | None = None,
    exact_sparsity: bool = True,
    seed: int = 0,
) -> GraftResult:
    """Find a sparse mask whose fine-tuned values, grafted onto the base, keep the fine-tune's loss.

    Args:
        base_model: the base model.
        tuned_model: the fine-tuned model (same architecture).
        tokenizer: shared tokenizer.
        records: ``{"prompt", "completion"}`` dicts (training data of the graft).
        sparsity: fraction of the selected entries in the mask (the paper's ~0.01% = 1e-4).
        include: regex narrowing the searched parameters (default: every 2-D block matrix).
        epochs: mask-update steps (authors: 10-100); 0 returns the base patch.
        lr: learning rate of S. The authors use 1e7 for RoBERTa, but the right value follows the gradient scale;
            None sets it at the first step so that the k-th largest step (k = mask size) moves S by ``sigmoid_bias``,
            i.e. about a mask's worth of entries can flip per step.
        sigmoid_bias: b in σ(S − b) (authors: 10).
        batch_size: records per batch.
        max_batches: batches averaged per step (authors: up to 128 accumulation steps).
        max_length: longest sequence in tokens (longer records are cut).
        dev_records: extra records used only to pick the best epoch.
        exact_sparsity: round to exactly the top-k of γ (True) or to γ > 0.5 (the authors).
        seed: seed of the initialisation of S.

    Returns:
        A ``GraftResult``; graft the weights with ``apply(base_sd, tuned_sd, result.mask)``.
    """
    if not records:
        raise ValueError("graft needs at least one training record")
    base_sd = {k: v.detach().float().cpu() for k, v in base_model.state_dict().items()}
    tuned_sd = {k: v.detach().float().cpu() for k, v in tuned_model.state_dict().items()}
    check_compatible(base_sd, tuned_sd)
    keys = select_keys(list(base_sd), {k: v.shape for k, v in base_sd.items()}, include)
    work = copy.deepcopy(base_model).float()
    params = dict(work.named_parameters())
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"parameters {missing[:3]} are buffers or tied copies; narrow include=")
    for name, p in params.items():
        p.requires_grad_(name in keys)
    batches = _batches(records, tokenizer, batch_size, max_length)[:max_batches]
    scored = batches + (_batches(dev_records, tokenizer, batch_size, max_length) if dev_records else [])
    relax = _Relaxation(base_sd, tuned_sd, keys, sparsity, sigmoid_bias, seed, params)

    def score(mask: dict[str, torch.Tensor]) -> float:
        relax.load(mask)
        return _mean_loss(work, scored, grad=False)

    base_loss = _mean_loss(work, scored, grad=False)
    best_mask = {k: m.bool() for k, m in relax.gamma_base.items()}
    best = score(best_mask)
    history = [{"epoch": 0, "loss": best, "grafted": float(relax.k)}]
    for epoch in range(1, epochs + 1):
        relax.load(relax.gamma())
        work.zero_grad(set_to_none=True)
        _mean_loss(work, batches, grad=True)
        lr = relax.step(lr)
        mask = relax.rounded(exact_sparsity)
        loss = score(mask)
        history.append({"epoch": epoch, "loss": loss, "grafted": float(sum(int(m.sum()) for m in mask.values()))})
        if loss < best:
            best, best_mask = loss, mask
    work.load_state_dict(tuned_model.state_dict())
    tuned_loss = _mean_loss(work, scored, grad=False)
    gap = base_loss - tuned_loss
    return GraftResult(
        mask={k: m.cpu() for k, m in best_mask.items()},
        keys=keys,
        n_selected=relax.n_selected,
        n_grafted=int(sum(int(m.sum()) for m in best_mask.values())),
        base_loss=base_loss,
        tuned_loss=tuned_loss,
        graft_loss=best,
        recovered=(base_loss - best) / gap if gap != 0 else float("nan"),
        history=history,
        lr=lr,
    )


class _Relaxation:
    """The sigmoid-relaxed mask γ = γ_base + (1 − 2γ_base)·σ(S − b) over the searched parameters."""

    def __init__(
        self,
        base_sd: StateDict,
        tuned_sd: StateDict,
        keys: list[str],
        sparsity: float,
        bias: float,
        seed: int,
        params: dict[str, torch.nn.Parameter],
    ) -> None:
        self.keys, self.bias, self.params = keys, bias, params
        device = params[keys[0]].device
        self.n_selected = sum(base_sd[k].numel() for k in keys)
        self.k = _count(sparsity, self.n_selected)
        self.tau = {k: (tuned_sd[k] - base_sd[k]).to(device) for k in keys}
        self.theta0 = {k: base_sd[k].to(device) for k in keys}
        self.gamma_base = {k: m.float().to(device) for k, m in base_patch(base_sd, tuned_sd, sparsity, keys).items()}
        gen = torch.Generator().manual_seed(seed)
        self.S = {k: torch.rand(base_sd[k].shape, generator=gen).to(device) for k in keys}

    def gamma(self) -> dict[str, torch.Tensor]:
        return {k: g + (1 - 2 * g) * torch.sigmoid(self.S[k] - self.bias) for k, g in self.gamma_base.items()}

    def load(self, values: dict[str, torch.Tensor]) -> None:
        """Write θ0 + γ ⊙ τ into the working model's parameters."""
        with torch.no_grad():
            for k in self.keys:
                self.params[k].copy_(self.theta0[k] + values[k].float() * self.tau[k])

    @torch.no_grad()
    def step(self, lr: float | None) -> float:
        """S ← S − lr·(1 − 2γ_base)·(g_θ ⊙ τ)·σ'(S − b), from the gradients in the working model; returns lr."""
        raw = {}
        for k in self.keys:
            sig = torch.sigmoid(self.S[k] - self.bias)
            raw[k] = (1 - 2 * self.gamma_base[k]) * self.params[k].grad * self.tau[k] * sig * (1 - sig)
        if lr is None:
            kth = torch.topk(torch.cat([r.abs().flatten().cpu() for r in raw.values()]), self.k).values[-1]
            lr = self.bias / float(kth) if kth > 0 else 1.0
        for k in self.keys:
            self.S[k] -= lr * raw[k]
        return lr

    def rounded(self, exact: bool) -> dict[str, torch.Tensor]:
        g = self.gamma()
        return _top_k(g, self.k) if exact else {k: v > 0.5 for k, v in g.items()}


def _count(sparsity: float, total: int) -> int:
    if not 0.0 < sparsity <= 1.0:
        raise ValueError(f"sparsity must be in (0, 1], got {sparsity}")
    return max(1, round(sparsity * total))


def _top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Bool masks with True on exactly the ``k`` largest scores over all tensors (ties broken by position)."""
    flat = torch.cat([s.flatten().float().cpu() for s in scores.values()])
    idx = torch.topk(flat, k).indices
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[idx] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = chosen[start : start + s.numel()].view(s.shape).to(s.device)
        start += s.numel()
    return out


def _batches(
    records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, batch_size: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    from ftlab.data import IGNORE, encode

    rows = [{k: v[:max_length] for k, v in encode(r, "completion", tokenizer).items()} for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        T = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)  # B, T; right padding
        labels = torch.full((len(chunk), T), IGNORE, dtype=torch.long)
        attn = torch.zeros((len(chunk), T), dtype=torch.long)
        for j, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            labels[j, :n] = torch.tensor(r["labels"])
            attn[j, :n] = 1
        out.append({"input_ids": ids, "labels": labels, "attention_mask": attn})
    return out


def _mean_loss(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]], grad: bool) -> float:
    """Mean completion loss over batches; with ``grad`` it also accumulates parameter gradients of that mean."""
    device = next(model.parameters()).device
    total = 0.0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with torch.set_grad_enabled(grad):
            loss = model(**b).loss
            if grad:
                (loss / len(batches)).backward()
        total += float(loss.detach())
    return total / max(len(batches), 1)
