"""The run report: tables, forgetting figures, Pareto front, heat map, forgotten items, escaping, CLI commands."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.report.summary import (
    arm_continual_metrics,
    beats_reference,
    front_arms,
    load_summary,
    pareto_front,
    worst_forgotten,
)
from ftlab.store import Store

CHROMIUM = Path("/usr/bin/chromium")
XSS = "<script>alert(1)</script>"


@dataclass
class Item:
    item_id: str
    prompt: str
    output: str
    reference: str
    score: float


@dataclass
class Result:
    suite: str
    score: float
    metric: str = "exact_match"
    n: int = 3
    stderr: float = 0.01
    higher_is_better: bool = True
    items: list[Item] = field(default_factory=list)


# Scores per (arm, stage): suites t1, t2 (targets of stages 1 and 2), r1 (retained) and ppl (retained perplexity).
SCORES = {
    ("base", 0): {"t1": 0.2, "t2": 0.1, "r1": 0.8, "ppl": 10.0},
    ("full", 1): {"t1": 0.9, "t2": 0.15, "r1": 0.6, "ppl": 12.0},
    ("full", 2): {"t1": 0.5, "t2": 0.9, "r1": 0.4, "ppl": 15.0},
    ("lora", 1): {"t1": 0.7, "t2": 0.1, "r1": 0.78, "ppl": 10.2},
    ("lora", 2): {"t1": 0.6, "t2": 0.6, "r1": 0.76, "ppl": 10.5},
    ("full+scale=0.5", 2): {"t1": 0.6, "t2": 0.85, "r1": 0.6, "ppl": 10.0 / 0.75},
}
# Retained items of r1: full forgets i2 completely (worst) and i1 half, and answers i1 with a script tag.
R1_ITEMS = {
    "base": [("i1", "2+2?", "4", 1.0), ("i2", "Capital of France?", "Paris", 1.0), ("i3", "<b>bold</b>?", "no", 0.0)],
    "full": [("i1", "2+2?", XSS, 0.5), ("i2", "Capital of France?", "Lyon", 0.0), ("i3", "<b>bold</b>?", "yes", 1.0)],
    "lora": [("i1", "2+2?", "4", 1.0), ("i2", "Capital of France?", "Paris", 1.0), ("i3", "<b>bold</b>?", "no", 0.0)],
}


def make_run(store: Store, run_id: str, out_dir: Path, n_stages: int = 2, t2_full: float = 0.9) -> None:
    """A synthetic run: base + full + lora (+ the repair point full+scale=0.5 at the final stage)."""
    # Suites named by path in the config are stored under their file stem, as load_suite names them.
    stages = [{"name": "capitals", "targets": ["suites/t1.jsonl"]}, {"name": "rivers", "targets": ["t2"]}][:n_stages]
    config = {"name": f"demo-{run_id}", "stages": stages, "retained": ["r1", "/data/ppl.txt"]}
    store.start_run(run_id, f"demo-{run_id}", str(out_dir), config, seed=0, git_sha="abc", versions={})
    store.add_arm(run_id, "base", "base", "none", None, {})
    store.add_arm(run_id, "full", "train", "full", None, {})
    store.add_arm(run_id, "lora", "train", "lora", None, {})
    store.add_arm(run_id, "full+scale=0.5", "edit", "scale", "full", {"alpha": 0.5})
    roles = {"t1": "target", "t2": "target", "r1": "retained", "ppl": "retained"}
    if n_stages == 1:
        roles["t2"] = "retained"
    for (arm, stage), scores in SCORES.items():
        if stage > n_stages or (arm == "full+scale=0.5" and stage != n_stages):
            continue
        if arm != "base" and "+" not in arm:
            store.finish_stage(run_id, arm, stage, stages[stage - 1]["name"], train_seconds=10.0, trainable_params=99)
        final = stage == n_stages or arm == "base"
        for suite, score in scores.items():
            if (arm, stage, suite) == ("full", 2, "t2"):
                score = t2_full
            rows = R1_ITEMS.get(arm, [])
            items = [Item(*row[:2], row[2], "4" if row[0] == "i1" else "Paris", row[3]) for row in rows]
            ppl_items = [Item("p1", "text", "", "", {"base": 2.0, "full": 3.0}.get(arm, 1.5))]
            result = Result(
                suite, score, higher_is_better=suite != "ppl", metric="perplexity" if suite == "ppl" else "em"
            )
            if final and suite == "r1":
                result.items = items
            if final and suite == "ppl":
                result.items = ppl_items
            store.add_result(run_id, arm, stage, roles[suite], result)
    store.finish_run(run_id)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One two-stage run and one one-stage run, each rendered once."""
    from ftlab.report.html import render_report

    tmp = tmp_path_factory.mktemp("report")
    store = Store(tmp / "ftlab.db")
    make_run(store, "run2stage", tmp / "out2")
    make_run(store, "run1stage", tmp / "out1", n_stages=1)
    two = render_report(store, "run2", tmp / "two" / "r.html")
    one = render_report(store, "run1", tmp / "one" / "r.html")
    return {"store": store, "tmp": tmp, "two": two, "one": one, "html2": two.read_text(), "html1": one.read_text()}


