"""`ftlab report --format csv|markdown|json` and `ftlab compare` with several runs: every number comes back as the
one summary builder computed it."""

from __future__ import annotations

import csv
import io
import json

import pytest
from test_report import make_run
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.report.digest import build_summary
from ftlab.report.export import COLUMNS
from ftlab.store import Store

runner = CliRunner()
NUMBERS = ("score", "n", "stderr", "delta", "ci_low", "ci_high", "p_value", "ratio", "target_gain", "retention")
FLAGS = ("significant", "floor", "too_few_items")


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.db"
    make_run(Store(path), "runaaa", tmp_path / "a")
    make_run(Store(path), "runbbb", tmp_path / "b", t2_full=0.7)
    make_run(Store(path), "runccc", tmp_path / "c", t2_full=0.5)
    return path


def expected_rows(summary: dict) -> dict[tuple[str, str], dict]:
    """(arm, suite) -> the figures the exports must show, read straight from the build_summary dict."""
    roles = {s: e["role"] for arm in reversed(summary["arms"].values()) for s, e in arm["suites"].items()}
    out = {
        ("base", s): {"kind": "base", "role": roles[s], "score": v, **summary["base_noise"][s]}
        for s, v in summary["base"].items()
    }
    for name, arm in summary["arms"].items():
        for suite, e in arm["suites"].items():
            lo, hi = e["ci"] or (None, None)
            out[(name, suite)] = {
                **{k: e[k] for k in ("role", "score", "n", "stderr", "delta", "p_value", "ratio", *FLAGS)},
                "kind": arm["kind"], "parent": arm["parent"], "ci_low": lo, "ci_high": hi,
                "target_gain": arm["target_gain"], "retention": arm["retention"],
            }  # fmt: skip
    return out


def check(parsed: list[dict[str, str]], summary: dict, rel: float) -> None:
    want = expected_rows(summary)
    got = {(r["arm"], r["suite"]): r for r in parsed}
    assert list(got) == list(want)  # every (arm, suite), base first, in the summary's order, no extra rows
    for key, fields in want.items():
        row = got[key]
        for name, value in fields.items():
            cell = row[name]
            if name in NUMBERS:
                assert (None if cell == "" else float(cell)) == (
                    None if value is None else pytest.approx(value, rel=rel, abs=1e-12)
                ), (key, name)
            elif name in FLAGS:
                assert cell == str(value).lower(), (key, name)
            else:
                assert cell == ("" if value is None else value), (key, name)
        assert all(row[c] == "" for c in COLUMNS if c not in fields and c not in ("arm", "suite")), key


def report(store, fmt: str) -> str:
    done = runner.invoke(app, ["report", "runaaa", "--store", str(store), "--format", fmt])
    assert done.exit_code == 0, done.output
    return done.stdout


def test_csv_export_reads_back_exactly_as_the_summary(store):
    summary = build_summary(Store(store), "runaaa")
    text = report(store, "csv")
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames) == COLUMNS
    rows = list(reader)
    check(rows, summary, rel=1e-15)  # CSV keeps every float exactly
    # the synthetic run: a significant retained loss shows with its interval and ratio
    r1 = next(r for r in rows if (r["arm"], r["suite"]) == ("full", "r1"))
    assert (r1["role"], float(r1["ratio"]), float(r1["target_gain"])) == ("retained", 0.5, pytest.approx(0.55))
    edit = next(r for r in rows if r["arm"] == "full+scale=0.5")
    assert (edit["kind"], edit["parent"]) == ("edit", "full")


def test_markdown_export_reads_back_as_the_summary(store):
    summary = build_summary(Store(store), "runaaa")
    lines = report(store, "markdown").splitlines()
    assert lines[0].startswith("### run runaaa (demo-runaaa)") and "95% confidence" in lines[0]
    table = [line for line in lines if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert tuple(header) == COLUMNS and set(table[1].replace("|", "")) == {"-"}
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in table[2:]]
    check(rows, summary, rel=1e-3)  # 4 significant digits


def test_json_export_is_the_summary(store):
    assert json.loads(report(store, "json")) == json.loads(json.dumps(build_summary(Store(store), "runaaa")))


def test_html_stays_the_default(store, tmp_path):
    done = runner.invoke(app, ["report", "runaaa", "--store", str(store), "--out", str(tmp_path / "r.html")])
    assert done.exit_code == 0, done.output
    assert "wrote" in done.stdout and (tmp_path / "r.html").read_text().startswith("<!")


def test_a_text_export_goes_to_out_when_given(store, tmp_path):
    out = tmp_path / "x" / "figures.csv"
    done = runner.invoke(app, ["report", "runaaa", "--store", str(store), "--format", "csv", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert out.read_text() == report(store, "csv")


def test_an_unknown_format_is_one_line_and_exit_code_2(store):
    done = runner.invoke(app, ["report", "runaaa", "--store", str(store), "--format", "xlsx"])
    assert done.exit_code == 2
    assert done.output.strip().count("\n") == 0 and "unknown --format 'xlsx'" in done.output
    assert "Traceback" not in done.output


def test_compare_three_runs_compares_each_with_the_first(store):
    done = runner.invoke(app, ["compare", "runaaa", "runbbb", "runccc", "--store", str(store), "--json"])
    assert done.exit_code == 0, done.output
    out = json.loads(done.stdout)
    assert out["a"]["run_id"] == "runaaa"
    assert [c["b"]["run_id"] for c in out["comparisons"]] == ["runbbb", "runccc"]
    for comparison, t2 in zip(out["comparisons"], (0.7, 0.5), strict=True):
        rows = {(r["arm"], r["metric"]): r for r in comparison["rows"]}
        assert rows[("full", "t2")]["a"] == pytest.approx(0.9) and rows[("full", "t2")]["b"] == pytest.approx(t2)
        assert rows[("full", "target gain")]["delta"] == pytest.approx((t2 - 0.9) / 2)
        assert rows[("full", "target gain")]["significant"] is None
    done = runner.invoke(app, ["compare", "runaaa", "runbbb", "runccc", "--store", str(store)])
    assert done.exit_code == 0, done.output
    titles = [line for line in done.stdout.splitlines() if "A = runaaa" in line]
    assert len(titles) == 2 and "B = runbbb" in titles[0] and "B = runccc" in titles[1]
    assert "-0.100" in done.stdout and "-0.200" in done.stdout  # the full arm's target gain, B - A, per pair
    assert done.stdout.count("* significant") == 1


def test_compare_two_runs_keeps_its_json_shape(store):
    done = runner.invoke(app, ["compare", "runaaa", "runbbb", "--store", str(store), "--json"])
    assert done.exit_code == 0, done.output
    out = json.loads(done.stdout)
    assert set(out) == {"a", "b", "rows"} and out["b"]["run_id"] == "runbbb"


def test_compare_one_run_is_one_line_and_exit_code_2(store):
    done = runner.invoke(app, ["compare", "runaaa", "--store", str(store)])
    assert done.exit_code == 2 and "two or more runs" in done.output and done.output.strip().count("\n") == 0
