"""The forgetting budget: the search on synthetic responses (pure logic), ``ftlab repair`` on tiny models, and
``keep:`` in an experiment."""

from __future__ import annotations

import json
import math

import pytest

from ftlab.budget import Point, SuiteScore, judge, search

N = 400  # items per synthetic suite


def _binary(frac: float, n: int = N) -> SuiteScore:
    """A 0/1 suite whose first round(frac * n) items are right (noise-free per-item rows)."""
    k = round(frac * n)
    return SuiteScore(k / n, True, n, {f"i{j:04d}": float(j < k) for j in range(n)})


def _effective(point: Point) -> float:
    """How far a synthetic point is toward the fine-tune: scale t; LiNeS moves the deep blocks fully (more change at
    the same t); reset of the smallest changes keeps most of the change."""
    return {"scale": point.t, "lines": (1 + point.t) / 2, "reset": point.t**0.5, "merge": 0.5}[point.knob]


def synthetic(gain, ratio, base_target=0.1, base_ret=0.8, lower_is_better=False):
    """``(base, evaluate, calls)`` of a model family whose target score is base + gain(s) and retained ratio
    ratio(s) at effective strength s."""
    base = {"target": _binary(base_target), "kept": _binary(base_ret)}
    if lower_is_better:
        base["ppl"] = SuiteScore(10.0, False, N, {f"p{j}": 10.0 for j in range(N)})
    calls: list[Point] = []

    def evaluate(point: Point):
        calls.append(point)
        s = _effective(point)
        out = {"target": _binary(base_target + gain(s)), "kept": _binary(base_ret * ratio(s))}
        if lower_is_better:
            ppl = 10.0 / ratio(s)  # ratio before/after
            out["kept"] = _binary(base_ret)  # the accuracy suite keeps everything; perplexity decides
            out["ppl"] = SuiteScore(ppl, False, N, {f"p{j}": ppl for j in range(N)})
        return out, True

    return base, evaluate, calls


def test_finds_the_optimum_of_a_monotone_response_in_at_most_8_points():
    # target gain rises with s, retention falls as 1 - 0.3 s^2: with keep 0.9 the best factor is s* = 1/sqrt(3)
    base, evaluate, calls = synthetic(lambda s: 0.8 * s, lambda s: 1 - 0.3 * s * s)
    result = search(0.9, base, ["target"], ["kept"], evaluate)
    s_star = 1 / math.sqrt(3)
    assert result.met and result.chosen.point.knob == "scale"
    assert abs(result.chosen.point.t - s_star) <= 0.05
    assert result.chosen.point.t <= s_star + 1 / N  # it meets: never past the optimum
    assert result.chosen.ratios["kept"] >= 0.9
    assert len(calls) == result.evaluated == len(result.path) <= 8
    assert calls[0] == Point("scale", 1.0)  # the fine-tune first
    assert {p.knob for p in calls} >= {"scale", "lines"}  # what is left goes to LiNeS
    d = result.to_dict("full")
    assert d["chosen"]["edit"] == "scale" and d["chosen"]["name"] == f"full+scale={result.chosen.point.value}"
    assert json.loads(json.dumps(d)) == d


@pytest.mark.parametrize("knob", ["lines", "reset"])
def test_each_knob_alone_runs_the_right_way(knob):
    """LiNeS (alpha = t) and reset (fraction = 1 - t) bisected on their own reach their optimum: the synthetic
    strength is (1 + t) / 2 for LiNeS and sqrt(t) for reset, so t* = 2 s* - 1 and s*^2."""
    base, evaluate, calls = synthetic(lambda s: 0.8 * s, lambda s: 1 - 0.3 * s * s)
    result = search(0.9, base, ["target"], ["kept"], evaluate, knobs=(knob,))
    s_star = 1 / math.sqrt(3)
    t_star = {"lines": 2 * s_star - 1, "reset": s_star**2}[knob]
    assert result.met and result.chosen.point.knob == knob and len(calls) <= 8
    assert abs(result.chosen.point.t - t_star) <= 0.05
    if knob == "reset":  # the edit's setting is the share copied back from the base
        assert result.chosen.point.settings == {
            "fraction": pytest.approx(1 - result.chosen.point.t),
            "how": "smallest",
        }