def table_cells(page: str, table_id: str) -> list[list[str]]:
    """The text of every cell of one table, row by row."""
    match = re.search(rf'<table id="{re.escape(table_id)}">(.*?)</table>', page, re.S)
    assert match, f"no table {table_id}"
    rows = re.findall(r"<tr>(.*?)</tr>", match.group(1), re.S)
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r, re.S) for r in rows]
    return [[unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in row] for row in cells]


def test_pareto_front_on_hand_made_points():
    points = [(1.0, 1.0), (2.0, 0.0), (0.5, 0.5), (2.0, 0.0), (1.0, 0.5), (0.0, 2.0)]
    assert pareto_front(points) == [True, True, False, True, False, True]
    assert pareto_front([]) == []
    assert pareto_front([(0.3, 0.3)]) == [True]


def test_forgetting_figures_and_front(report):
    s = load_summary(report["store"], "run2stage")
    by_arm = {p.arm: p for p in s.points}
    assert by_arm["full"].gain == pytest.approx(0.55)  # mean(0.5 - 0.2, 0.9 - 0.1)
    assert by_arm["full"].retained == pytest.approx({"r1": 0.5, "ppl": 10 / 15})  # perplexity: before / after
    assert by_arm["lora"].retention == pytest.approx((0.95 + 10 / 10.5) / 2)
    assert by_arm["full+scale=0.5"].stage == 2 and by_arm["full+scale=0.5"].gain == pytest.approx(0.575)
    assert front_arms(s) == ["full+scale=0.5", "lora"]  # full is dominated by its own repair point
    assert [(p.arm, ref.arm) for p, ref in beats_reference(s)] == [("full+scale=0.5", "full")]
    m = arm_continual_metrics(s, "full")  # R = [[.2, .1], [.9, .15], [.5, .9]]
    assert m == pytest.approx({"acc": 0.7, "bwt": -0.4, "fwt": 0.05, "forgetting": 0.4})


def test_stage_tables_hold_the_right_numbers(report):
    page = report["html2"]
    stage1 = table_cells(page, "stage-1")
    assert [r[0] for r in stage1[1:]] == ["base (stage 0)", "full", "lora"]  # base first, no repair point yet
    assert stage1[0][1:] == ["t1 target", "t2 target", "r1 retained", "ppl retained"]
    assert stage1[1][1:] == ["0.200", "0.100", "0.800", "10.000"]
    assert stage1[2][1:] == ["0.900", "0.150", "0.600", "12.000"]
    stage2 = table_cells(page, "stage-2")
    assert [r[0] for r in stage2[1:]] == ["base (stage 0)", "full", "full+scale=0.5", "lora"]
    assert stage2[3][1:] == ["0.600", "0.850", "0.600", "13.333"]
    summary = {r[0]: r for r in table_cells(page, "summary-table")[1:]}
    assert summary["full"][4:7] == ["+0.550", "0.583", "0.500"]
    assert summary["lora"][-3] == "✓" and summary["full"][-3] == ""


