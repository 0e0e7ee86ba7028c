"""Peak memory of ``ftlab edit scale``, ``lines`` and a 3-way ``merge`` on a ~1.1B-parameter Llama in bf16 shards.

Run: ``python bench/edit_memory.py [--layers 22] [--shard-mb 500] [--keep DIR]``. The model (TinyLlama's shape:
hidden 2048, 22 blocks, MLP 5632, 32 heads with 4 key-value heads, vocabulary 32000, untied head; 1.1B parameters)
is built from the config on the meta device and written tensor by tensor with random bf16 values, shard by shard, so
this script never holds a model either. Three "fine-tunes" are the base plus small deltas, written the same way.
Each edit runs as its own ``ftlab edit ...`` process; its peak resident memory comes from ``os.wait4``.

Prints one JSON line per edit, ``{"edit", "peak_rss_mb", "model_mb", "seconds", "ratio", "matmul_gflops"}``
(``model_mb``: bytes of one model's safetensors files; ``ratio`` = peak / model; ``matmul_gflops``: the machine's fp32
matmul, measured once before the edits). The goal is ``peak_rss_mb <= 1.5 * model_mb`` for every edit; the exit code
is 1 when an edit misses it or fails. The temporary folder is removed at the end unless ``--keep`` names one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import matmul_gflops  # bench/_machine.py (the script's folder is on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LIMIT = 1.5


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def shapes_of(config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the model, from a model on the meta device (no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_model(folder: Path, shapes: dict, shard_bytes: int, make, config) -> None:
    """Write ``make(key, shape)`` (bf16) into shards of at most ``shard_bytes``, plus index, config and tokenizer."""
    import torch
    from safetensors.torch import save_file

    from ftlab.models import tiny_tokenizer

    folder.mkdir(parents=True)
    groups, used = [[]], 0
    for k, s in shapes.items():
        size = math.prod(s) * 2
        if groups[-1] and used + size > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(k)
        used += size
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: make(k, shapes[k]).to(torch.bfloat16).contiguous() for k in keys}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in keys}
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def make_models(root: Path, layers: int, shard_bytes: int) -> list[Path]:
    """The base and three fine-tunes (base + a delta of about 1% of the weights: a shifted copy of them, scaled).

    Values come from one pool of 32M normal draws, each tensor a slice of it at its own offset (tuned: the same
    slice of the shifted pool): drawing 1.1B normal numbers per model takes minutes on two cores, and the edits'
    memory does not depend on the values.
    """
    import torch

    config = llama_config(layers)
    shapes = shapes_of(config)
    pool = (0.02 * torch.randn(1 << 25, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    size = pool.numel()

    def values(source: torch.Tensor, i: int, key: str, shape) -> torch.Tensor:
        if key.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        n = math.prod(shape)
        if n <= size:
            start = (7919 * i) % (size - n + 1)
            return source[start : start + n].view(shape).clone()  # its own storage: shards may not share memory
        return source.repeat(-(-n // size))[:n].view(shape)

    index = {k: i for i, k in enumerate(shapes)}
    folders = [root / "base"]
    write_model(folders[0], shapes, shard_bytes, lambda k, s: values(pool, index[k], k, s), config)
    for t in (1, 2, 3):
        shifted = pool + 0.01 * pool.roll(97 * t)  # entry by entry: the base value plus 1% of another one
        folders.append(root / f"tuned{t}")
        write_model(folders[-1], shapes, shard_bytes, lambda k, s, src=shifted: values(src, index[k], k, s), config)
    return folders


def run_edit(args: list[str]) -> tuple[float, float, int]:
    """Run ``ftlab edit ...`` in a child process; ``(peak RSS in MiB, seconds, exit code)``."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ftlab", "edit", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, time.perf_counter() - start, proc.returncode  # ru_maxrss is in KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="Transformer blocks (22: 1.1B parameters).")
    parser.add_argument("--shard-mb", type=int, default=500, help="Shard size of the generated checkpoints.")
    parser.add_argument("--keep", default=None, help="Build in this folder and keep it (default: a temp folder).")
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: build the models into this folder
    args = parser.parse_args()
    if args.build:
        make_models(Path(args.build), args.layers, args.shard_mb << 20)
        return 0

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ftlab-edit-memory-"))
    ok = True
    try:
        t0 = time.perf_counter()
        # Built in a child process: a child forked from a large parent counts the parent's pages in its peak RSS,
        # so this process stays small (no torch) until the edits have run.
        build = [sys.executable, __file__, "--build", str(root), "--layers", str(args.layers)]
        subprocess.run([*build, "--shard-mb", str(args.shard_mb)], check=True, stdout=subprocess.DEVNULL)
        base, t1, t2, t3 = (root / n for n in ("base", "tuned1", "tuned2", "tuned3"))
        model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        print(f"built 4 models of {model_bytes / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        edits = {
            "scale": ["scale", "--base", base, "--tuned", t1, "--factor", "0.5"],
            "lines": ["lines", "--base", base, "--tuned", t1, "--alpha", "0.5"],
            "merge": ["merge", "--base", base, "--tuned", t1, "--tuned", t2, "--tuned", t3],
        }
        gflops = round(matmul_gflops(), 1)
        for name, cmd in edits.items():
            out = root / f"out-{name}"
            peak, seconds, code = run_edit([str(c) for c in cmd] + ["--out", str(out)])
            model_mb = model_bytes / 2**20
            row = {"edit": name, "peak_rss_mb": round(peak, 1), "model_mb": round(model_mb, 1),
                   "seconds": round(seconds, 1), "ratio": round(peak / model_mb, 3),
                   "matmul_gflops": gflops}  # fmt: skip
            if code != 0:
                row["exit_code"] = code
            print(json.dumps(row), flush=True)
            ok = ok and code == 0 and peak <= LIMIT * model_mb
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
