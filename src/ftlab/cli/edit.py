"""``ftlab edit ...``: repairs of a fine-tune, argument parsing and printing over ``ftlab.edits``.

Weight edits write a model folder that transformers loads (atomically, with ``ftlab.models.save_model``) plus
``ftlab_edit.json`` describing the edit; ``tuco`` and ``eft`` are decode-time composites, so their commands print
greedy generations instead. Every model argument also takes a PEFT adapter folder (put on ``--base``).

    ftlab edit lines --base smollm2-135m-instruct --tuned out/full/model --alpha 0.6 --out out/lines06
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from ftlab.atomic import write_json
from ftlab.cli.common import BASE, JSON, TUNED, command, console, fail, generate_and_print, load, prompts_from
from ftlab.errors import InputError

app = typer.Typer(help="Repair a fine-tune: weight edits that write a new model, and decode-time composites.")
OUT = typer.Option(..., "--out", help="Folder for the edited model (replaced atomically).")


def _weight_edit(name: str, base: str, tuned: list[str], out: str, **settings: Any) -> None:
    from ftlab.edits import apply_edit, load_state_dict_into
    from ftlab.models import save_model, state_dict_fp32

    base_model, _ = load(base)
    base_sd = state_dict_fp32(base_model)
    del base_model
    model, tok = load(tuned[0], base)
    tuned_sds = [state_dict_fp32(model)] + [state_dict_fp32(load(t, base)[0]) for t in tuned[1:]]
    start = time.perf_counter()
    try:
        edited = apply_edit(name, base_sd, tuned_sds if name == "merge" else tuned_sds[0], **settings)
    except ValueError as exc:  # a setting out of range, or models that do not fit together
        raise InputError(str(exc)) from None
    seconds = time.perf_counter() - start
    load_state_dict_into(model, edited)
    save_model(model, tok, out)
    jsonable = {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    info = {"edit": name, "base": base, "tuned": tuned, "settings": jsonable, "seconds": round(seconds, 3)}
    write_json(Path(out) / "ftlab_edit.json", info)
    console(stderr=True).print(f"{name}: edited {len(edited)} tensors in {seconds:.2f}s")
    typer.echo(f"saved to {out}")


@command(app)
def scale(
    factor: float = typer.Option(
        ..., "--factor", help="θ0 + factor·(θ_ft − θ0): 0 = base, 1 = tuned, >1 extrapolates."
    ),
    base: str = BASE,
    tuned: str = TUNED,
    out: str = OUT,
) -> None:
    """Scale the fine-tuning delta in weight space (interpolate or extrapolate between base and tuned)."""
    _weight_edit("scale", base, [tuned], out, factor=factor)


@command(app)
def lines(
    alpha: float = typer.Option(..., "--alpha", help="Scale of the first block and of non-block keys."),
    beta: float | None = typer.Option(None, "--beta", help="Extra scale reached at the last block (default 1 − α)."),
    non_block_scale: float | None = typer.Option(
        None, "--non-block-scale", help="Scale of embeddings, final norm, head (default α)."
    ),
    base: str = BASE,
    tuned: str = TUNED,
    out: str = OUT,
) -> None:
    """LiNeS: scale the delta of block ℓ by α + β·ℓ/(L−1), shallow blocks nearest the base."""
    _weight_edit("lines", base, [tuned], out, alpha=alpha, beta=beta, non_block_scale=non_block_scale)


@command(app)
def merge(
    base: str = BASE,
    out: str = OUT,
    tuned: list[str] = typer.Option(..., "--tuned", help="A fine-tune of the base (repeat for each)."),
    method: str = typer.Option("task_arithmetic", "--method", help="task_arithmetic or ties."),
    lam: float | None = typer.Option(None, "--lam", help="Coefficient on the merged delta (default 1/T, TIES 1)."),
    density: float = typer.Option(0.2, "--density", help="TIES: fraction of each delta kept by magnitude."),
    lines_alpha: float | None = typer.Option(None, "--lines-alpha", help="LiNeS α (default ‖Σ τ‖₁/‖τ_MTL‖₁/T)."),
    lines_beta: float | None = typer.Option(None, "--lines-beta", help="LiNeS β; switches LiNeS on."),
) -> None:
    """Merge fine-tunes of one base: task arithmetic or TIES, optionally with LiNeS on the merged delta."""
    _weight_edit(
        "merge",
        base,
        tuned,
        out,
        method=method,
        lam=lam,
        density=density,
        lines_alpha=lines_alpha,
        lines_beta=lines_beta,
    )


@command(app)
def reset(
    fraction: float = typer.Option(..., "--fraction", help="Share of parameters copied back from the base."),
    how: str = typer.Option("random", "--how", help="random, smallest (smallest change first) or layers."),
    seed: int = typer.Option(0, "--seed", help="Seed for --how random."),
    order: str = typer.Option("bottom", "--order", help="For --how layers: from the input (bottom) or output (top)."),
    base: str = BASE,
    tuned: str = TUNED,
    out: str = OUT,
) -> None:
    """Reset a fraction of the parameters to their base values."""
    _weight_edit("reset", base, [tuned], out, fraction=fraction, how=how, seed=seed, order=order)


@command(app, "half-reset")
def half_reset(
    seed: int = typer.Option(0, "--seed", help="Seed of the choice of modules."),
    base: str = BASE,
    tuned: str = TUNED,
    out: str = OUT,
) -> None:
    """HFT-style half-reset: per block, copy half of the attention, MLP and norm modules back from the base."""
    _weight_edit("half_reset", base, [tuned], out, seed=seed)


@command(app)
def graft(
    data: Path = typer.Option(..., "--data", help='JSONL of {"prompt", "completion"} records.'),
    dev: Path | None = typer.Option(None, "--dev", help="Optional JSONL used only to pick the best epoch."),
    sparsity: float = typer.Option(1e-4, "--sparsity", help="Fraction of the searched entries grafted."),
    include: str | None = typer.Option(None, "--include", help="Regex narrowing the searched matrices."),
    epochs: int = typer.Option(10, "--epochs", help="Mask-update steps (0 = the base patch alone)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate of the mask logits (default: automatic)."),
    limit: int | None = typer.Option(64, "--limit", help="Use the first N records."),
    base: str = BASE,
    tuned: str = TUNED,
    out: str = OUT,
    as_json: bool = JSON,
) -> None:
    """Skill localization: learn a sparse mask of fine-tuned values to graft onto the base; saves mask and model."""
    from safetensors.torch import save_file

    from ftlab.data import load_records
    from ftlab.edits import apply_edit, load_state_dict_into
    from ftlab.edits import graft as graft_mod
    from ftlab.models import save_model, state_dict_fp32

    records, _ = load_records(data, fmt="completion", limit=limit)
    dev_records = load_records(dev, fmt="completion", limit=limit)[0] if dev else None
    base_model, _ = load(base)
    model, tok = load(tuned, base)
    start = time.perf_counter()
    result = graft_mod.localize(
        base_model,
        model,
        tok,
        records,
        sparsity=sparsity,
        include=include,
        epochs=epochs,
        lr=lr,
        dev_records=dev_records,
    )
    edited = apply_edit("graft", state_dict_fp32(base_model), state_dict_fp32(model), mask=result.mask)
    load_state_dict_into(model, edited)
    save_model(model, tok, out)
    save_file({k: m.contiguous() for k, m in result.mask.items()}, str(Path(out) / "graft_mask.safetensors"))
    info = {k: v for k, v in vars(result).items() if k not in ("mask",)}
    info |= {"edit": "graft", "base": base, "tuned": tuned, "seconds": round(time.perf_counter() - start, 2)}
    write_json(Path(out) / "ftlab_edit.json", info)
    summary = {k: info[k] for k in ("n_grafted", "n_selected", "base_loss", "tuned_loss", "graft_loss", "recovered")}
    console(stderr=True).print(f"saved to {out}")
    typer.echo(json.dumps(summary) if as_json else "  ".join(f"{k}={v:.4g}" for k, v in summary.items()))


# ------------------------------------------------------------------ decode-time composites
@command(app)
def tuco(
    base: str = BASE,
    tuned: str = TUNED,
    alpha: float = typer.Option(1.0, "--alpha", help="Scale of the fine-tuning component (0 ≈ base, 1 = tuned)."),
    prompt: list[str] = typer.Option([], "--prompt", help="A prompt (repeatable)."),
    suite: str | None = typer.Option(None, "--suite", help="Take prompts from an evaluation suite."),
    limit: int | None = typer.Option(None, "--limit", help="First N prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    as_json: bool = JSON,
) -> None:
    """Generate with the fine-tuning component scaled by α in every block (TuCo; writes no model)."""
    from ftlab.edits import TuCoModel

    prompts, ids = prompts_from(prompt, suite, limit)
    base_model, _ = load(base)
    model, tok = load(tuned, base)
    generate_and_print(TuCoModel(base_model, model, alpha), tok, prompts, ids, max_new_tokens, as_json)


@command(app)
def eft(
    large_base: str = typer.Option(..., "--large-base", "--base", help="Large pre-trained model."),
    small_tuned: list[str] = typer.Option(..., "--small-tuned", "--tuned", help="Small fine-tune (repeatable)."),
    small_base: str = typer.Option(..., "--small-base", help="Small pre-trained model."),
    weight: list[float] = typer.Option([], "--weight", help="Weight of each small fine-tune's delta (default 1)."),
    prompt: list[str] = typer.Option([], "--prompt", help="A prompt (repeatable)."),
    suite: str | None = typer.Option(None, "--suite", help="Take prompts from an evaluation suite."),
    limit: int | None = typer.Option(None, "--limit", help="First N prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    base_format: str | None = typer.Option(
        None, "--base-format", help="Prompt format of both base models: chat, plain or a template with {prompt}."
    ),
    tuned_format: str = typer.Option("chat", "--tuned-format", help="Prompt format of the small fine-tunes."),
    as_json: bool = JSON,
) -> None:
    """Generate with EFT up-scaling: large base logits + w·(small tuned − small base) logits (writes no model).

    By default every model reads the prompt through the tuned model's chat template; ``--base-format plain`` feeds
    the two base models plain text instead (pre-trained bases were never trained on a chat template).
    """
    from ftlab.edits import EFTModel

    prompts, ids = prompts_from(prompt, suite, limit)
    large, tok_l = load(large_base)
    tuned_pairs = [load(t, small_base) for t in small_tuned]
    small, tok_s = load(small_base)
    try:
        model = EFTModel(
            large,
            [m for m, _ in tuned_pairs],
            small,
            weight=weight or 1.0,
            tokenizers=[tok_l, *[t for _, t in tuned_pairs], tok_s],
            formats=None if base_format is None else [base_format, *[tuned_format] * len(tuned_pairs), base_format],
            tokenizer=tuned_pairs[0][1],
        )
    except ValueError as exc:  # the models do not fit together (vocabularies, weights)
        fail(str(exc))
    generate_and_print(model, tuned_pairs[0][1], prompts, ids, max_new_tokens, as_json)
