"""``ftlab edit ...``: repairs of a fine-tune, argument parsing and printing over ``ftlab.edits``.

Weight edits write a model folder that transformers loads (atomically) plus ``ftlab_edit.json`` describing the
edit. When every model is a local safetensors checkpoint (or a LoRA adapter folder on one) the edit streams shard by
shard (``ftlab.edits.stream``: bounded memory, the checkpoint's dtype kept); otherwise the models are loaded and the
edit runs in memory. ``tuco`` and ``eft`` are decode-time composites, so their commands print greedy generations
instead. Every model argument also takes a PEFT adapter folder (put on ``--base``).

    ftlab edit lines --base smollm2-135m-instruct --tuned out/full/model --alpha 0.6 --out out/lines06
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from ftlab.atomic import write_json
from ftlab.cli.common import (
    ATTN,
    BASE,
    DEVICE_MAP,
    DTYPE,
    JSON,
    QUANTIZATION,
    REVISION,
    TRUST_REMOTE_CODE,
    TUNED,
    command,
    console,
    fail,
    generate_and_print,
    load,
    load_settings,
    prompts_from,
)
from ftlab.errors import InputError

app = typer.Typer(help="Repair a fine-tune: weight edits that write a new model, and decode-time composites.")
OUT = typer.Option(..., "--out", help="Folder for the edited model (replaced atomically).")


def check_out(out: str | Path) -> None:
    """``--out`` must be a folder or not exist yet: an existing file is never replaced by a model folder."""
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out: {out} is a file; give a folder for the edited model (it is created)")


def check_edit_args(name: str, tuned: list[str], out: str | Path, settings: dict[str, Any]) -> None:
    """Every argument of a weight edit that can be checked before a model loads: ``--out``, the number of
    ``--tuned`` models, finite numbers, and the values the edit itself refuses (a fraction outside [0, 1], ...)."""
    import math

    from ftlab.recipes.experiment import check_edit_values

    check_out(out)
    if name == "merge" and len(tuned) < 2:
        raise InputError("--tuned: merge needs two or more fine-tunes of the base (repeat --tuned); got one")
    for key, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"--{key.replace('_', '-')}: {value} is not a finite number")
    try:
        check_edit_values(name, settings)
    except ValueError as exc:
        raise InputError(f"{name}: {exc}") from None


def _weight_edit(name: str, base: str, tuned: list[str], out: str, **settings: Any) -> None:
    """Run a weight edit: streamed over safetensors shards when every model is a local safetensors checkpoint (or a
    LoRA adapter on one), else on models loaded in memory."""
    from ftlab.edits.stream import open_checkpoint

    check_edit_args(name, tuned, out, {} if name == "graft" else settings)  # a mask file is checked as it is read
    sources = [open_checkpoint(base)] + [open_checkpoint(t, base) for t in tuned]
    jsonable = {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    info = {"edit": name, "base": base, "tuned": tuned, "settings": jsonable}
    if all(s is not None for s in sources):
        _streamed_edit(name, sources, out, info, **settings)
        return
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
    write_json(Path(out) / "ftlab_edit.json", info | {"seconds": round(seconds, 3), "streamed": False})
    console(stderr=True).print(f"{name}: edited {len(edited)} tensors in {seconds:.2f}s")
    typer.echo(f"saved to {out}")


def _streamed_edit(name: str, sources: list[Any], out: str, info: dict[str, Any], **settings: Any) -> None:
    """``stream_edit`` with the record written into the folder before it appears; bad settings are input errors."""
    from ftlab.edits.stream import stream_edit

    start = time.perf_counter()

    def finish(tmp: Path) -> None:
        seconds = round(time.perf_counter() - start, 3)
        write_json(tmp / "ftlab_edit.json", info | {"seconds": seconds, "streamed": True})

    try:
        done = stream_edit(name, sources[0], sources[1:], out, finish=finish, **settings)
    except ValueError as exc:  # a setting out of range, or checkpoints that do not fit together
        raise InputError(str(exc)) from None
    console(stderr=True).print(f"{name}: streamed {done['tensors']} tensors in {done['seconds']:.2f}s")
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
    method: str = typer.Option("task_arithmetic", "--method", help="task_arithmetic, ties, dare or dare_ties."),
    lam: float | None = typer.Option(
        None, "--lam", help="Coefficient on the merged delta (default 1/T; TIES and DARE-TIES 1)."
    ),
    density: float = typer.Option(
        0.2, "--density", help="TIES: fraction of each delta kept by magnitude; DARE: chance of keeping an entry."
    ),
    lines_alpha: float | None = typer.Option(None, "--lines-alpha", help="LiNeS α (default ‖Σ τ‖₁/‖τ_MTL‖₁/T)."),
    lines_beta: float | None = typer.Option(None, "--lines-beta", help="LiNeS β; switches LiNeS on."),
    seed: int = typer.Option(0, "--seed", help="DARE: seed of the random drops."),
) -> None:
    """Merge fine-tunes of one base: task arithmetic, TIES or DARE, optionally with LiNeS on the merged delta."""
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
        seed=seed,
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
    data: Path | None = typer.Option(None, "--data", help='JSONL of {"prompt", "completion"} records.'),
    mask: Path | None = typer.Option(
        None, "--mask", help="Apply a saved graft_mask.safetensors instead of learning one (no --data then)."
    ),
    dev: Path | None = typer.Option(None, "--dev", help="Optional JSONL used only to pick the best epoch."),
    sparsity: float = typer.Option(
        1e-4, "--sparsity", min=0.0, max=1.0, help="Fraction of the searched entries grafted."
    ),
    include: str | None = typer.Option(None, "--include", help="Regex narrowing the searched matrices."),
    epochs: int = typer.Option(10, "--epochs", min=0, help="Mask-update steps (0 = the base patch alone)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate of the mask logits (default: automatic)."),
    limit: int | None = typer.Option(64, "--limit", min=1, help="Use the first N records."),
    base: str = BASE,
    tuned: str = TUNED,
    out: str = OUT,
    as_json: bool = JSON,
) -> None:
    """Skill localization: learn a sparse mask of fine-tuned values to graft onto the base; saves mask and model.

    With ``--mask`` a saved mask is applied instead (streamed shard by shard when the models are safetensors
    checkpoints); the grafted model is written the same way after a mask is learned.
    """
    from safetensors.torch import save_file

    from ftlab.data import load_records
    from ftlab.edits import apply_edit, load_state_dict_into
    from ftlab.edits import graft as graft_mod
    from ftlab.edits.stream import open_checkpoint
    from ftlab.models import save_model, state_dict_fp32

    if mask is not None:
        if not mask.is_file():
            raise InputError(f"--mask: {mask} is not a file (give the graft_mask.safetensors of an earlier graft)")
        _weight_edit("graft", base, [tuned], out, mask=str(mask))
        return
    if data is None:
        raise InputError("--data: give the training records to learn a mask from, or --mask to apply a saved one")
    check_out(out)
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
    info = {k: v for k, v in vars(result).items() if k not in ("mask",)}
    info |= {"edit": "graft", "base": base, "tuned": tuned, "seconds": round(time.perf_counter() - start, 2)}

    def finish(folder: Path) -> None:
        save_file({k: m.contiguous() for k, m in result.mask.items()}, str(folder / "graft_mask.safetensors"))
        write_json(folder / "ftlab_edit.json", info)

    sources = [open_checkpoint(base), open_checkpoint(tuned, base)]
    if all(c is not None for c in sources):  # the search is done: free the models, stream the grafted weights
        from ftlab.edits.stream import stream_edit

        del base_model, model
        stream_edit("graft", sources[0], sources[1:], out, finish=finish, mask=result.mask)
    else:
        edited = apply_edit("graft", state_dict_fp32(base_model), state_dict_fp32(model), mask=result.mask)
        load_state_dict_into(model, edited)
        save_model(model, tok, out)
        finish(Path(out))
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
    limit: int | None = typer.Option(None, "--limit", min=1, help="First N prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    as_json: bool = JSON,
    dtype: str | None = DTYPE,
    device_map: str | None = DEVICE_MAP,
    attn: str | None = ATTN,
    revision: str | None = REVISION,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    quantization: str | None = QUANTIZATION,
) -> None:
    """Generate with the fine-tuning component scaled by α in every block (TuCo; writes no model)."""
    from ftlab.edits import TuCoModel

    prompts, ids = prompts_from(prompt, suite, limit)
    settings = load_settings(dtype, device_map, attn, revision, trust_remote_code, quantization)
    base_model, _ = load(base, settings=settings)
    model, tok = load(tuned, base, settings)
    generate_and_print(TuCoModel(base_model, model, alpha), tok, prompts, ids, max_new_tokens, as_json)


@command(app)
def eft(
    large_base: str = typer.Option(..., "--large-base", "--base", help="Large pre-trained model."),
    small_tuned: list[str] = typer.Option(..., "--small-tuned", "--tuned", help="Small fine-tune (repeatable)."),
    small_base: str = typer.Option(..., "--small-base", help="Small pre-trained model."),
    weight: list[float] = typer.Option([], "--weight", help="Weight of each small fine-tune's delta (default 1)."),
    prompt: list[str] = typer.Option([], "--prompt", help="A prompt (repeatable)."),
    suite: str | None = typer.Option(None, "--suite", help="Take prompts from an evaluation suite."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="First N prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    base_format: str | None = typer.Option(
        None, "--base-format", help="Prompt format of both base models: chat, plain or a template with {prompt}."
    ),
    tuned_format: str = typer.Option("chat", "--tuned-format", help="Prompt format of the small fine-tunes."),
    as_json: bool = JSON,
    dtype: str | None = DTYPE,
    device_map: str | None = DEVICE_MAP,
    attn: str | None = ATTN,
    revision: str | None = REVISION,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    quantization: str | None = QUANTIZATION,
) -> None:
    """Generate with EFT up-scaling: large base logits + w·(small tuned − small base) logits (writes no model).

    By default every model reads the prompt through the tuned model's chat template; ``--base-format plain`` feeds
    the two base models plain text instead (pre-trained bases were never trained on a chat template).
    """
    from ftlab.edits import EFTModel

    prompts, ids = prompts_from(prompt, suite, limit)
    settings = load_settings(dtype, device_map, attn, revision, trust_remote_code, quantization)
    large, tok_l = load(large_base, settings=settings)
    tuned_pairs = [load(t, small_base, settings) for t in small_tuned]
    small, tok_s = load(small_base, settings=settings)
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
