"""Two arms at scale: full fine-tuning in bf16 and QLoRA (LoRA on a 4-bit NF4 base), on a Llama-shaped model.

The model is built in code with random weights (``--size large``: ~1B parameters, Llama-3.2-1B's shape with the
tiny character tokenizer's vocabulary; ``--size small``: ~13M), saved in bf16 shards, and loaded back by each arm
through ``ftlab.models.load_model`` with the arm's ``ModelSettings``; each arm trains a few steps on synthetic
records through ``ftlab.train.sft.train_sft`` (the path ``ftlab train`` and ``ftlab run`` take; no evaluation).

Run::

    python bench/gpu_scale.py                                   # GPU, ~1B model (bench/gpu_check.sh)
    python bench/gpu_scale.py --size small --device cpu         # the same code on CPU, under a minute

Output, on stdout, one JSON line per arm::

    {"arm", "tokens_per_s", "mfu", "peak_gpu_mem_mb", "seconds", "steps", "tokens", "planned_mb", "params"}

- ``tokens_per_s``: training tokens per second over the steps after the first (the first pays for kernel
  selection and allocator growth); every record is exactly ``--seq`` tokens, so tokens = steps x batch x seq.
- ``mfu``: 6 x N x tokens_per_s / peak, N the model's parameters (the usual 6N FLOPs per token; attention's own
  FLOPs are left out, and a QLoRA step does no weight-gradient matmuls for the frozen base, so its real share is
  about 2/3 of the figure). The peak (dense bf16 FLOP/s) is printed first, as ``{"peak_flops", "peak_source"}``;
  on CPU there is none unless ``--peak-flops`` gives one, and ``mfu`` is null.
- ``peak_gpu_mem_mb``: ``torch.cuda.max_memory_allocated`` during the arm (null on CPU).
- ``planned_mb``: the total of ftlab's memory plan for the arm (``ftlab.memory``), to compare with the peak.
- ``seconds``: the arm's wall time, loading included.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# dense bf16 peak FLOP/s by GPU name (vendor data sheets, without sparsity)
PEAKS = {
    "H200": 989e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}
SIZES = {
    # Llama-3.2-1B's block shape: 16 blocks of 2048 (32 heads, 8 KV heads), MLP 8192
    "large": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, heads=32, kv=8),
    "small": dict(hidden_size=384, num_hidden_layers=6, intermediate_size=1536, heads=6, kv=2),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, heads=4, kv=2),  # the test's
}
DEFAULTS = {
    "large": dict(batch=8, seq=1024, steps=12),
    "small": dict(batch=2, seq=64, steps=3),
    "tiny": dict(batch=2, seq=32, steps=2),
}


def peak_flops(device: str, given: float | None) -> tuple[float | None, str]:
    import torch

    if given:
        return given, "--peak-flops"
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAKS.items():
            if key in name:
                return value, f"{name}: dense bf16 data-sheet peak for {key}"
        return None, f"{name}: unknown peak (give --peak-flops)"
    return None, "cpu: no peak (give --peak-flops)"


def build_model(size: str, folder: Path, device: str) -> int:
    """A Llama of the given size with random weights, saved in bf16 (with the tiny tokenizer); returns N."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftlab.models import TINY_CHARS, TINY_SPECIALS, tiny_tokenizer

    s = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(TINY_SPECIALS) + len(TINY_CHARS),
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="500MB")
    tiny_tokenizer().save_pretrained(folder)
    del model
    return n


def synthetic_data(tokenizer, n: int, seq: int):
    """``n`` completion records of exactly ``seq`` tokens each (the tokenizer is character-level)."""
    import random

    from ftlab.data import sft_dataset

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    records = []
    for _ in range(n):  # longer than seq, then cut to exactly seq tokens (the completion's tail is dropped)
        text = "".join(rng.choice(letters) for _ in range(seq + 16))
        records.append({"prompt": text[: seq // 4], "completion": text[seq // 4 :]})
    data = sft_dataset(records, "completion", tokenizer, seq, True)
    lengths = {len(r) for r in data["input_ids"]}
    assert lengths == {seq}, lengths
    return data, seq


class StepClock:
    """Wall time at the end of each optimizer step (the GPU synchronised first)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.tick()

        self.callback = _Callback()
        self.times: list[float] = []

    def tick(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def run_arm(arm: str, folder: Path, args, n_params: int, peak: float | None) -> dict:
    import torch

    from ftlab.config import MethodConfig, TrainConfig
    from ftlab.loading import ModelSettings
    from ftlab.memory import plan_for_model
    from ftlab.models import load_model
    from ftlab.train.sft import train_sft

    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    quant = "4bit" if arm == "qlora" else "none"
    settings = ModelSettings(dtype="bf16", quantization=quant, device_map=args.device)
    method = MethodConfig("lora", {"r": 16, "alpha": 32}) if arm == "qlora" else MethodConfig("full")
    # full: pure bf16 (weights, gradients and AdamW state in bf16); QLoRA: fp32 adapters under bf16 autocast
    train = TrainConfig(
        lr=1e-5 if arm == "full" else 1e-4, max_steps=args.steps, batch_size=args.batch, logging_steps=1000,
        bf16=arm == "qlora", memory_check=False, seed=0,
    )  # fmt: skip
    plan = plan_for_model(str(folder), settings, method.name, method.params, train, args.seq)
    start = time.perf_counter()
    model, tok = load_model(folder, settings=settings)
    data, seq = synthetic_data(tok, args.batch * args.steps, args.seq)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as work:
        from ftlab.train import sft

        real = sft.trainer_inputs

        def with_clock(*a, **k):  # add the step clock to the trainer's callbacks
            inputs = real(*a, **k)
            inputs["callbacks"] = [*inputs["callbacks"], clock.callback]
            return inputs

        sft.trainer_inputs = with_clock
        try:  # the trainer prints its final metrics dict: keep stdout for the JSON lines
            with contextlib.redirect_stdout(sys.stderr):
                result = train_sft(model, tok, data, method, train, work, max_length=seq)
        finally:
            sft.trainer_inputs = real
    seconds = time.perf_counter() - start
    times = clock.times
    tokens_per_step = args.batch * seq
    timed = len(times) - 1
    rate = tokens_per_step * timed / (times[-1] - times[0]) if timed > 0 else None
    row = {
        "arm": arm,
        "tokens_per_s": round(rate, 1) if rate else None,
        "mfu": float(f"{6 * n_params * rate / peak:.4g}") if (rate and peak) else None,
        "peak_gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20) if on_gpu else None,
        "seconds": round(seconds, 1),
        "steps": result.steps,
        "tokens": tokens_per_step * result.steps,
        "planned_mb": round(plan.total / 2**20),
        "params": n_params,
    }
    del model, result
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="large")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--arms", default="full,qlora", help="comma-separated: full, qlora")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (first one untimed)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None, help="tokens per record")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak bf16 FLOP/s for the MFU")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer would otherwise move the model to a GPU
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FTLAB_PROGRESS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)  # a small model on shared cores: threads only contend
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; run with --size small --device cpu", file=sys.stderr)
        return 2
    peak, source = peak_flops(args.device, args.peak_flops)
    print(json.dumps({"peak_flops": peak, "peak_source": source, "size": args.size, "device": args.device}))
    sys.stdout.flush()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"llama-{args.size}"
        t0 = time.perf_counter()
        n = build_model(args.size, folder, "cuda" if args.device.startswith("cuda") else "cpu")
        print(f"built a {n / 1e6:.0f}M-parameter model in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        for arm in args.arms.split(","):
            print(json.dumps(run_arm(arm.strip(), folder, args, n, peak)))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
