"""``ftlab eval`` on the tiny model: the JSON line matches the library result; bad suites fail cleanly."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.evals import evaluate, load_suite
from ftlab.models import load_model


def test_eval_json_matches_library(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"Say {w}", "answer": w}) + "\n" for w in ["a", "b", "c", "d"]))
    text = tmp_path / "notes.txt"
    text.write_text("Some plain text to score.\n\nAnother paragraph of it.")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads on a shared CPU
    try:
        args = ["eval", "--model", "tiny-test", "--suite", str(qa), "--suite", str(text), "--limit", "3", "--json"]
        result = CliRunner().invoke(app, args)
        model, tok = load_model("tiny-test")
        want = evaluate(model, tok, load_suite(str(qa), limit=3), progress=False).to_dict()
        ppl = evaluate(model, tok, load_suite(str(text)), progress=False).to_dict()
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["model"] == "tiny-test"
    assert payload["suites"] == {"qa": want, "notes": ppl}
    assert payload["suites"]["qa"]["n"] == 3 and payload["suites"]["notes"]["metric"] == "perplexity"


def test_eval_bad_suite_exits_with_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    result = CliRunner().invoke(app, ["eval", "--model", "tiny-test", "--suite", str(bad)])
    assert result.exit_code == 2
    assert "bad.jsonl:1: missing field 'answer'" in result.output
