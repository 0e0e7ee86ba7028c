"""Training throughput: ftlab's SFT path beside TRL's SFTTrainer (and TRL + PEFT for LoRA), on the same data.

Run: ``python bench/throughput.py [--steps 6] [--warmup 2] [--rounds 2] [--batch-size 8] [--quick] [--ablate]``.

Every configuration trains the embedded model (smollm2-135m-instruct) in its own subprocess (so ``peak_rss_mb`` is its
own) on the same tokenized records, with the same batch size, number of optimizer steps, seed, learning rate (ftlab's
default 1e-4, constant) and gradient clipping. The rounds are interleaved (A B C .. A B C ..) and the best round of
each configuration is reported, since the machine may be shared; the fp32 matmul speed is measured right before
every subprocess and each row is compared with the one measured next to it.

Configurations (system/method):

* ``trl/full``, ``trl/lora``: TRL's SFTTrainer in fp32 without activation checkpointing (what ftlab ran before its
  speed switches; TRL + PEFT ``LoraConfig`` for LoRA, with ftlab's LoRA defaults r=16, alpha=32, all-linear), random
  batches padded per batch, TRL's default optimizer (fused AdamW).
* ``trl-defaults/full``: SFTConfig's own defaults untouched (bf16 autocast and activation checkpointing on).
* ``ftlab/full``, ``ftlab/lora``: ``ftlab.train.sft.train_sft`` (the path ``ftlab train`` and ``ftlab run`` take) with
  ftlab's defaults (``train.bf16: auto``, ``train.group_by_length: true``).
* with ``--ablate``: ``ftlab-bf16only/{full,lora}`` (group_by_length off) and ``ftlab-grouponly/{full,lora}``
  (bf16 off), to say which switch bought what; ``trl-seed1/{full,lora}``: TRL with another data order (seed 1), the
  spread that batch order alone puts on ``final_loss``; ``ftlab/lift`` and ``ftlab/sparse`` to check that the sparse
  methods' selection and optimizer do not dominate a step (``setup_s`` is the time before the first step: LIFT's
  mask, LT-SFT's first phase).

Data: the invented-capitals training records, the world-knowledge questions with their answers, and passages of the
general-text suite cut into continuations of 1 to 6 sentences: 40 to 350 tokens a record, shuffled with seed 0.

Output, one JSON line per configuration (stdout)::

    {"system", "method", "tokens_per_s", "sec_per_step", "peak_rss_mb", "final_loss", "fraction_of_bound", ...}

* ``tokens_per_s``: real (non-padding) tokens of the timed steps over their wall time (warm-up steps excluded);
  ``cpu_sec_per_step``: the process's CPU time per timed step (steadier than wall time on a crowded machine).
* ``final_loss``: mean token loss (nats, answer tokens only) of the trained model on 32 held-out records (the last
  32 of the shuffled records, never trained on), in fp32, the same records for every configuration;
  ``train_records_loss``: the same on the first 32 training records (which of them a configuration's 8 batches
  happened to contain moves this one: length grouping picks other batches than a random order); ``train_loss``: the
  logged loss of every step.
* ``fraction_of_bound``: achieved model FLOP/s over the fp32 matmul FLOP/s measured next to the row. Model FLOPs per
  real token: full fine-tuning ``6·N`` (N: every parameter); LoRA ``4·N + 6·N_trainable`` (forward and input
  gradients through the frozen weights, weight gradients only for the adapters). Attention scores and activation
  recomputation are not counted. A row above 1.0 is possible under bf16, whose matmuls outrun fp32's.

Then one line ``{"system": "summary", ...}`` with the ratios ftlab/TRL and the loss differences, and one
``{"system": "machine", ...}`` line (CPU, threads, fp32 and bf16 matmul GFLOP/s, versions). Loss tolerance: ftlab's
``final_loss`` within 0.10 nats of TRL's (the batches differ in order under length grouping, and bf16 rounds;
with ``--ablate`` the ``ftlab-bf16only`` and ``ftlab-grouponly`` rows say which switch moved it).
Default settings take about 15 minutes on a 2-core CPU at 150 GFLOP/s; ``--quick`` (1 round, 2+1 steps) a quarter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time

from _machine import matmul_gflops  # bench/_machine.py (the script's folder is on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTLAB_PROGRESS", "0")

MODEL = "smollm2-135m-instruct"
LR = 1e-4
LOSS_TOLERANCE = 0.10
EVAL_RECORDS = 32
CONFIGS = ["trl/full", "ftlab/full", "trl/lora", "ftlab/lora", "trl-defaults/full"]
ABLATIONS = [
    "ftlab-bf16only/full", "ftlab-grouponly/full", "ftlab-bf16only/lora", "ftlab-grouponly/lora", "trl-seed1/full",
    "trl-seed1/lora", "ftlab/lift", "ftlab/sparse",
]  # fmt: skip


def bench_records() -> list[dict]:
    """Prompt/completion records of varied length, the same for every configuration."""
    from ftlab.evals import load_suite
    from ftlab.tasks import fictional_capitals_train_records

    records = list(fictional_capitals_train_records())
    records += [{"prompt": i["prompt"], "completion": str(i["answer"])} for i in load_suite("world-knowledge").items]
    rng = random.Random(0)
    for item in load_suite("general-text").items:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", item["text"]) if s]
        i = 0
        while i + 2 <= len(sentences):
            k = rng.randint(1, 6)
            records.append(
                {"prompt": "Continue the text: " + sentences[i], "completion": " ".join(sentences[i + 1 : i + 1 + k])}
            )
            i += 1 + k
    rng.shuffle(records)
    return records


class StepTimer:
    """Trainer callback: the wall clock and the real tokens seen at the end of every optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self) -> None:
                self.ends: list[float] = []
                self.cpu: list[float] = []
                self.tokens: list[int] = []
                self.begin = None

            def on_step_begin(self, args, state, control, **kw):
                if self.begin is None:
                    self.begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.ends.append(time.perf_counter())
                self.cpu.append(time.process_time())
                self.tokens.append(int(state.num_input_tokens_seen))

        return _Timer()


