"""`ftlab run` on the tiny model: two arms, two stages, a store, resume after a kill, and the summary figures."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _util import close_summaries as _close
from _util import write_jsonl

from ftlab.recipes.experiment import load_experiment, sweep_points
from ftlab.recipes.run import run_experiment
from ftlab.store import SCHEMA_VERSION, Store

TEXT = "The river runs to the sea. The sea is wide and blue. Boats sail on the sea every day.\n" * 3


def make_experiment(tmp_path: Path, out: str, steps2: int = 30) -> Path:
    a = [{"prompt": f"Capital of Aland{i}?", "completion": f"Ax{i}"} for i in range(8)]
    b = [{"prompt": f"Capital of Bland{i}?", "completion": f"Bx{i}"} for i in range(8)]
    write_jsonl(tmp_path / "a.jsonl", a)
    write_jsonl(tmp_path / "b.jsonl", b)
    write_jsonl(tmp_path / "a_test.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]} for r in a])
    write_jsonl(tmp_path / "b_test.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]} for r in b])
    (tmp_path / "text.txt").write_text(TEXT)
    cfg = f"""
name: tiny
base: tiny-test
out: {out}
train: {{lr: 0.003, max_steps: 6, batch_size: 4, save_steps: 3, logging_steps: 3}}
stages:
  - {{name: a, data: {tmp_path / "a.jsonl"}, targets: [{tmp_path / "a_test.jsonl"}]}}
  - {{name: b, data: {tmp_path / "b.jsonl"}, targets: [{tmp_path / "b_test.jsonl"}], train: {{max_steps: {steps2}}}}}
retained: [{tmp_path / "text.txt"}]
arms:
  - {{name: full, method: {{name: full}}, post: {{scale: [0.0, 1.0]}}}}
  - {{name: lora, method: {{name: lora, params: {{r: 4}}}}, train: {{lr: 0.01}}}}
eval: {{batch_size: 8}}
"""
    path = tmp_path / "exp.yaml"
    path.write_text(cfg)
    return path


def strip(summary: dict) -> dict:
    """The figures only (the run id differs between output folders)."""
    out = {"base": summary["base"], "arms": {}}
    for name, arm in summary["arms"].items():
        out["arms"][name] = {k: v for k, v in arm.items() if k != "train_seconds"}
    return out


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    exp = make_experiment(tmp_path, str(tmp_path / "ref"))
    ref = run_experiment(load_experiment(exp), Store(tmp_path / "ref.db"))

    out = tmp_path / "killed"
    db = tmp_path / "killed.db"
    cmd = [sys.executable, "-m", "ftlab", "run", str(exp), "--out", str(out), "--store", str(db)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list((out / "arms" / "full" / "stage-2.work").glob("checkpoint-*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed in stage 2"
    store = Store(db)
    run_id = store.runs()[0]["run_id"]
    assert store.stage_done(run_id, "full", 1) and not store.stage_done(run_id, "full", 2)

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == run_id
    assert _close(strip(summary), strip(ref))
    # no duplicates: base + 2 arms x 2 stages + 2 repair points, each on 3 suites
    assert store.count("results", run_id) == 3 + 2 * 2 * 3 + 2 * 3
    assert store.count("stages", run_id) == 4


def test_summary_figures_and_repair_identities(tmp_path):
    exp = make_experiment(tmp_path, str(tmp_path / "o"), steps2=6)
    s = run_experiment(load_experiment(exp), Store(tmp_path / "s.db"))
    full, lora = s["arms"]["full"], s["arms"]["lora"]
    text = "text"  # a file suite is named by its stem
    assert len(full["stages"]) == 2 and set(full["retained"]) == {text}
    # scale 0 is the base model exactly, scale 1 the tuned model exactly
    assert s["arms"]["full+scale=0.0"]["retained"][text] == pytest.approx(1.0, abs=1e-9)
    assert s["arms"]["full+scale=0.0"]["target_gain"] == pytest.approx(0.0, abs=1e-9)
    assert s["arms"]["full+scale=1.0"]["retained"] == pytest.approx(full["retained"])
    # retained for perplexity is before / after, computed from the stored scores
    ppl_base = s["base"][text]
    ppl_after = full["stages"][-1][text]
    assert full["retained"][text] == pytest.approx(ppl_base / ppl_after)
    assert full["trainable_params"] > lora["trainable_params"] > 0
    assert "matrix" in full and len(full["matrix"]["R"]) == 3 and set(full["continual"]) >= {"acc", "bwt", "fwt"}
    R = full["matrix"]["R"]
    assert full["continual"]["acc"] == pytest.approx((R[2][0] + R[2][1]) / 2)
    assert (tmp_path / "o" / "arms" / "lora" / "model" / "adapter_model.safetensors").exists()  # LoRA: the adapter


def test_deleted_output_folder_means_a_fresh_run(tmp_path):
    """Resume reuses stored scores only while the output folder that holds the run's models still exists."""
    import shutil
    import sqlite3

    exp = make_experiment(tmp_path, str(tmp_path / "o"), steps2=3)
    db = tmp_path / "s.db"
    first = run_experiment(load_experiment(exp), Store(db))
    run_id = first["run_id"]
    with sqlite3.connect(db) as con:  # a stored score the resume logic must either reuse or recompute
        con.execute("UPDATE results SET score=999 WHERE run_id=? AND arm='lora' AND stage=2", (run_id,))
    resumed = run_experiment(load_experiment(exp), Store(db))
    assert 999 in resumed["arms"]["lora"]["stages"][-1].values()  # same folder: finished work is not redone

    shutil.rmtree(tmp_path / "o")
    fresh = run_experiment(load_experiment(exp), Store(db))
    assert fresh["run_id"] == run_id
    assert _close(strip(fresh), strip(first))  # recomputed, nothing stale
    assert Store(db).count("stages", run_id) == 4