def test_a_knob_that_cannot_win_gives_its_evaluations_to_the_others():
    """What the demo's full fine-tune looks like: scale gains nothing until t = 0.3 but loses retention at once, so
    every scale factor that keeps 0.9 gains 0; partial reset keeps the gain at a smaller loss. Once scale fails at a
    factor whose gain is already 0, bisecting it further cannot help (gain rises with t), and the evaluations go to
    LiNeS and reset; LiNeS stops when its failing point gains no more than the best point met."""
    responses = {  # knob -> (gain(t), retained ratio(t))
        "scale": (lambda t: max(0.0, t - 0.3), lambda t: 1 - 0.5 * t),
        "lines": (lambda t: 0.8 * t, lambda t: 0.85 - 0.1 * t),  # never keeps 0.9
        "reset": (lambda t: 0.8 * t, lambda t: 1 - 0.2 * t),  # keeps 0.9 up to t = 0.5 (gain 0.4)
    }
    base = {"target": _binary(0.1), "kept": _binary(0.8)}
    calls: list[Point] = []

    def evaluate(point: Point):
        calls.append(point)
        gain, ratio = responses[point.knob]
        return {"target": _binary(0.1 + gain(point.t)), "kept": _binary(0.8 * ratio(point.t))}, True

    result = search(0.9, base, ["target"], ["kept"], evaluate)
    assert len(calls) <= 8 and result.met
    assert [p.t for p in calls if p.knob == "scale"] == [1.0, 0.5, 0.25]  # 0.25 fails with gain 0: scale stops
    assert result.chosen.point.knob == "reset" and result.chosen.gain >= 0.3, result.to_dict()
    assert result.chosen.ratios["kept"] >= 0.9
    # LiNeS fails at 0.25 with gain 0.2, and reset met at 0.25 with 0.2: LiNeS cannot beat it and stops
    assert [p.t for p in calls if p.knob == "lines"] == [0.25]
    assert len(calls) == 8 and result.chosen.gain >= 0.35  # the saved evaluations went to reset's bracket
    # the gain's paired test: 0.35 of 400 items is real; scale 0.25 gained nothing, and says so
    assert result.chosen.gain_significant is True and result.to_dict()["chosen"]["gain_significant"] is True
    assert next(v for v in result.path if v.point == Point("scale", 0.25)).gain_significant is False


def test_the_fine_tune_itself_when_it_keeps_the_budget():
    base, evaluate, calls = synthetic(lambda s: 0.5 * s, lambda s: 1 - 0.05 * s)
    result = search(0.9, base, ["target"], ["kept"], evaluate)
    assert result.met and result.chosen.point == Point("scale", 1.0) and len(calls) == 1


def test_no_point_meets_names_the_closest():
    # any change at all loses more than the budget allows
    base, evaluate, calls = synthetic(lambda s: 0.5 * s, lambda s: 0.5 - 0.1 * s)
    result = search(0.95, base, ["target"], ["kept"], evaluate)
    assert not result.met and result.chosen is None
    assert result.closest is not None and "closest" in result.reason
    # the closest is the visited point with the smallest worst shortfall
    assert result.closest.shortfall == min(v.shortfall for v in result.path)
    assert result.closest.shortfall > 0 and len(result.path) <= 8
    d = result.to_dict()
    assert d["met"] is False and d["chosen"] is None and d["closest"]["name"] == result.closest.point.name("tuned")


def test_lower_is_better_suite_is_oriented():
    # perplexity rises with s (ratio = before / after falls); with keep 0.8 the optimum is s = 0.5
    base, evaluate, _ = synthetic(lambda s: 0.5 * s, lambda s: 1 / (1 + 0.5 * s), lower_is_better=True)
    result = search(0.8, base, ["target"], ["kept", "ppl"], evaluate)
    assert result.met
    assert result.chosen.ratios["ppl"] == pytest.approx(1 / (1 + 0.5 * _effective(result.chosen.point)))
    assert result.chosen.ratios["ppl"] >= 0.8 and abs(result.chosen.point.t - 0.5) <= 0.05
    # a point whose perplexity went up by half keeps 2/3 of it, not 1.5
    v = judge(Point("scale", 1.0), evaluate(Point("scale", 1.0))[0], base, ["target"], ["ppl"], 0.8)
    assert v.ratios["ppl"] == pytest.approx(2 / 3) and not v.meets


def test_a_suite_at_its_floor_does_not_decide():
    # the retained suite's base is at chance-level floor 0 (2 of 400 right): its collapse must not block the fine-tune
    base, evaluate, _ = synthetic(lambda s: 0.5 * s, lambda s: 1 - 0.9 * s, base_ret=0.005)
    result = search(0.9, base, ["target"], ["kept"], evaluate)
    assert result.met and result.chosen.point.is_tuned
    assert result.chosen.suites["kept"]["floor"] is True


