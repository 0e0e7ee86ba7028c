"""``ftlab analyze ...``: where a fine-tune lives, argument parsing and printing over ``ftlab.analysis``.

Analyses print a rich table, or with ``--json`` one JSON object as the last stdout line; progress goes to stderr.

    ftlab analyze intruders --base smollm2-135m-instruct --tuned out/lora/model --tuned out/full/model --json
"""

from __future__ import annotations

import json

import typer
from rich.table import Table

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
    load,
    load_settings,
    prompts_from,
)
from ftlab.errors import InputError

app = typer.Typer(help="Where a fine-tune lives: intruder dimensions, tuning contribution, per-layer change.")


def weight_settings(*options: object) -> object:
    """Load settings for an analysis of the weights themselves: quantized weights are integers, not comparable."""
    settings = load_settings(*options)
    if settings.quantized:
        raise InputError(
            "--quantization: this analysis compares weights; load them unquantized (--dtype bf16 saves memory)"
        )
    return settings


@command(app)
def intruders(
    base: str = BASE,
    tuned: list[str] = typer.Option(..., "--tuned", help="Fine-tuned model (repeat to compare, e.g. LoRA vs full)."),
    k: int = typer.Option(10, "--k", min=1, help="Top fine-tuned singular vectors examined per matrix."),
    eps: float = typer.Option(0.5, "--eps", help="Similarity threshold below which a vector is an intruder."),
    as_json: bool = JSON,
    dtype: str | None = DTYPE,
    device_map: str | None = DEVICE_MAP,
    attn: str | None = ATTN,
    revision: str | None = REVISION,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    quantization: str | None = QUANTIZATION,
) -> None:
    """Intruder dimensions per fine-tune: count (authors' definition) and energy share, per layer and module."""
    from ftlab.analysis import compare_intruders
    from ftlab.models import state_dict_fp32

    settings = weight_settings(dtype, device_map, attn, revision, trust_remote_code, quantization)
    base_sd = state_dict_fp32(load(base, settings=settings)[0])
    tuned_sds = {t: state_dict_fp32(load(t, base, settings)[0]) for t in tuned}
    console(stderr=True).print(f"SVD of {len(tuned_sds) + 1} x block matrices ...")
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
    console().print(table)
    console(stderr=True).print(f"SVD time {next(iter(res.values()))['seconds']:.1f}s")


@command(app)
def layers(
    base: str = BASE,
    tuned: str = TUNED,
    as_json: bool = JSON,
    dtype: str | None = DTYPE,
    device_map: str | None = DEVICE_MAP,
    attn: str | None = ATTN,
    revision: str | None = REVISION,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    quantization: str | None = QUANTIZATION,
) -> None:
    """Per-layer and per-module change: norm of the delta, relative to the base, and share of entries changed."""
    from ftlab.analysis import layer_change
    from ftlab.models import state_dict_fp32

    settings = weight_settings(dtype, device_map, attn, revision, trust_remote_code, quantization)
    res = layer_change(
        state_dict_fp32(load(base, settings=settings)[0]), state_dict_fp32(load(tuned, base, settings)[0])
    )
    if as_json:
        typer.echo(json.dumps({"base": base, "tuned": tuned, **res}))
        return
    table = Table("group", "‖Δ‖", "‖Δ‖/‖θ0‖", "changed", title="Weight change by layer and module")
    rows = [("total", res["total"])] + [(f"layer {r['layer']}", r) for r in res["per_layer"]]
    rows += list(res["per_module"].items()) + list(res["non_block"].items())
    for name, r in rows:
        rel = "-" if r["relative"] is None else f"{r['relative']:.4g}"
        table.add_row(name, f"{r['delta_norm']:.4g}", rel, f"{r['changed']:.1%}")
    console().print(table)


@command(app, "tuco")
def tuco_analysis(
    base: str = BASE,
    tuned: str = TUNED,
    suite: str | None = typer.Option(None, "--suite", help="Evaluation suite whose prompts are measured."),
    prompt: list[str] = typer.Option([], "--prompt", help="A prompt (repeatable), instead of a suite."),
    limit: int | None = typer.Option(20, "--limit", min=1, help="First N prompts."),
    norm: str = typer.Option("l1", "--norm", help="l1 (default) or l2."),
    raw: bool = typer.Option(False, "--raw", help="Feed prompts as plain text, without the chat template."),
    as_json: bool = JSON,
    dtype: str | None = DTYPE,
    device_map: str | None = DEVICE_MAP,
    attn: str | None = ATTN,
    revision: str | None = REVISION,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    quantization: str | None = QUANTIZATION,
) -> None:
    """Tuning contribution: size of the fine-tuning component relative to the pre-trained one, per prompt and layer."""
    from ftlab.analysis import tuning_contribution

    prompts, ids = prompts_from(prompt, suite, limit)
    settings = load_settings(dtype, device_map, attn, revision, trust_remote_code, quantization)
    base_model, _ = load(base, settings=settings)
    model, tok = load(tuned, base, settings)
    try:
        res = tuning_contribution(base_model, model, tok, prompts, norm=norm, chat=not raw, ids=ids)
    except ValueError as exc:  # an unknown norm, or models that do not fit together
        raise InputError(str(exc)) from None
    if as_json:
        typer.echo(json.dumps({"base": base, "tuned": tuned, "suite": suite, **res}))
        return
    table = Table("id", "TuCo", "‖FTC‖", "‖PTC‖", "prompt", title=f"Tuning contribution ({norm})")
    for r, p in zip(res["prompts"], prompts, strict=True):
        table.add_row(r["id"], f"{r['tuco']:.3f}", f"{r['ftc_norm']:.4g}", f"{r['ptc_norm']:.4g}", p[:50])
    console().print(table)
    per_layer = " ".join(f"{x:.2f}" for x in res["per_layer_mean"])
    console().print(f"mean TuCo {res['mean_tuco']:.3f}; per layer: {per_layer}")