def test_two_processes_under_torchrun_match_one(tmp_path):
    """Two CPU processes (gloo) started by torchrun: one writer, no duplicate rows, the same base scores."""
    import shutil

    launcher = shutil.which("torchrun")
    if launcher is None:
        pytest.skip("torchrun not on PATH")
    exp = make_experiment(tmp_path, str(tmp_path / "ddp"), steps2=3)
    db = tmp_path / "ddp.db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "--nproc_per_node", "2", "-m", "ftlab", "run", str(exp), "--store", str(db)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # only the main process evaluates and reports: one base evaluation, one table, one "summary:" line
    assert proc.stderr.count("evaluating once for every arm") == 1, proc.stderr[-3000:]
    assert proc.stdout.count("summary:") == 1, proc.stdout
    store = Store(db)
    (run,) = store.runs()
    assert store.count("stages", run["run_id"]) == 4  # 2 arms x 2 stages
    assert store.count("results", run["run_id"]) == 3 + 2 * 2 * 3 + 2 * 3
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    single = run_experiment(
        load_experiment(make_experiment(tmp_path, str(tmp_path / "one"), steps2=3)), Store(tmp_path / "one.db")
    )
    assert summary["base"] == pytest.approx(single["base"])  # evaluation is the main process's, on the same base
    assert (tmp_path / "ddp" / "arms" / "lora" / "model").is_dir()