def test_significance_rule_accepts_a_shortfall_within_noise():
    # 10 items: a loss from 8 to 7 right (ratio 0.875 < 0.9) is not significantly beyond the budget
    base = {"t": _binary(0.0, 10), "k": _binary(0.8, 10)}
    scores = {"t": _binary(0.5, 10), "k": _binary(0.7, 10)}
    strict = judge(Point("scale", 1.0), scores, base, ["t"], ["k"], 0.9)
    lenient = judge(Point("scale", 1.0), scores, base, ["t"], ["k"], 0.9, rule="significance")
    assert not strict.meets and lenient.meets and lenient.suites["k"]["beyond"] is False
    # with 400 items the same ratio is a significant loss beyond the budget: both rules refuse it
    big = {"t": _binary(0.0), "k": _binary(0.8)}
    far = judge(
        Point("scale", 1.0), {"t": _binary(0.5), "k": _binary(0.6)}, big, ["t"], ["k"], 0.9, rule="significance"
    )
    assert not far.meets and far.suites["k"]["beyond"] is True


# ---------------------------------------------------------------------------------------------------- on tiny models
DIGITS = [" ".join(str((i * 7 + j * 3) % 10) for j in range(30)) for i in range(12)]
PROSE = [f"the cat sat on the mat and the dog ran to the sea number {i} wide blue boat" for i in range(12)]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny base that learned prose (``prose.jsonl``, perplexity) and a fine-tune of it that learned digit strings
    (``digits.jsonl``) and forgot some prose: along the scale factor the digits' perplexity falls and the prose's
    rises (ratio about 0.96, 0.84, 0.76, 0.48 at 0.25, 0.5, 0.625, 1)."""
    import copy

    import torch
    from _util import write_jsonl

    from ftlab.models import save_model, tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("pair")
    write_jsonl(root / "digits.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(DIGITS)])
    write_jsonl(root / "prose.jsonl", [{"id": f"p{i}", "text": t} for i, t in enumerate(PROSE)])
    tok = tiny_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    def train(model, texts, steps, lr):
        ids = tok(texts, return_tensors="pt", padding=True).input_ids
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return model.eval()

    base = train(tiny_model(), PROSE, 30, 1e-2)
    tuned = train(copy.deepcopy(base), DIGITS, 6, 2e-3)
    save_model(base, tok, root / "base")
    save_model(tuned, tok, root / "tuned")
    torch.set_num_threads(threads)
    return root


def _repair(root, tmp_path, *extra):
    from typer.testing import CliRunner

    from ftlab.cli import app

    args = ["repair", "--keep", "0.8", "--base", str(root / "base"), "--tuned", str(root / "tuned"),
            "--target", str(root / "digits.jsonl"), "--retained", str(root / "prose.jsonl"),
            "--store", str(tmp_path / "s.db"), *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_repair_cli_json_cache_and_model(tiny_pair, tmp_path, one_thread):
    from ftlab.models import load_model, state_dict_fp32

    done = _repair(tiny_pair, tmp_path, "--out", str(tmp_path / "chosen"), "--json")
    assert done.exit_code == 0, done.output
    lines = done.stdout.strip().splitlines()
    first = json.loads(lines[-1])
    assert "point" in lines[0] or "┏" in lines[0]  # the table before the JSON line
    assert first["met"] is True and 1 <= first["evaluated"] <= 8 and first["evaluated"] == first["points"]
    chosen = first["chosen"]
    assert set(chosen) >= {"edit", "value", "target_gain", "retention"}
    assert chosen["retention"]["prose"] >= 0.8 and chosen["target_gain"] > 0
    # the prose ratio is 0.84 at scale 0.5 and 0.76 at 0.625: bisection lands in between
    assert chosen["edit"] != "scale" or 0.5 <= chosen["value"] < 0.625
    # the written model is that point: its weights are the edit of base and tuned
    base = state_dict_fp32(load_model(str(tiny_pair / "base"))[0])
    tuned = state_dict_fp32(load_model(str(tiny_pair / "tuned"))[0])
    got = state_dict_fp32(load_model(str(tmp_path / "chosen"))[0])
    from ftlab.budget import Point
    from ftlab.edits import apply_edit

    knob = {"scale": "scale", "lines": "lines", "reset": "reset"}[chosen["edit"]]
    t = 1 - chosen["value"] if knob == "reset" else chosen["value"]
    want = apply_edit(knob, base, tuned, **Point(knob, t).settings)
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch_equal(got[key], want[key]) and not torch_equal(got[key], tuned[key])
    # a second invocation evaluates nothing: every point comes from the store
    again = _repair(tiny_pair, tmp_path, "--json")
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert second["evaluated"] == 0 and second["base_evaluated"] is False
    assert second["chosen"]["name"] == chosen["name"] and second["points"] == first["points"]


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.allclose(a, b, atol=1e-6))


@pytest.mark.parametrize(
    "args",
    [
        ["--keep", "0"],
        ["--keep", "1.5"],
        ["--keep", "0.9", "--rule", "loose"],
    ],
)
def test_repair_cli_bad_inputs_exit_2(args, tmp_path):
    from typer.testing import CliRunner

    from ftlab.cli import app

    base = ["repair", "--base", "tiny-test", "--tuned", "tiny-test", "--target", "arithmetic",
            "--retained", "world-facts", "--store", str(tmp_path / "s.db")]  # fmt: skip
    done = CliRunner().invoke(app, base + args)
    assert done.exit_code == 2, done.output
    assert not (tmp_path / "s.db").exists()  # refused before anything is written


def test_repair_cli_needs_retained(tmp_path):
    from typer.testing import CliRunner

    from ftlab.cli import app

    done = CliRunner().invoke(
        app, ["repair", "--keep", "0.9", "--base", "tiny-test", "--tuned", "tiny-test", "--target", "arithmetic"]
    )
    assert done.exit_code == 2 and "--retained" in done.output


def _keep_experiment(root, tmp_path, keep="0.8") -> str:
    from _util import write_jsonl

    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Digits:", "completion": t} for t in DIGITS])
    return f"""
