"""AdamW whose state lives only on a parameter's selected entries, with periodic re-selection (LIFT's optimizer).

For a masked parameter the state is three 1-D tensors of length k: the flat indices of the selected entries and the
two moments. A step gathers the (dense) gradient at those indices, updates the moments, and writes the update back
to those entries only: every other entry of the parameter is never written, so it stays bit-identical. Parameters
without a mask get ordinary dense AdamW. Every ``update_interval`` optimizer steps the indices are re-selected from
the current weights; moments of entries that stay selected carry over and new entries start at zero (the old
moments are scattered into a dense zero tensor, then gathered at the new indices, as LIFT's ``update_masks`` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def _index_dtype(numel: int) -> torch.dtype:
    # int32 indices halve the index memory; advanced indexing accepts them (int64 only past 2**31 entries).
    return torch.int32 if numel < 2**31 else torch.int64


class SparseAdamW(torch.optim.Optimizer):
    """AdamW with state only on selected entries.

    Args:
        params: parameters (or parameter groups) to optimize.
        indices: parameter -> 1-D flat indices of its trainable entries; parameters not in it update densely.
        select: ``select(param) -> indices`` used at each refresh (e.g. LIFT's low-rank magnitude rule).
        update_interval: re-select every this many optimizer steps (0: never).
        grad_masks: parameter -> float 0/1 tensor kept in sync with the indices (the plan's gradient masks).
        lr: learning rate.
        betas: moment decay rates.
        eps: added to the denominator.
        weight_decay: decoupled decay, applied to the selected entries only.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        indices: dict[torch.Tensor, torch.Tensor],
        select: Callable[[torch.Tensor], torch.Tensor] | None = None,
        update_interval: int = 0,
        grad_masks: dict[torch.Tensor, torch.Tensor] | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.select, self.update_interval = select, update_interval
        self.grad_masks = grad_masks or {}
        self.optimizer_steps = 0
        for group in self.param_groups:
            for p in group["params"]:
                idx = indices.get(p)
                state = self.state[p]
                state["step"] = torch.zeros((), dtype=torch.float32)
                if idx is None:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    continue
                state["idx"] = idx.to(p.device, _index_dtype(p.numel()))
                state["exp_avg"] = torch.zeros(idx.numel(), dtype=p.dtype, device=p.device)
                state["exp_avg_sq"] = torch.zeros(idx.numel(), dtype=p.dtype, device=p.device)
                self._sync_mask(p)
        steps = [int(s["step"]) for s in self.state.values() if "step" in s]
        self.optimizer_steps = max(steps, default=0)  # the refresh schedule resumes where it stopped

    def _sync_mask(self, p: torch.Tensor) -> None:
        mask = self.grad_masks.get(p)
        if mask is not None:
            mask.zero_()
            mask.view(-1)[self.state[p]["idx"]] = 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step on the selected entries (dense for unmasked parameters), then re-select when due."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                idx = state.get("idx")
                g = p.grad.view(-1)[idx] if idx is not None else p.grad  # (k,) gathered from the dense gradient
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
                step_size = lr / (1 - b1**t)
                if idx is None:
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.addcdiv_(m, denom, value=-step_size)
                    continue
                flat = p.view(-1)
                vals = flat[idx]
                if wd:
                    vals.mul_(1 - lr * wd)
                vals.addcdiv_(m, denom, value=-step_size)
                flat[idx] = vals
        self.optimizer_steps += 1
        if self.update_interval and self.select and self.optimizer_steps % self.update_interval == 0:
            self.refresh()
        return loss

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-select every masked parameter's entries from its current weights, carrying the moments over."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "idx" not in state:
                    continue
                old, new = state["idx"], self.select(p).to(p.device, state["idx"].dtype)
                dense = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                for key in ("exp_avg", "exp_avg_sq"):
                    dense.zero_()
                    dense[old] = state[key]
                    state[key] = dense[new].clone()
                state["idx"] = new
                self._sync_mask(p)
        steps = [int(s["step"]) for s in self.state.values() if "step" in s]
        self.optimizer_steps = max(steps, default=0)  # the refresh schedule resumes where it stopped

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state; keeps the integer indices integer (torch casts all non-step state to the parameter dtype)."""
        saved = {k: v["idx"].clone() for k, v in state_dict["state"].items() if "idx" in v}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, idx in saved.items():
            p = params[i]
            self.state[p]["idx"] = idx.to(p.device, _index_dtype(p.numel()))
            self._sync_mask(p)
        steps = [int(s["step"]) for s in self.state.values() if "step" in s]
        self.optimizer_steps = max(steps, default=0)  # the refresh schedule resumes where it stopped
