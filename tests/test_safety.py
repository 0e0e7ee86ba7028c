"""Safety: no pickle loads of a user's files, remote code only when asked, and a report that escapes every text.

- Weights load from safetensors only: a model or adapter folder whose weights are only pickles
  (``pytorch_model.bin``, ``adapter_model.bin``) is refused with one line before anything is unpickled, and no
  source file of the package calls ``torch.load`` or imports ``pickle``/``joblib``.
- ``trust_remote_code`` reaches no ``from_pretrained`` call unless the user sets it.
- The HTML report escapes model outputs, item prompts and references, arm, suite and run names: a completion holding
  ``<script>`` renders as text.
"""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path

import pytest
import torch
from _util import spy_kwargs
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.errors import ModelNotFoundError

runner = CliRunner()
SRC = Path(__file__).parents[1] / "src" / "ftlab"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    from ftlab.models import save_model, tiny_model, tiny_tokenizer

    return save_model(tiny_model(), tiny_tokenizer(), tmp_path_factory.mktemp("safety") / "model")


def _no_unpickling(monkeypatch) -> None:
    """Any unpickling from here on fails the test (torch.load and pickle.load both)."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)


# ------------------------------------------------------------------ (a) no pickle loads
def test_a_model_folder_with_only_pickle_weights_is_refused(saved, tmp_path, monkeypatch):
    from ftlab.models import load_model

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((saved / "config.json").read_bytes())
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    _no_unpickling(monkeypatch)
    with pytest.raises(ModelNotFoundError, match=r"pytorch_model\.bin.*safetensors only"):
        load_model(folder)
    done = runner.invoke(app, ["eval", "--model", str(folder), "--suite", "world-facts", "--limit", "1"])
    assert done.exit_code == 2 and "pytorch_model.bin" in done.output and "Traceback" not in done.output


def test_an_adapter_folder_with_only_pickle_weights_is_refused(saved, tmp_path, monkeypatch):
    from ftlab.models import load_model

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(saved)})
    )
    torch.save({"w": torch.zeros(1)}, folder / "adapter_model.bin")
    _no_unpickling(monkeypatch)
    with pytest.raises(ModelNotFoundError, match=r"adapter_model\.bin.*adapter_model\.safetensors only"):
        load_model(folder)


def test_a_folder_with_both_loads_the_safetensors(saved, tmp_path, monkeypatch):
    """A folder with safetensors beside a pickle loads (from the safetensors) without unpickling anything."""
    from ftlab.models import load_model, state_dict_fp32

    folder = tmp_path / "both"
    folder.mkdir()
    for f in saved.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")  # unpickling it would fail loudly
    _no_unpickling(monkeypatch)
    model, _ = load_model(folder)
    expected, _ = load_model(saved)
    got, want = state_dict_fp32(model), state_dict_fp32(expected)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_no_source_file_unpickles():
    offenders = []
    for path in SRC.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\btorch\.load\(|^\s*(import|from) (pickle|joblib|dill|cloudpickle)\b|np\.load\(", code):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
            if re.search(r"allow_pickle\s*=\s*True|weights_only\s*=\s*False", code):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not offenders, offenders


# ------------------------------------------------------------------ (b) remote code only when asked
def test_from_pretrained_gets_no_remote_code_by_default(saved, monkeypatch):
    import ftlab.models as models

    seen = {
        name: spy_kwargs(monkeypatch, getattr(models, name), "from_pretrained")
        for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer")
    }
    models.load_model(saved)
    assert seen["AutoModelForCausalLM"] is not None and seen["AutoTokenizer"] is not None
    called = {name: kwargs for name, kwargs in seen.items() if kwargs}
    assert {"AutoModelForCausalLM", "AutoTokenizer"} <= set(called), called  # the spies saw the loads
    for name, kwargs in called.items():
        assert not kwargs.get("trust_remote_code", False), (name, kwargs)


def test_no_source_file_switches_remote_code_on():
    hits = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"trust_remote_code\s*=\s*True", line.split("#", 1)[0])
    ]
    assert not hits, hits


# ------------------------------------------------------------------ (c) the report escapes every text
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(2)>'


def test_the_report_escapes_outputs_items_and_names(tmp_path):
    from dataclasses import dataclass, field

    from ftlab.report.html import render_report
    from ftlab.store import Store

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
        metric: str = "contains"
        n: int = 2
        stderr: float = 0.1
        higher_is_better: bool = True
        items: list = field(default_factory=list)

    store = Store(tmp_path / "s.db")
    arm = f"evil{IMG}"
    suite = f"facts{SCRIPT}"
    config = {"name": SCRIPT, "stages": [{"name": IMG, "targets": ["t"]}], "retained": [suite], "base": IMG}
    store.start_run("r1", SCRIPT, str(tmp_path), config, seed=0, git_sha=IMG, versions={})
    for name, kind in (("base", "base"), (arm, "train")):
        store.add_arm("r1", name, kind, "full", None, {})
    store.finish_stage("r1", arm, 1, IMG, train_seconds=1.0, trainable_params=5)
    for name, stage, good in (("base", 0, 1.0), (arm, 1, 0.0)):
        items = [
            Item(f"i{k}{SCRIPT}", f"Q{k} {SCRIPT}", f"A{k} {IMG}" if not good else "ok", f"ok {IMG}", good)
            for k in range(2)
        ]
        store.add_result("r1", name, stage, "target", Result("t", 1.0 - good))
        store.add_result("r1", name, stage, "retained", Result(suite, good, items=items))
    store.finish_run("r1")
    page = render_report(store, "r1", tmp_path / "r.html", items_per_arm=2).read_text()
    for payload in (SCRIPT, IMG):
        assert payload not in page
        assert payload in unescape(page)  # shown, as text
    assert "<script" not in page.lower()
    assert all(tag.startswith('<img id="img-') for tag in re.findall(r"<img[^>]*", page))  # only the plots
    bare = re.sub(r'"[^"]*"', '""', page)  # attribute values out (a quote inside one is &quot;)
    assert not re.search(r"<[^>]*\bon\w+\s*=", bare)  # no event-handler attribute in any tag
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "A0 &quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page  # the arm's answer, in the forgotten items