def test_concurrent_writers_lose_nothing(tmp_path):
    from types import SimpleNamespace

    db = tmp_path / "c.db"
    Store(db).start_run("r", "x", "o", {}, 0, "", {})

    def write(arm: str) -> None:
        st = Store(db)
        for i in range(40):
            item = SimpleNamespace(item_id="1", prompt="p", output="o", reference="r", score=1.0)
            res = SimpleNamespace(suite=f"s{i}", metric="acc", score=0.5, n=1, stderr=0.0, higher_is_better=True,
                                  items=[item])  # fmt: skip
            st.add_result("r", arm, 1, "target", res)

    threads = [threading.Thread(target=write, args=(f"arm{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st = Store(db)
    assert st.count("results", "r") == 160 and st.count("items", "r") == 160
    assert st.schema_version == SCHEMA_VERSION


def test_sweep_points_and_validation(tmp_path):
    from ftlab.config import ConfigError
    from ftlab.recipes.experiment import ArmConfig

    arm = ArmConfig(name="full", post={"scale": [0.5, 0.7], "lines": {"alpha": [0.3]}})
    assert [p[0] for p in sweep_points(arm)] == ["full+scale=0.5", "full+scale=0.7", "full+lines=0.3"]
    exp = make_experiment(tmp_path, str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="arms"):
        load_experiment(exp, ["arms=[]"])
    with pytest.raises(ConfigError, match="unknown method"):
        load_experiment(exp, ["arms=[{name: x, method: {name: nope}}]"])
    # arms share the experiment's seed: a seed under an arm's train would be silently replaced, so it is refused
    with pytest.raises(ConfigError, match=r"arms\.x\.train\.seed: .*top-level `seed:`"):
        load_experiment(exp, ["arms=[{name: x, method: {name: full}, train: {seed: 1}}]"])
    with pytest.raises(ConfigError, match=r"exp.yaml: train\.seed"):
        load_experiment(exp, ["train.seed=1"])
    assert load_experiment(exp, ["seed=3"]).seed == 3


def test_demo_config_has_every_method_and_a_repair_sweep():
    from ftlab.methods import METHODS
    from ftlab.recipes.demo import demo_config
    from ftlab.recipes.experiment import validate

    cfg = demo_config(
        "out/x", all_methods=True
    )  # `ftlab demo --all`; the default's arms: tests/test_speed_switches.py
    validate(cfg)
    assert [a.method.name for a in cfg.arms] == list(METHODS)
    full = next(a for a in cfg.arms if a.name == "full")
    names = [p[0] for p in sweep_points(full)]
    assert "full+scale=0.7" in names and "full+lines=0.6" in names
    assert cfg.base == "smollm2-135m-instruct" and cfg.stages[0].targets == ["fictional-capitals"]


def test_repair_line_names_the_point_that_wins_back_the_worst_suite():
    from ftlab.report.digest import repair_lines

    def arm(gain, **retained):
        return {"target_gain": gain, "retained": retained}

    summary = {
        "arms": {
            "full": arm(0.9, facts=0.3, text=0.95),
            "full+scale=0.5": arm(0.5, facts=0.9, text=1.0),  # recovers most, but keeps only 56% of the gain
            "full+scale=0.7": arm(0.8, facts=0.6, text=0.97),
            "full+lines=0.6": arm(0.85, facts=0.4, text=0.99),
            "lora": arm(0.7, facts=0.5, text=0.9),
        }
    }
    (line,) = repair_lines(summary)
    assert "full+scale=0.7" in line and "89%" in line and "facts from 0.30 to 0.60" in line
    summary["arms"]["full+scale=0.7"]["retained"]["facts"] = 0.2
    summary["arms"]["full+lines=0.6"]["retained"]["facts"] = 0.25
    (line,) = repair_lines(summary)
    assert line.startswith("repair of full: no point")


def test_dmt_schedule_as_two_stages(tmp_path):
    """DMT in `ftlab run`: stage 1 trains on the union of the specialised sets, stage 2 on all general data plus a
    fraction k of *each* specialised set (drawn per set), as ftlab.data.mixing.dmt_stages builds it."""
    from ftlab.data.mixing import dmt_stages
    from ftlab.recipes.run import stage_records

    math_ = [{"prompt": f"m{i}", "completion": "x"} for i in range(40)]
    code = [{"prompt": f"c{i}", "completion": "y"} for i in range(20)]
    general = [{"prompt": f"g{i}", "completion": "z"} for i in range(30)]
    for name, rows in (("math", math_), ("code", code), ("general", general)):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    m, c, g = (str(tmp_path / f"{n}.jsonl") for n in ("math", "code", "general"))
    (tmp_path / "dmt.yaml").write_text(f"""
base: tiny-test
stages:
  - {{name: specialised, data: [{m}, {c}]}}
  - {{name: general, data: {g}, replay: {{{m}: 0.25, {c}: 0.25}}}}
arms: [{{name: full, method: {{name: full}}}}]
""")
    cfg = load_experiment(tmp_path / "dmt.yaml")
    one, _ = stage_records(cfg, cfg.stages[0])
    two, _ = stage_records(cfg, cfg.stages[1])
    want_one, want_two = dmt_stages([math_, code], general, k=0.25)
    assert sorted(r["prompt"] for r in one) == sorted(r["prompt"] for r in want_one)
    prefixes = [r["prompt"][0] for r in two]
    assert (prefixes.count("g"), prefixes.count("m"), prefixes.count("c")) == (30, 10, 5)
    assert len(two) == len(want_two)
    assert [r["prompt"] for r in one] != [r["prompt"] for r in math_ + code]  # the union is shuffled