name: budget
base: {root / "base"}
out: {tmp_path / "out"}
keep: {keep}
train: {{lr: 0.003, max_steps: 6, batch_size: 4, save_steps: 0, logging_steps: 3}}
stages:
  - {{name: digits, data: {tmp_path / "train.jsonl"}, targets: [{root / "digits.jsonl"}]}}
retained: [{root / "prose.jsonl"}]
arms:
  - {{name: full, method: {{name: full}}}}
eval: {{batch_size: 12}}
"""


@pytest.mark.parametrize("keep", [0.1, pytest.param(0.8, marks=pytest.mark.slow)], ids=["fine-tune-keeps", "search"])
def test_keep_in_an_experiment_writes_the_recommended_model(keep, tiny_pair, tmp_path, one_thread):
    """keep 0.1: the fine-tune itself keeps it (one point, fast); keep 0.8: a search of 8 points (slow, ~10 s)."""
    from ftlab.recipes.experiment import load_experiment
    from ftlab.recipes.run import run_experiment
    from ftlab.report.html import render_report
    from ftlab.store import Store

    (tmp_path / "exp.yaml").write_text(_keep_experiment(tiny_pair, tmp_path, keep=str(keep)))
    store = Store(tmp_path / "s.db")
    summary = run_experiment(load_experiment(tmp_path / "exp.yaml"), store)
    rec = summary["recommended"]
    budget = summary["budget"]["full"]
    assert rec["arm"] == "full" and rec["keep"] == keep and 1 <= budget["points"] <= 8
    if keep == 0.1:
        assert rec["met"] and rec["name"] == "full" and budget["path"] == ["full"]
    else:
        assert rec["met"] and rec["edit"] == "scale" and 0 < rec["value"] < 1 and budget["points"] > 4
    assert budget["path"][0] == "full"  # the fine-tune first
    for name in budget["path"][1:]:  # every point is a stored repair point of the arm
        assert summary["arms"][name]["kind"] == "edit" and summary["arms"][name]["parent"] == "full"
    if rec["met"]:
        assert rec["retention"]["prose"] >= keep
        assert summary["arms"][rec["name"]]["retained"]["prose"] == pytest.approx(rec["retention"]["prose"])
        assert (tmp_path / "out" / "arms" / "full" / "recommended" / "model.safetensors").exists()
    else:
        assert rec["closest"] and not (tmp_path / "out" / "arms" / "full" / "recommended").exists()
    page = render_report(store, summary["run_id"], tmp_path / "r.html").read_text()
    assert 'id="budget"' in page and f'class="recommended">{rec["name"]}<' in page
    import io

    from ftlab.cli.train import print_table

    printed = io.StringIO()
    print_table(summary, file=printed)  # what `ftlab run` prints last
    assert f"recommended (keep {keep}): {rec['name']}" in printed.getvalue()


def test_keep_is_validated(tmp_path):
    from ftlab.config import ConfigError
    from ftlab.recipes.experiment import load_experiment

    for bad in ("0", "1.5", "yes"):
        (tmp_path / "exp.yaml").write_text(_keep_experiment(tmp_path, tmp_path, keep=bad))
        with pytest.raises(ConfigError, match="keep"):
            load_experiment(tmp_path / "exp.yaml")