def test_pareto_text_names_the_winner(report):
    page = report["html2"]
    beats = re.search(r'<p id="beats">(.*?)</p>', page, re.S).group(1)
    assert "full+scale=0.5" in beats and "vs full" in beats and "lora" not in beats
    front = re.search(r'<p id="front">(.*?)</p>', page, re.S).group(1)
    assert front == "Pareto front: full+scale=0.5, lora."
    assert (report["two"].parent / "r_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heat_map_only_for_continual_runs(report):
    assert 'id="img-heatmap"' in report["html2"]
    assert (report["two"].parent / "r_heatmap.png").is_file()
    metrics = {r[0]: r[1:] for r in table_cells(report["html2"], "continual-metrics")[1:]}
    assert metrics["full"] == ["0.700", "-0.400", "+0.050", "+0.400"]
    assert 'id="img-heatmap"' not in report["html1"] and "continual-metrics" not in report["html1"]
    assert not (report["one"].parent / "r_heatmap.png").exists()
    assert (report["one"].parent / "r_bars.png").is_file() and 'id="img-bars"' in report["html1"]


def test_worst_forgotten_items(report):
    s = load_summary(report["store"], "run2stage")
    forgotten = worst_forgotten(report["store"], s, per_arm=3)
    assert [i.item_id for i in forgotten["r1"]["full"]] == ["i2", "i1"]  # worst drop first
    assert "lora" not in forgotten["r1"]  # lora answered every item as well as base
    assert [i.item_id for i in forgotten["ppl"]["full"]] == ["p1"]  # perplexity went up: lower is better
    assert "lora" not in forgotten["ppl"]  # perplexity went down
    rows = table_cells(report["html2"], "forgotten-r1-full")
    assert rows[1][:4] == ["i2", "Capital of France?", "Paris", "Parisscore 1.000"]
    assert rows[1][4] == "Lyonscore 0.000"


def test_model_output_is_escaped_and_page_self_contained(report):
    page = report["html2"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page and "<b>bold" not in page
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page
    assert '"retained": [' in unescape(page)  # the config, pretty-printed


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")
def test_renders_in_headless_chromium(report, tmp_path):
    # A probe script (added to a copy, not to the report) records how many images decoded.
    probe = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        " document.body.dataset.images = imgs.length + '/' + imgs.filter(i => i.naturalWidth > 0).length; });"
        "</script></body>"
    )
    page = tmp_path / "probe.html"
    page.write_text(report["html2"].replace("</body>", probe))
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
        "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'data-images="3/3"' in done.stdout  # pareto, heat map and bars all decoded
    assert "Worst-forgotten items" in done.stdout and "Lyon" in done.stdout
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert console == []


runner = CliRunner()


def test_cli_report_by_id_and_by_folder(report, tmp_path):
    store_path = tmp_path / "s.db"
    make_run(Store(store_path), "abc123", tmp_path / "out")
    done = runner.invoke(app, ["report", "abc", "--store", str(store_path)])
    assert done.exit_code == 0, done.output
    html = tmp_path / "out" / "report.html"  # default: <run out_dir>/report.html
    assert "0.550" in html.read_text() and (tmp_path / "out" / "report_pareto.png").is_file()
    folder = tmp_path / "out"
    shutil.copy(store_path, folder / "ftlab.db")
    (folder / "summary.json").write_text(json.dumps({"run_id": "abc123"}))
    done = runner.invoke(app, ["report", str(folder), "--out", str(tmp_path / "x" / "f.html")])
    assert done.exit_code == 0, done.output
    assert "abc123" in (tmp_path / "x" / "f.html").read_text()


def test_cli_report_clear_errors(tmp_path):
    store_path = tmp_path / "s.db"
    make_run(Store(store_path), "abc123", tmp_path / "out")
    done = runner.invoke(app, ["report", "nope", "--store", str(store_path)])
    assert done.exit_code == 2 and "no run 'nope'" in done.output
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "summary.json").write_text("{}")
    done = runner.invoke(app, ["report", str(tmp_path / "f"), "--store", str(store_path)])
    assert done.exit_code == 2 and "summary.json" in done.output and "run_id" in done.output
    done = runner.invoke(app, ["runs", "--store", str(tmp_path / "missing.db")])
    assert done.exit_code == 2 and "no store" in done.output and not (tmp_path / "missing.db").exists()


def test_cli_runs_and_compare(tmp_path):
    store_path = tmp_path / "s.db"
    make_run(Store(store_path), "runaaa", tmp_path / "a")
    make_run(Store(store_path), "runbbb", tmp_path / "b", t2_full=0.7)
    done = runner.invoke(app, ["runs", "--store", str(store_path)])
    assert done.exit_code == 0, done.output
    assert "runaaa" in done.output and "demo-runbbb" in done.output and "full, lora, full+scale=0.5" in done.output
    done = runner.invoke(app, ["compare", "runaaa", "runbbb", "--store", str(store_path), "--json"])
    assert done.exit_code == 0, done.output
    out = json.loads(done.output)
    assert out["a"]["run_id"] == "runaaa" and out["b"]["run_id"] == "runbbb"
    rows = {(r["arm"], r["metric"]): r for r in out["rows"]}
    gain = rows[("full", "target gain")]
    assert (
        gain["a"] == pytest.approx(0.55) and gain["b"] == pytest.approx(0.45) and gain["delta"] == pytest.approx(-0.1)
    )
    assert rows[("lora", "t2")]["delta"] == pytest.approx(0.0)
    assert rows[("base", "ppl")]["a"] == pytest.approx(10.0)
    done = runner.invoke(app, ["compare", "runaaa", "runbbb", "--store", str(store_path)])
    assert done.exit_code == 0 and "-0.100" in done.output
