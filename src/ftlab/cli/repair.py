"""``ftlab repair``: the best repair of a model trained elsewhere that keeps a forgetting budget.

Example::

    ftlab repair --keep 0.95 --base smollm2-135m-instruct --tuned out/demo/arms/full/model \\
        --target fictional-capitals --retained world-facts --retained general-text --out repaired --json

Evaluates the base and the fine-tune once, then searches the repair family (``ftlab.budget.search``: delta scale by
bisection, then LiNeS and partial reset; merging with ``--merge-with``, a replay-trained fine-tune of the same base)
for the point with the largest target gain whose every retained suite keeps at least ``--keep`` of the base's score.
Every evaluated model is cached in the store as a run named ``repair`` (the base, the fine-tune as arm ``tuned``, each
point as a repair point ``tuned+scale=0.5``), keyed by the inputs (models, with the size and time of their weight
files, suites, ``--limit``), so running the command again evaluates nothing already scored; ``ftlab report RUN``
draws the run. The chosen model is written to ``--out`` (safetensors, atomically), with the search record beside
it as ``ftlab_budget.json``. The table goes to stdout; with
``--json`` the last stdout line is ``{"chosen": {"edit", "value", "target_gain", "retention": {suite: ratio}, ...},
"evaluated": N, "met": true|false, "closest", "points", "path", "run_id", "model"}``; progress goes to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ftlab.cli.common import BASE, JSON, STORE_HELP, TUNED, command, console, fail


def register(app: typer.Typer) -> None:
    command(app, "repair")(repair)


def repair(
    keep: float = typer.Option(..., "--keep", help="Share of every retained suite's base score to keep, in (0, 1]."),
    base: str = BASE,
    tuned: str = TUNED,
    target: list[str] = typer.Option(..., "--target", help="Target suite (repeatable): what the fine-tune taught."),
    retained: list[str] = typer.Option(..., "--retained", help="Retained suite (repeatable): what must be kept."),
    out: Path | None = typer.Option(None, "--out", help="Write the chosen model here (safetensors)."),
    as_json: bool = JSON,
    limit: int | None = typer.Option(None, "--limit", min=1, help="Score N items of each suite."),
    store: Path | None = typer.Option(None, "--store", help=STORE_HELP),
    max_evals: int = typer.Option(8, "--max-evals", min=1, help="Most points the search evaluates (tuned included)."),
    rule: str = typer.Option("ratio", "--rule", help="Budget rule: ratio, or significance (docs/figures.md)."),
    merge_with: str | None = typer.Option(
        None, "--merge-with", help="A replay-trained fine-tune of the same base to merge with (adds a merge point)."
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per batch."),
    confidence: float = typer.Option(0.95, "--confidence", help="Level of the paired tests, in [0.5, 1)."),
) -> None:
    """Find the repair (scale, LiNeS, reset, merge) with the largest target gain that keeps --keep of every retained
    suite; write it to --out."""
    if isinstance(keep, bool) or not 0 < keep <= 1:
        fail(f"--keep: {keep} is not in (0, 1] (the share of each retained score to keep, e.g. 0.95)")
    if rule not in ("ratio", "significance"):
        fail(f"--rule: {rule!r} is not ratio or significance")
    if not 0.5 <= confidence < 1:
        fail(f"--confidence: {confidence} is not in [0.5, 1)")
    overlap = sorted(set(target) & set(retained))
    if overlap:
        fail(f"--retained: {', '.join(overlap)} is also a --target; a suite is one or the other")
    if out is not None and out.exists() and not out.is_dir():
        fail(f"--out: {out} is a file; give a folder (it is replaced by the chosen model)")
    result = run_repair(
        keep, base, tuned, target, retained, out=out, limit=limit, store_path=store, max_evals=max_evals, rule=rule,
        merge_with=merge_with, batch_size=batch_size, confidence=confidence,
    )  # fmt: skip
    print_result(result)
    if as_json:
        typer.echo(json.dumps(result, default=str))


def fingerprint(ref: str) -> dict[str, Any]:
    """What identifies a model reference for the cache: a local folder's absolute path with the size and modification
    time of its weight and config files; a hub id or built-in name as given."""
    path = Path(ref)
    if not path.exists():
        return {"ref": ref}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin", ".pt"))
    return {
        "ref": str(path.resolve()),
        "files": {str(p.relative_to(path)): [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


def run_repair(
    keep: float, base: str, tuned: str, targets: list[str], retained: list[str], *, out: Path | None = None,
    limit: int | None = None, store_path: Path | None = None, max_evals: int = 8, rule: str = "ratio",
    merge_with: str | None = None, batch_size: int = 16, confidence: float = 0.95,
) -> dict[str, Any]:  # fmt: skip
    """The command's work; returns the JSON object it prints."""
    import hashlib

    from ftlab.atomic import write_json
    from ftlab.budget import Point, gain_text, search
    from ftlab.budget_models import ModelPoints, scores_from_store
    from ftlab.evals import evaluate, load_suite
    from ftlab.models import load_model
    from ftlab.recipes.experiment import git_sha, versions
    from ftlab.store import Store

    err = console(stderr=True)
    suites = {ref: load_suite(ref, limit=limit) for ref in dict.fromkeys(targets + retained)}
    t_names = [suites[r].name for r in dict.fromkeys(targets)]
    r_names = [suites[r].name for r in dict.fromkeys(retained) if suites[r].name not in t_names]
    by_name = {s.name: s for s in suites.values()}
    names = t_names + r_names
    db = Store(store_path)
    key = {
        "kind": "repair", "base": fingerprint(base), "tuned": fingerprint(tuned),
        "partner": fingerprint(merge_with) if merge_with else None, "targets": t_names, "retained": r_names,
        "limit": limit,
    }  # fmt: skip
    run_id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    config = {
        **key, "stages": [{"name": "tuned", "targets": t_names}], "eval": {"confidence": confidence, "limit": limit},
        "suite_names": {s: s for s in names}, "suite_floors": {s.name: s.floor for s in suites.values()},
    }  # fmt: skip
    if db.run(run_id) is None or db.run(run_id)["run_id"] != run_id:
        db.start_run(run_id, "repair", str(out.resolve()) if out else "", config, 0, git_sha(), versions())
    db.add_arm(run_id, "base", "base", "none", None, {"model": base})
    db.add_arm(run_id, "tuned", "train", "tuned", None, {"model": tuned})
    err.print(f"repair run [bold]{run_id}[/] (store {db.path})")

    loaded: dict[str, Any] = {}

    def model(which: str) -> Any:
        if which not in loaded:
            ref = {"base": base, "tuned": tuned, "partner": merge_with}[which]
            err.print(f"loading {which}: {ref}")
            loaded[which] = load_model(ref, base=base if which != "base" else None)
        return loaded[which]

    def run(m: Any, tok: Any, arm: str, stage: int) -> None:
        for name in names:
            if db.has_result(run_id, arm, stage, name):
                continue
            result = evaluate(m, tok, by_name[name], batch_size=batch_size)
            db.add_result(run_id, arm, stage, "target" if name in t_names else "retained", result)
            err.print(f"  [dim]{arm}[/] {name}: {result.metric} = {result.score:.3f}")

    base_scores = scores_from_store(db, run_id, "base", 0, names)
    base_fresh = base_scores is None
    if base_scores is None:
        run(*model("base"), "base", 0)
        base_scores = scores_from_store(db, run_id, "base", 0, names)

    class LazyPoints(ModelPoints):
        """Loads the models only when a point is not cached."""

        def __call__(self, point: Point) -> tuple[dict, bool]:
            cached = scores_from_store(db, run_id, point.name("tuned"), 1, names)
            if cached is not None:
                return cached, False
            self._bind()
            return super().__call__(point)

        def _bind(self) -> None:
            if self.model is None:
                self.base_model = model("base")[0]
                self.model, self.tokenizer = model("tuned")
                self.partner_model = model("partner")[0] if merge_with else None

        def save(self, point: Point, where: str | Path) -> Path:
            self._bind()
            return super().save(point, where)

    points = LazyPoints(db, run_id, "tuned", 1, names, None, None, None, run)

    def progress(v: Any) -> None:
        ratios = ", ".join(f"{s} {r:.3f}" for s, r in v.ratios.items() if r is not None)
        gain = gain_text(v.gain, v.gain_significant)
        cached = "" if v.fresh else " [dim](cached)[/]"
        err.print(
            f"[bold]{v.point.name('tuned')}[/]: gain {gain}; {ratios}: {'meets' if v.meets else 'misses'}{cached}"
        )

    floors = {s.name: s.floor for s in suites.values()}
    result = search(keep, base_scores, t_names, r_names, points, floors=floors, confidence=confidence, rule=rule,
                    max_evals=max_evals, partner=merge_with is not None, on_visit=progress)  # fmt: skip
    written = None
    if result.chosen is not None and out is not None:
        written = str(points.save(result.chosen.point, out))
        db.add_artifact(run_id, result.chosen.point.name("tuned"), "model", written)
        record = {"arm": "tuned", **result.to_dict("tuned"), "model": written}
        write_json(out / "ftlab_budget.json", record)  # the search record beside the model, as `ftlab report` reads it
        db.add_artifact(run_id, "tuned", "budget", str((out / "ftlab_budget.json").resolve()))
        err.print(f"wrote {result.chosen.point.name('tuned')} to {written}")
    elif out is not None:
        err.print(f"[red]no point keeps the budget; nothing written to {out}[/]")
    return {
        **result.to_dict("tuned"), "run_id": run_id, "model": written, "base_evaluated": base_fresh,
        "targets": t_names, "retained": r_names,
    }  # fmt: skip


