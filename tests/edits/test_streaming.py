"""Weight edits streamed over safetensors shards agree with the in-memory edits, keep the dtype, handle tied heads
and LoRA adapter folders, and ``ftlab edit`` uses them without loading a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from ftlab.edits import apply_edit
from ftlab.edits.chunks import kth_smallest
from ftlab.edits.stream import open_checkpoint, stream_edit
from ftlab.models import tiny_model, tiny_tokenizer

N_LAYER = 4


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 2048 entries, so most tensors of the tiny model span several (offsets, seeds, LoRA rows)."""
    monkeypatch.setattr("ftlab.edits.chunks.CHUNK_ELEMENTS", 2048)


def _save(model, folder: Path, shard: str = "60KB") -> Path:
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size=shard)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _perturbed(seed: int, scale: float = 0.05, n_layer: int = N_LAYER):
    model = tiny_model(0, n_layer=n_layer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) < 0.7))
    return model


def _files(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny bf16 base and three perturbed copies, each saved in several shards."""
    root = tmp_path_factory.mktemp("sharded")
    folders = [_save(tiny_model(0, n_layer=N_LAYER), root / "base")]
    folders += [_save(_perturbed(s, 0.05 * s), root / f"tuned{s}") for s in (1, 2, 3)]
    sds = [{k: v.float() for k, v in _files(f).items()} for f in folders]
    return root, folders, sds


CASES = [
    ("scale", {"factor": 0.6}),
    ("scale", {"factor": 1.7}),
    ("lines", {"alpha": 0.3}),
    ("lines", {"alpha": 0.2, "beta": 0.5, "non_block_scale": 1.0}),
    ("merge", {"method": "task_arithmetic"}),
    ("merge", {"method": "ties", "density": 0.3}),
    ("merge", {"method": "ties", "density": 0.5, "lines_beta": 0.5}),
    ("merge", {"method": "task_arithmetic", "lines_beta": 0.4, "lines_alpha": 0.2}),
    ("merge", {"method": "dare", "density": 0.3, "seed": 4}),
    ("merge", {"method": "dare_ties", "density": 0.5}),
    ("reset", {"fraction": 0.4, "how": "random", "seed": 3}),
    ("reset", {"fraction": 0.3, "how": "smallest"}),
    ("reset", {"fraction": 0.5, "how": "layers", "order": "top"}),
    ("half_reset", {"seed": 2}),
]


@pytest.mark.parametrize(("name", "settings"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_streamed_edit_equals_the_in_memory_edit_and_keeps_bf16(shards, tmp_path, name, settings):
    root, folders, sds = shards
    n_tuned = 3 if name == "merge" else 1
    base, tuned = open_checkpoint(folders[0]), [open_checkpoint(f) for f in folders[1 : 1 + n_tuned]]
    info = stream_edit(name, base, tuned, tmp_path / "out", max_shard_bytes=80_000, **settings)
    out = tmp_path / "out"
    assert info["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    streamed = _files(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(streamed) == set(sds[0])
    tuned_sds = sds[1 : 1 + n_tuned]
    expected = apply_edit(name, sds[0], tuned_sds if name == "merge" else tuned_sds[0], **settings)
    moved = 0
    for k, v in streamed.items():
        assert v.dtype == torch.bfloat16, k
        assert torch.equal(v, expected[k].to(torch.bfloat16)), k
        moved += not torch.equal(v.float(), sds[1][k])
    assert moved > 0  # the edit did something (no case is the identity)


def test_kth_smallest_is_exactly_kthvalue_without_holding_the_values():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(1000, generator=gen).abs() for _ in range(5)]
    chunks[2][:300] = 0.0  # many equal values, zeros included
    chunks[3][:50] = chunks[1][7]
    flat = torch.cat(chunks)
    for k in [1, 17, 300, 301, 1500, 2500, 4999, 5000]:
        assert kth_smallest(lambda: ([c] for c in chunks), [k]) == [float(torch.kthvalue(flat, k).values)]
    got = kth_smallest(lambda: ([c, c * 3] for c in chunks), [1234, 4000])  # two series at once, one k each
    assert got == [float(torch.kthvalue(flat, 1234).values), float(torch.kthvalue(flat * 3, 4000).values)]


def test_tied_head_stored_twice_is_edited_once(tmp_path):
    """A head equal to the embedding in every input is edited as the embedding (reset random would differ)."""
    base, tuned = tiny_model(0, n_layer=2), _perturbed(1, n_layer=2)
    for m in (base, tuned):
        with torch.no_grad():
            m.lm_head.weight.copy_(m.model.embed_tokens.weight)
    _save(base, tmp_path / "b", shard="40KB")
    _save(tuned, tmp_path / "t", shard="40KB")
    stream_edit("reset", open_checkpoint(tmp_path / "b"), [open_checkpoint(tmp_path / "t")], tmp_path / "o",
                max_shard_bytes=30_000, fraction=0.5, how="random")  # fmt: skip
    out = _files(tmp_path / "o")
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    b = _files(tmp_path / "b")["model.embed_tokens.weight"]
    assert 0.3 < float((out["model.embed_tokens.weight"] == b).float().mean()) < 0.7


def test_tied_checkpoint_keeps_a_tied_model(tmp_path):
    from ftlab.models import load_model

    models = []
    for i, m in enumerate((tiny_model(0, n_layer=2), _perturbed(1, n_layer=2))):
        m.config.tie_word_embeddings = True
        m.tie_weights()
        models.append(m)
        _save(m, tmp_path / f"m{i}", shard="40KB")
    stream_edit("scale", open_checkpoint(tmp_path / "m0"), [open_checkpoint(tmp_path / "m1")], tmp_path / "o",
                factor=0.5)  # fmt: skip
    assert "lm_head.weight" not in _files(tmp_path / "o")
    edited, _ = load_model(tmp_path / "o")
    assert edited.lm_head.weight.data_ptr() == edited.model.embed_tokens.weight.data_ptr()
    b, t = (m.model.embed_tokens.weight.float() for m in models)
    torch.testing.assert_close(edited.model.embed_tokens.weight, ((b + t) / 2).to(torch.bfloat16).float())


def test_graft_mask_from_file_or_dict(shards, tmp_path):
    from safetensors.torch import save_file

    _, folders, sds = shards
    gen = torch.Generator().manual_seed(0)
    mask = {k: torch.rand(v.shape, generator=gen) < 0.1 for k, v in sds[0].items() if ".mlp." in k}
    save_file(mask, str(tmp_path / "mask.safetensors"))
    expected = apply_edit("graft", sds[0], sds[1], mask=mask)
    for i, m in enumerate((mask, tmp_path / "mask.safetensors")):
        stream_edit("graft", open_checkpoint(folders[0]), [open_checkpoint(folders[1])], tmp_path / f"g{i}", mask=m)
        out = _files(tmp_path / f"g{i}")
        assert all(torch.equal(out[k], expected[k].to(torch.bfloat16)) for k in out)
    k = next(iter(mask))
    assert torch.equal(out[k][~mask[k]].float(), sds[0][k][~mask[k]])
    assert torch.equal(out[k][mask[k]].float(), sds[1][k][mask[k]])


def test_checkpoints_that_do_not_fit_and_bad_settings_write_nothing(shards, tmp_path):
    _, folders, _ = shards
    other = _save(tiny_model(0, n_layer=2), tmp_path / "two-layers")
    with pytest.raises(ValueError, match="differ in keys"):
        stream_edit("scale", open_checkpoint(folders[0]), [open_checkpoint(other)], tmp_path / "o", factor=1.0)
    with pytest.raises(ValueError, match="fraction must be in"):
        stream_edit("reset", open_checkpoint(folders[0]), [open_checkpoint(folders[1])], tmp_path / "o", fraction=2)
    assert not (tmp_path / "o").exists()
    assert open_checkpoint("tiny-test") is None


@pytest.fixture(scope="module")
def adapter(shards):
    """A LoRA adapter (attention, MLP and the embedding; rsLoRA; non-zero B) on the sharded base."""
    from peft import LoraConfig, get_peft_model

    root, folders, _ = shards
    from ftlab.models import load_model

    model, _ = load_model(folders[0])
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj", "embed_tokens"])
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "lora_embedding" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(root / "adapter")
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(folders[0])
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    return root / "adapter"


def test_adapter_folder_streams_as_its_merged_model(shards, adapter, tmp_path):
    from ftlab.models import load_model, state_dict_fp32

    _, folders, sds = shards
    merged = state_dict_fp32(load_model(adapter)[0])
    c = open_checkpoint(adapter)
    assert c is not None and {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"} <= set(c.lora)
    for k in sds[0]:
        torch.testing.assert_close(c.read(k), merged[k], rtol=0, atol=1e-6)
    assert not torch.equal(
        c.read("model.layers.1.mlp.down_proj.weight"), sds[0]["model.layers.1.mlp.down_proj.weight"]
    )
    stream_edit("scale", open_checkpoint(folders[0]), [c], tmp_path / "o", factor=1.0)
    out = _files(tmp_path / "o")
    for k, v in out.items():
        assert v.dtype == torch.bfloat16
        torch.testing.assert_close(v.float(), merged[k], rtol=1e-2, atol=1e-6)


runner = CliRunner()


def test_cli_edits_stream_without_loading_models(shards, tmp_path, monkeypatch):
    from ftlab.cli import app

    def refuse(*args, **kwargs):
        raise AssertionError("the streaming path must not load a model")

    monkeypatch.setattr("ftlab.cli.common.load_model", refuse, raising=False)
    monkeypatch.setattr("ftlab.models.load_model", refuse)
    _, folders, sds = shards
    b, t1, t2 = (str(f) for f in folders[:3])
    res = runner.invoke(
        app, ["edit", "merge", "--base", b, "--tuned", t1, "--tuned", t2, "--out", str(tmp_path / "m")]
    )
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "m" / "ftlab_edit.json").read_text())
    assert info["streamed"] is True and info["edit"] == "merge"
    expected = apply_edit("merge", sds[0], sds[1:3])
    out = _files(tmp_path / "m")
    assert all(torch.equal(out[k], expected[k].to(torch.bfloat16)) for k in expected)
    res = runner.invoke(
        app, ["edit", "reset", "--base", b, "--tuned", t1, "--fraction", "3", "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 2 and "fraction must be in [0, 1]" in res.output


def test_run_sweep_streams_from_the_saved_arm_and_restores_it(shards, monkeypatch):
    """The repair sweep edits the arm's saved checkpoint shard by shard (no base model loaded) and puts the tuned
    weights back afterwards."""
    from types import SimpleNamespace

    from ftlab.models import load_model, state_dict_fp32
    from ftlab.recipes import run as run_mod
    from ftlab.recipes.experiment import ArmConfig

    _, folders, sds = shards
    model, tok = load_model(folders[1])
    before = state_dict_fp32(model)
    seen: dict[str, dict] = {}
    ev = SimpleNamespace(
        missing=lambda *a, **k: True, run=lambda m, t, name, n, **k: seen.update({name: state_dict_fp32(m)})
    )
    store = SimpleNamespace(add_arm=lambda *a, **k: None)

    def refuse(*args, **kwargs):
        raise AssertionError("the streamed sweep loads no model")

    monkeypatch.setattr(run_mod, "load_model", refuse)
    arm = ArmConfig(name="full", post={"scale": [0.5], "reset": {"fraction": [0.3], "how": ["smallest"]}})
    cfg = SimpleNamespace(stages=[None], base=str(folders[0]), load=None)
    run_mod.run_sweep(cfg, arm, store, "run", ev, model, tok, folders[1])
    assert len(seen) == 2
    for (name, edit, settings), got in zip(run_mod.sweep_points(arm), seen.values(), strict=True):
        expected = apply_edit(edit, sds[0], sds[1], **settings)
        assert all(torch.equal(got[k], expected[k].to(torch.bfloat16).float()) for k in expected), name
    after = state_dict_fp32(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list(folders[1].parent.glob(".*sweep*"))


def test_diff_folder_streams_as_its_tuned_model(shards, tmp_path):
    """An ftlab diff folder (sparse and dense entries on the sharded base) reads as the tuned weights, and an edit of
    it keeps the diff's dtype (fp32 here) and equals the in-memory edit."""
    from ftlab.diffs import read_meta, save_diff

    _, folders, sds = shards
    tuned = {k: v.clone() for k, v in sds[0].items()}
    tuned["model.layers.1.mlp.up_proj.weight"].view(-1)[::97] += 0.5  # a few entries: stored sparse
    tuned["model.layers.2.self_attn.q_proj.weight"] += 0.01  # every entry: stored dense
    save_diff(str(folders[0]), tuned, tmp_path / "diff", tokenizer=tiny_tokenizer())
    stored = {row["stored"] for row in read_meta(tmp_path / "diff")["tensors"].values()}
    assert stored == {"sparse", "dense"}
    c = open_checkpoint(tmp_path / "diff")
    assert c is not None and all(torch.equal(c.read(k), tuned[k]) for k in tuned)
    stream_edit("scale", open_checkpoint(folders[0]), [c], tmp_path / "o", max_shard_bytes=100_000, factor=0.5)
    out = _files(tmp_path / "o")
    expected = apply_edit("scale", sds[0], tuned, factor=0.5)
    assert all(out[k].dtype == torch.float32 and torch.equal(out[k], expected[k]) for k in expected)