def eval_loss(model, dataset) -> float:
    """Mean answer-token loss of ``model`` on the first EVAL_RECORDS rows, fp32, batches of 8, no grad."""
    import torch

    model.eval()
    total, count = 0.0, 0
    rows = [dataset[i] for i in range(min(EVAL_RECORDS, len(dataset)))]
    with torch.no_grad():
        for s in range(0, len(rows), 8):
            batch = rows[s : s + 8]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, row in enumerate(batch):
                n = len(row["input_ids"])
                ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            lp = logits[:, :-1].log_softmax(-1)
            tgt = labels[:, 1:]
            keep = tgt != -100
            nll = -lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total += float(nll[keep].sum())
            count += int(keep.sum())
    return total / max(count, 1)


def run_child(config: str, steps: int, warmup: int, batch_size: int) -> dict:
    """Train one configuration in this process and return its row."""
    import torch
    from transformers import set_seed

    from ftlab.data.tokenize import sft_dataset
    from ftlab.models import load_model

    system, method = config.split("/")
    model, tok = load_model(MODEL)
    n_params = sum(p.numel() for p in model.parameters())
    records = bench_records()
    dataset = sft_dataset(records[:-EVAL_RECORDS], "completion", tok, max_length=1024)
    held_out = sft_dataset(records[-EVAL_RECORDS:], "completion", tok, max_length=1024)
    total_steps = warmup + steps
    timer = StepTimer()
    work = tempfile.mkdtemp(prefix="ftlab-bench-")
    set_seed(0)
    t0 = time.perf_counter()
    settings: dict = {}
    if system.startswith("trl"):
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        kwargs = dict(
            output_dir=work, per_device_train_batch_size=batch_size, max_steps=total_steps, seed=0, data_seed=0,
            learning_rate=LR, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
            include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
        )  # fmt: skip
        if system in ("trl", "trl-seed1"):
            kwargs.update(bf16=False, gradient_checkpointing=False)
        if system == "trl-seed1":  # another random order of the same records: how far order alone moves the loss
            kwargs.update(seed=1, data_seed=1)
        args = SFTConfig(**kwargs)
        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[timer],
            peft_config=peft if method == "lora" else None,
        )  # fmt: skip
        settings = {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing, "optim": str(args.optim)}
        trainer.train()
        trained, history = trainer.model, trainer.state.log_history
    else:
        from ftlab.config import MethodConfig, TrainConfig
        from ftlab.train.sft import train_sft
        from ftlab.train.trainer_args import resolve_bf16

        extra = {"ftlab-bf16only": {"group_by_length": False}, "ftlab-grouponly": {"bf16": False}}.get(system, {})
        params = {"sparse": {"full_ft_steps": 2}, "lift": {"svd": "lowrank"}}.get(method, {})
        train = TrainConfig(max_steps=total_steps, batch_size=batch_size, lr=LR, logging_steps=1, seed=0, **extra)
        settings = {"bf16": resolve_bf16(train, model), "group_by_length": train.group_by_length}
        result = train_sft(model, tok, dataset, MethodConfig(method, params), train, work, callbacks=[timer])
        trained, history = result.model, result.log_history
    setup_s = (timer.begin or t0) - t0
    n_trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad) if method != "full" else n_params
    final = eval_loss(trained, held_out)
    seen = eval_loss(trained, dataset)
    ends, tokens = timer.ends, timer.tokens
    timed = ends[-1] - ends[warmup - 1] if warmup else ends[-1] - timer.begin
    cpu = timer.cpu[-1] - timer.cpu[warmup - 1] if warmup else None
    toks = tokens[-1] - (tokens[warmup - 1] if warmup else 0)
    flops_per_token = 6 * n_params if method == "full" else 4 * n_params + 6 * n_trainable
    return {
        "system": system,
        "method": method,
        "tokens_per_s": toks / timed,
        "sec_per_step": timed / steps,
        "cpu_sec_per_step": cpu / steps if cpu is not None else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": final,
        "train_records_loss": seen,
        "train_loss": [round(h["loss"], 4) for h in history if "loss" in h],
        "setup_s": setup_s,
        "flops_per_token": flops_per_token,
        "trainable": n_trainable,
        "timed_tokens": toks,
        "threads": torch.get_num_threads(),
        "settings": settings,
    }