def print_result(result: dict[str, Any]) -> None:
    """The search path as a table on stdout, then the verdict."""
    from rich.table import Table

    from ftlab.budget import GAIN_NOT_SIGNIFICANT, gain_text

    table = Table("#", "point", "target gain", *[f"kept: {s}" for s in result["retained"]], "budget", "cached")
    for i, v in enumerate(result["path"], 1):
        cells = []
        for s in result["retained"]:
            entry = v["suites"].get(s, {})
            cells.append(
                "floor" if entry.get("floor") else "-" if entry.get("ratio") is None else f"{entry['ratio']:.3f}"
            )
        gain = gain_text(v["target_gain"], v.get("gain_significant"))
        table.add_row(
            str(i), v["name"], gain, *cells, "meets" if v["meets"] else "misses", "" if v["fresh"] else "yes"
        )
    out = console()
    out.print(table)
    verdict = result["chosen"] or result["closest"]
    if result["met"]:
        out.print(f"chosen: {verdict['name']} keeps {result['keep']:g} of every retained suite ({result['reason']})")
        if verdict.get("gain_significant") is False:
            out.print(GAIN_NOT_SIGNIFICANT)
    else:
        out.print(f"budget not met: {result['reason']}")
    out.print(f"evaluated {result['evaluated']} of {result['points']} points (the rest from the store)")
