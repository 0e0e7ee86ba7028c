"""``ftlab edit ...`` and ``ftlab analyze ...``: thin commands over ``ftlab.edits`` and ``ftlab.analysis``.

Weight edits write a model folder that transformers loads (atomically, with ``ftlab.models.save_model``) plus
``ftlab_edit.json`` describing the edit; ``tuco`` and ``eft`` are decode-time composites, so their commands print
greedy generations instead. Analyses print a rich table, or with ``--json`` one JSON object as the last stdout line.
Progress goes to stderr.

    ftlab edit lines --base smollm2-135m-instruct --tuned out/full/model --alpha 0.6 --out out/lines06
    ftlab analyze intruders --base smollm2-135m-instruct --tuned out/lora/model --tuned out/full/model --json
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

edit_app = typer.Typer(help="Repair a fine-tune: weight edits that write a new model, and decode-time composites.")
analyze_app = typer.Typer(help="Where a fine-tune lives: intruder dimensions, tuning contribution, per-layer change.")
err = Console(stderr=True)

BASE = typer.Option(..., "--base", help="Base model: HF id, local folder or smollm2-135m-instruct.")
TUNED = typer.Option(..., "--tuned", help="Fine-tuned model: HF id or local folder.")
OUT = typer.Option(..., "--out", help="Folder for the edited model (replaced atomically).")
JSON = typer.Option(False, "--json", help="Print one JSON object (last stdout line) instead of a table.")


# ------------------------------------------------------------------ helpers
def _load(ref: str, base: str | None = None):
    """Model and tokenizer of a reference; a PEFT adapter folder is merged into ``base`` (or its recorded base)."""
    from ftlab.models import load_model

    start = time.perf_counter()
    try:
        adapter = Path(ref) / "adapter_config.json"
        if adapter.exists() and not (Path(ref) / "config.json").exists():
            from peft import PeftModel

            model, tok = load_model(base or json.loads(adapter.read_text())["base_model_name_or_path"])
            model = PeftModel.from_pretrained(model, ref).merge_and_unload().eval()
        else:
            model, tok = load_model(ref)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes a one-line CLI error
        err.print(f"[red]error:[/red] cannot load model {ref!r}: {exc}")
        raise typer.Exit(2) from None
    err.print(f"loaded {ref} in {time.perf_counter() - start:.1f}s")
    return model, tok


def _weight_edit(name: str, base: str, tuned: list[str], out: str, **settings: Any) -> None:
    from ftlab.edits import apply_edit, load_state_dict_into
    from ftlab.models import save_model, state_dict_fp32

    base_model, _ = _load(base)
    base_sd = state_dict_fp32(base_model)
    del base_model
    model, tok = _load(tuned[0], base)
    tuned_sds = [state_dict_fp32(model)] + [state_dict_fp32(_load(t, base)[0]) for t in tuned[1:]]
    start = time.perf_counter()
    try:
        edited = apply_edit(name, base_sd, tuned_sds if name == "merge" else tuned_sds[0], **settings)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    seconds = time.perf_counter() - start
    load_state_dict_into(model, edited)
    save_model(model, tok, out)
    info = {"edit": name, "base": base, "tuned": tuned, "settings": _jsonable(settings), "seconds": round(seconds, 3)}
    _write_json(Path(out) / "ftlab_edit.json", info)
    err.print(f"{name}: edited {len(edited)} tensors in {seconds:.2f}s")
    typer.echo(f"saved to {out}")


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def _write_json(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def _prompts(prompt: list[str], suite: str | None, limit: int | None) -> tuple[list[str], list[str]]:
    """(prompts, ids) from --prompt values or a suite."""
    if suite:
        from ftlab.evals import load_suite

        try:
            items = load_suite(suite, limit=limit).items
        except (ValueError, FileNotFoundError) as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        return [it["prompt"] for it in items], [str(it["id"]) for it in items]
    if not prompt:
        err.print("[red]error:[/red] give --prompt (repeatable) or --suite")
        raise typer.Exit(2)
    prompts = prompt[:limit] if limit else prompt
    return prompts, [str(i) for i in range(len(prompts))]


def _generate_and_print(model: Any, tok: Any, prompts: list[str], ids: list[str], max_new: int, as_json: bool) -> None:
    from ftlab.evals.generation import generate

    outs = generate(model, tok, prompts, batch_size=4, max_new_tokens=max_new)
    rows = [{"id": i, "prompt": p, "output": o} for i, p, o in zip(ids, prompts, outs, strict=True)]
    if as_json:
        typer.echo(json.dumps({"outputs": rows}))
        return
    table = Table("id", "prompt", "output")
    for r in rows:
        table.add_row(r["id"], r["prompt"][:60], r["output"])
    Console().print(table)


# ------------------------------------------------------------------ weight edits
@edit_app.command()
def scale(
    base: str = BASE,
    tuned: str = TUNED,
    out: str = OUT,
    factor: float = typer.Option(
        ..., "--factor", help="θ0 + factor·(θ_ft − θ0): 0 = base, 1 = tuned, >1 extrapolates."
    ),
) -> None:
    """Scale the fine-tuning delta in weight space (interpolate or extrapolate between base and tuned)."""
    _weight_edit("scale", base, [tuned], out, factor=factor)


@edit_app.command()
def lines(
    base: str = BASE,
    tuned: str = TUNED,
    out: str = OUT,
    alpha: float = typer.Option(..., "--alpha", help="Scale of the first block and of non-block keys."),
    beta: float | None = typer.Option(None, "--beta", help="Extra scale reached at the last block (default 1 − α)."),
    non_block_scale: float | None = typer.Option(
        None, "--non-block-scale", help="Scale of embeddings, final norm, head (default α)."
    ),
) -> None:
    """LiNeS: scale the delta of block ℓ by α + β·ℓ/(L−1), shallow blocks nearest the base."""
    _weight_edit("lines", base, [tuned], out, alpha=alpha, beta=beta, non_block_scale=non_block_scale)


@edit_app.command()
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


@edit_app.command()
def reset(
    base: str = BASE,
    tuned: str = TUNED,
    out: str = OUT,
    fraction: float = typer.Option(..., "--fraction", help="Share of parameters copied back from the base."),
    how: str = typer.Option("random", "--how", help="random, smallest (smallest change first) or layers."),
    seed: int = typer.Option(0, "--seed", help="Seed for --how random."),
    order: str = typer.Option("bottom", "--order", help="For --how layers: from the input (bottom) or output (top)."),
) -> None:
    """Reset a fraction of the parameters to their base values."""
    _weight_edit("reset", base, [tuned], out, fraction=fraction, how=how, seed=seed, order=order)


@edit_app.command("half-reset")
def half_reset(
    base: str = BASE,
    tuned: str = TUNED,
    out: str = OUT,
    seed: int = typer.Option(0, "--seed", help="Seed of the choice of modules."),
) -> None:
    """HFT-style half-reset: per block, copy half of the attention, MLP and norm modules back from the base."""
    _weight_edit("half_reset", base, [tuned], out, seed=seed)


@edit_app.command()
def graft(
    base: str = BASE,
    tuned: str = TUNED,
    out: str = OUT,
    data: Path = typer.Option(..., "--data", help='JSONL of {"prompt", "completion"} records.'),
    dev: Path | None = typer.Option(None, "--dev", help="Optional JSONL used only to pick the best epoch."),
    sparsity: float = typer.Option(1e-4, "--sparsity", help="Fraction of the searched entries grafted."),
    include: str | None = typer.Option(None, "--include", help="Regex narrowing the searched matrices."),
    epochs: int = typer.Option(10, "--epochs", help="Mask-update steps (0 = the base patch alone)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate of the mask logits (default: automatic)."),
    limit: int | None = typer.Option(64, "--limit", help="Use the first N records."),
    as_json: bool = JSON,
) -> None:
    """Skill localization: learn a sparse mask of fine-tuned values to graft onto the base; saves mask and model."""
    from safetensors.torch import save_file

    from ftlab.data import load_records
    from ftlab.edits import apply_edit, load_state_dict_into
    from ftlab.edits import graft as graft_mod
    from ftlab.models import save_model, state_dict_fp32

    try:
        records, _ = load_records(data, fmt="completion", limit=limit)
        dev_records = load_records(dev, fmt="completion", limit=limit)[0] if dev else None
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    base_model, _ = _load(base)
    model, tok = _load(tuned, base)
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
    _write_json(Path(out) / "ftlab_edit.json", info)
    summary = {k: info[k] for k in ("n_grafted", "n_selected", "base_loss", "tuned_loss", "graft_loss", "recovered")}
    err.print(f"saved to {out}")
    typer.echo(json.dumps(summary) if as_json else "  ".join(f"{k}={v:.4g}" for k, v in summary.items()))


# ------------------------------------------------------------------ decode-time composites
@edit_app.command()
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

    prompts, ids = _prompts(prompt, suite, limit)
    base_model, _ = _load(base)
    model, tok = _load(tuned, base)
    _generate_and_print(TuCoModel(base_model, model, alpha), tok, prompts, ids, max_new_tokens, as_json)


@edit_app.command()
def eft(
    large_base: str = typer.Option(..., "--large-base", "--base", help="Large pre-trained model."),
    small_tuned: list[str] = typer.Option(..., "--small-tuned", "--tuned", help="Small fine-tune (repeatable)."),
    small_base: str = typer.Option(..., "--small-base", help="Small pre-trained model."),
    weight: list[float] = typer.Option([], "--weight", help="Weight of each small fine-tune's delta (default 1)."),
    prompt: list[str] = typer.Option([], "--prompt", help="A prompt (repeatable)."),
    suite: str | None = typer.Option(None, "--suite", help="Take prompts from an evaluation suite."),
    limit: int | None = typer.Option(None, "--limit", help="First N prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    as_json: bool = JSON,
) -> None:
    """Generate with EFT up-scaling: large base logits + w·(small tuned − small base) logits (writes no model)."""
    from ftlab.edits import EFTModel

    prompts, ids = _prompts(prompt, suite, limit)
    large, tok_l = _load(large_base)
    tuned_pairs = [_load(t, small_base) for t in small_tuned]
    small, tok_s = _load(small_base)
    try:
        model = EFTModel(
            large,
            [m for m, _ in tuned_pairs],
            small,
            weight=weight or 1.0,
            tokenizers=[tok_l, *[t for _, t in tuned_pairs], tok_s],
        )
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    _generate_and_print(model, tuned_pairs[0][1], prompts, ids, max_new_tokens, as_json)


# ------------------------------------------------------------------ analyses
@analyze_app.command()
def intruders(
    base: str = BASE,
    tuned: list[str] = typer.Option(..., "--tuned", help="Fine-tuned model (repeat to compare, e.g. LoRA vs full)."),
    k: int = typer.Option(10, "--k", help="Top fine-tuned singular vectors examined per matrix."),
    eps: float = typer.Option(0.5, "--eps", help="Similarity threshold below which a vector is an intruder."),
    as_json: bool = JSON,
) -> None:
    """Intruder dimensions per fine-tune: count (authors' definition) and energy share, per layer and module."""
    from ftlab.analysis import compare_intruders
    from ftlab.models import state_dict_fp32

    base_sd = state_dict_fp32(_load(base)[0])
    tuned_sds = {t: state_dict_fp32(_load(t, base)[0]) for t in tuned}
    err.print(f"SVD of {len(tuned_sds) + 1} x block matrices ...")
    res = compare_intruders(base_sd, tuned_sds, k=k, eps=eps)
    if as_json:
        typer.echo(json.dumps({"base": base, "k": k, "eps": eps, "tuned": res}))
        return
    table = Table("", *tuned, title=f"Intruder dimensions (k={k}, ε={eps})")
    table.add_row("total", *[str(r["total"]) for r in res.values()])
    table.add_row("energy share", *[f"{r['energy_share']:.2%}" for r in res.values()])
    table.add_row("matrices", *[str(r["n_matrices"]) for r in res.values()])
    for m in next(iter(res.values()))["per_module"]:
        table.add_row(m, *[str(r["per_module"][m]) for r in res.values()])
    for ell in range(len(next(iter(res.values()))["per_layer"])):
        table.add_row(f"layer {ell}", *[str(r["per_layer"][ell]) for r in res.values()])
    Console().print(table)
    err.print(f"SVD time {next(iter(res.values()))['seconds']:.1f}s")


@analyze_app.command()
def layers(base: str = BASE, tuned: str = TUNED, as_json: bool = JSON) -> None:
    """Per-layer and per-module change: norm of the delta, relative to the base, and share of entries changed."""
    from ftlab.analysis import layer_change
    from ftlab.models import state_dict_fp32

    res = layer_change(state_dict_fp32(_load(base)[0]), state_dict_fp32(_load(tuned, base)[0]))
    if as_json:
        typer.echo(json.dumps({"base": base, "tuned": tuned, **res}))
        return
    table = Table("group", "‖Δ‖", "‖Δ‖/‖θ0‖", "changed", title="Weight change by layer and module")
    rows = [("total", res["total"])] + [(f"layer {r['layer']}", r) for r in res["per_layer"]]
    rows += list(res["per_module"].items()) + list(res["non_block"].items())
    for name, r in rows:
        rel = "-" if r["relative"] is None else f"{r['relative']:.4g}"
        table.add_row(name, f"{r['delta_norm']:.4g}", rel, f"{r['changed']:.1%}")
    Console().print(table)


@analyze_app.command("tuco")
def tuco_analysis(
    base: str = BASE,
    tuned: str = TUNED,
    suite: str | None = typer.Option(None, "--suite", help="Evaluation suite whose prompts are measured."),
    prompt: list[str] = typer.Option([], "--prompt", help="A prompt (repeatable), instead of a suite."),
    limit: int | None = typer.Option(20, "--limit", help="First N prompts."),
    norm: str = typer.Option("l1", "--norm", help="l1 (default) or l2."),
    raw: bool = typer.Option(False, "--raw", help="Feed prompts as plain text, without the chat template."),
    as_json: bool = JSON,
) -> None:
    """Tuning contribution: size of the fine-tuning component relative to the pre-trained one, per prompt and layer."""
    from ftlab.analysis import tuning_contribution

    prompts, ids = _prompts(prompt, suite, limit)
    base_model, _ = _load(base)
    model, tok = _load(tuned, base)
    try:
        res = tuning_contribution(base_model, model, tok, prompts, norm=norm, chat=not raw, ids=ids)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps({"base": base, "tuned": tuned, "suite": suite, **res}))
        return
    table = Table("id", "TuCo", "‖FTC‖", "‖PTC‖", "prompt", title=f"Tuning contribution ({norm})")
    for r, p in zip(res["prompts"], prompts, strict=True):
        table.add_row(r["id"], f"{r['tuco']:.3f}", f"{r['ftc_norm']:.4g}", f"{r['ptc_norm']:.4g}", p[:50])
    Console().print(table)
    per_layer = " ".join(f"{x:.2f}" for x in res["per_layer_mean"])
    Console().print(f"mean TuCo {res['mean_tuco']:.3f}; per layer: {per_layer}")