def sparse_check() -> dict:
    """LIFT's mask step and the sparse AdamW step beside a fused AdamW step over every parameter, on the embedded
    model (random gradients; no forward or backward). Compare with a full step's ``sec_per_step``."""
    import torch

    from ftlab.config import TrainConfig
    from ftlab.methods import PlanContext, get_method, method_config
    from ftlab.models import load_model

    model, tok = load_model(MODEL)
    cfg = method_config("lift", {"lora_rank": 16, "filter_rank": 16, "svd": "lowrank"})
    train = TrainConfig(lr=LR)
    t0 = time.perf_counter()
    plan = get_method("lift").plan(model, cfg, PlanContext(stage=0, seed=0, train_dataset=None, tokenizer=tok,
                                                           train_cfg=train, train_phase=None))  # fmt: skip
    mask_s = time.perf_counter() - t0  # one selection of every matrix (LIFT repeats it every update_interval steps)
    params = dict(model.named_parameters())
    for name in plan.trainable:
        params[name].grad = torch.randn_like(params[name]) * 1e-3
    sparse = plan.optimizer_factory(model, train)

    def best(fn, n=3):
        out = float("inf")
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t)
        return out

    sparse_s = best(sparse.step)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = torch.randn_like(p) * 1e-3
    fused = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    fused_s = best(fused.step)
    return {"system": "sparse-check", "lift_mask_s": round(mask_s, 3), "sparse_adam_step_s": round(sparse_s, 3),
            "adamw_fused_step_s": round(fused_s, 3), "matmul_gflops": round(matmul_gflops(), 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best is reported")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="1 round, 1 warm-up and 2 timed steps")
    parser.add_argument("--ablate", action="store_true", help="also the one-switch ablations, lift and sparse")
    parser.add_argument("--only", default="", help="comma-separated configurations to run (system/method)")
    parser.add_argument("--sparse-check", action="store_true", help="only time LIFT's mask step and sparse AdamW")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.steps = 1, 1, 2
    if args.child:
        print(json.dumps(run_child(args.child, args.steps, args.warmup, args.batch_size)))
        return
    if args.sparse_check:
        print(json.dumps(sparse_check()))
        return
    import torch

    configs = [c for c in args.only.split(",") if c] or CONFIGS + (ABLATIONS if args.ablate else [])
    best: dict[str, dict] = {}
    for rnd in range(args.rounds):
        for config in configs:
            gflops = matmul_gflops()
            cmd = [sys.executable, __file__, "--child", config, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]  # fmt: skip
            print(f"round {rnd + 1}/{args.rounds}: {config} (matmul {gflops:.0f} GFLOP/s)", file=sys.stderr)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{config} failed")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["matmul_gflops"] = gflops
            row["fraction_of_bound"] = row["flops_per_token"] * row["tokens_per_s"] / (gflops * 1e9)
            row["round"] = rnd + 1
            print(f"  {row['tokens_per_s']:.0f} tok/s, {row['sec_per_step']:.2f} s/step", file=sys.stderr)
            print("progress " + json.dumps(row), file=sys.stderr, flush=True)
            if config not in best or row["tokens_per_s"] > best[config]["tokens_per_s"]:
                best[config] = row
    for config in configs:
        row = best[config]
        for key in ("tokens_per_s", "sec_per_step", "peak_rss_mb", "final_loss", "train_records_loss",
                    "fraction_of_bound", "setup_s"):  # fmt: skip
            row[key] = round(row[key], 4 if key in ("final_loss", "train_records_loss", "fraction_of_bound") else 2)
        row["matmul_gflops"] = round(row["matmul_gflops"], 1)
        print(json.dumps(row))
    summary: dict = {"system": "summary", "loss_tolerance": LOSS_TOLERANCE}
    for ours, theirs, name in [("ftlab/full", "trl/full", "full"), ("ftlab/lora", "trl/lora", "lora"),
                               ("ftlab/full", "trl-defaults/full", "full_vs_trl_defaults")]:  # fmt: skip
        if ours in best and theirs in best:
            a, b = best[ours], best[theirs]
            loss_diff = a["final_loss"] - b["final_loss"]
            summary[name] = {
                "speedup": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
                "loss_diff": round(loss_diff, 4),
                "loss_within_tolerance": abs(loss_diff) <= LOSS_TOLERANCE,
            }
    for method in ("full", "lora"):  # how far another random order alone moves TRL's own final loss
        if f"trl/{method}" in best and f"trl-seed1/{method}" in best:
            spread = best[f"trl-seed1/{method}"]["final_loss"] - best[f"trl/{method}"]["final_loss"]
            summary[f"order_spread_{method}"] = round(spread, 4)
    print(json.dumps(summary))
    import accelerate
    import peft
    import transformers
    import trl

    print(
        json.dumps(
            {
                "system": "machine",
                "cpu": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "matmul_fp32_gflops": round(matmul_gflops(), 1),
                "matmul_bf16_gflops": round(matmul_gflops("bf16"), 1),
                "cuda": torch.cuda.is_available(),
                "steps": args.steps,
                "warmup": args.warmup,
                "rounds": args.rounds,
                "batch_size": args.batch_size,
                "versions": {m.__name__: m.__version__ for m in (torch, transformers, trl, peft, accelerate)},
            }
        )
    )


if __name__ == "__main__":
    main()
