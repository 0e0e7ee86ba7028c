"""Benchmark every registered method on the embedded model, against plain TRL and plain PEFT, in one run.

Run (12-18 minutes on a shared 2-core CPU box)::

    HF_HUB_OFFLINE=1 python bench/methods.py               # one JSON line per row on stdout
    HF_HUB_OFFLINE=1 python bench/methods.py --rows trl-full,full,hft --rounds 2

Rows: ``trl-full`` (TRL's SFTTrainer on the bare model, no ftlab code in the loop), ``peft-lora`` (plain
``peft.get_peft_model`` + SFTTrainer), and every ftlab method through ``ftlab.train.sft.train_sft``. Every row uses
the same tokenized data (64 records of ~85 tokens, batch 1), learning rate, seed and trainer arguments (ftlab's:
fused AdamW, no activation checkpointing; the plain rows spell them out by hand).

How it measures:
- each run is a fresh subprocess with torch on one thread, so ``peak_rss_mb`` (max RSS) is the row's own;
- rows run in groups of three *at the same time* (``trl-full, full, hft``; ``lift, sparse, freeze``;
  ``locft, lora, peft-lora``; ``hft-embed``), so the rows that are compared with each other share the machine's
  state: on a shared box a thread's speed moves by up to 40% within minutes (a busy sibling hyperthread, other
  processes);
- per-step times come from a TrainerCallback, ``on_step_begin`` to ``on_step_end`` (forward, backward, clipping,
  optimizer step), pooled over the row's runs after leaving out each run's first ``--warmup`` steps;
- the clock is the process CPU time (``--clock cpu``; wall time mostly measures the other processes there), and
  ``sec_per_step`` is the lower quartile of the pooled steps: interference only ever adds time.
  ``median_sec_per_step`` and ``wall_sec_per_step`` (median) are reported too;
- up to 3 rounds, alternating the group order; a round projected to end past ``--budget-s`` is not started.

Settings of the method rows: LIFT uses ``lora_rank = filter_rank = 16``, the budget of the ``lora``/``peft-lora``
rows (r = 16), so its trainable count equals theirs, and the randomised SVD (``svd: lowrank``) to keep planning
short; ``sparse`` runs 3 phase-1 steps (not timed); the others use their defaults. ``hft`` keeps SmolLM2's tied
embedding frozen (its default on tied models); ``hft-embed`` trains it, as the paper does with untied ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "full": {},
    "hft": {},  # a tied embedding (SmolLM2's) stays frozen by default
    "hft-embed": {"train_embeddings": True},  # HFT with the tied embedding/head trained, the paper's untied default
    "lift": {"lora_rank": 16, "filter_rank": 16, "svd": "lowrank"},
    "sparse": {"full_ft_steps": 3},
    "freeze": {},
    "locft": {},
    "lora": {"r": 16, "alpha": 32},
}
ROW_METHOD = {"hft-embed": "hft"}  # rows that run a registered method under another name
ROWS = ["trl-full", "full", "hft", "lift", "sparse", "freeze", "locft", "lora", "peft-lora", "hft-embed"]


def records(n: int = 64) -> list[dict[str, str]]:
    """Deterministic completion records of similar length (about 85 tokens each with the chat template)."""
    return [
        {
            "prompt": f"Tell me about item number {i} in the catalogue of the city library.",
            "completion": f"Item {i} is a book about the history of region {i * 7 % 13}, written in {1800 + i} by an "
            f"author from town {i % 5}. It has {i % 300 + 100} pages.",
        }
        for i in range(n)
    ]


def step_timer():
    """A TrainerCallback that records the wall and CPU seconds of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._wall, self._cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.wall.append(time.perf_counter() - self._wall)
            self.cpu.append(time.process_time() - self._cpu)

    return StepTimer()


def trl_args(out: str, steps: int, batch_size: int, lr: float):
    """SFTConfig with the same values ftlab's ``sft_config`` sets, written out by hand (no ftlab code)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=out,
        learning_rate=lr,
        num_train_epochs=1.0,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=0,
        data_seed=0,
        logging_steps=10**6,
        save_strategy="no",
        save_total_limit=1,
        bf16=False,
        activation_checkpointing=False,  # ftlab's default (TRL's is on); the same loop for every row
        report_to="none",
        dataloader_num_workers=0,
        max_length=None,
        packing=False,
        disable_tqdm=False,
    )


def state_bytes(optimizer: Any) -> int:
    """Bytes of per-parameter optimizer state tensors (unwrapping accelerate's optimizer wrapper)."""
    import torch

    opt = getattr(optimizer, "optimizer", optimizer)
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def run_plain(row: str, model: Any, tok: Any, dataset: Any, timer: Any, args: argparse.Namespace, out: str):
    """trl-full / peft-lora: the libraries alone."""
    from trl import SFTTrainer

    if row == "peft-lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    trainer = SFTTrainer(
        model=model,
        args=trl_args(out, args.steps, args.batch_size, args.lr),
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, state_bytes(trainer.optimizer)


def run_ftlab(row: str, model: Any, tok: Any, dataset: Any, timer: Any, args: argparse.Namespace, out: str):
    """An ftlab method through the shared SFT adapter."""
    from ftlab.config import MethodConfig, TrainConfig
    from ftlab.train.sft import train_sft

    train = TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=args.batch_size, logging_steps=10**6, seed=0)
    result = train_sft(
        model, tok, dataset, MethodConfig(ROW_METHOD.get(row, row), METHOD_PARAMS[row]), train, out, callbacks=[timer]
    )
    return result.trainable_params, result.optimizer_state_bytes


def worker(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run of one row in this process; returns the raw measurements."""
    import torch

    torch.set_num_threads(args.threads)
    from ftlab.data import sft_dataset
    from ftlab.models import load_model

    model, tok = load_model(MODEL, device="cpu")
    dataset = sft_dataset(records(), "completion", tok, 256)
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        run = run_plain if row in ("trl-full", "peft-lora") else run_ftlab
        trainable, opt_bytes = run(row, model, tok, dataset, timer, args, out)
    return {
        "method": row,
        "cpu": timer.cpu,
        "wall": timer.wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "optimizer_state_bytes": opt_bytes,
        "trainable_params": trainable,
    }


def run_group(rows: list[str], args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Run ``worker(row)`` for every row at the same time, each in a fresh interpreter; parse their result lines."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "FTLAB_PROGRESS": "0"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # what importing ftlab sets; here before torch starts, for every row alike
    procs = []
    for row in rows:
        cmd = [sys.executable, __file__, "--worker", row, "--steps", str(args.steps)]
        cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads), "--lr", str(args.lr)]
        out, err = tmp / f"{row}.out", tmp / f"{row}.err"  # files, not pipes: a full pipe would stall a worker
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append((row, out, err, subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)))
    results = []
    for row, out, err, proc in procs:
        code = proc.wait()
        lines = [line for line in out.read_text().splitlines() if line.startswith("RESULT ")]
        if code != 0 or not lines:
            sys.stderr.write(err.read_text()[-4000:])
            raise RuntimeError(f"bench worker for {row!r} failed (exit {code})")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One JSON row from every run of a method: step-time quantiles over the post-warm-up steps of all runs."""
    cpu = [t for r in runs for t in r["cpu"][args.warmup :]]
    wall = [t for r in runs for t in r["wall"][args.warmup :]]
    timed = sorted(cpu if args.clock == "cpu" else wall)
    return {
        "method": runs[0]["method"],
        "sec_per_step": round(statistics.quantiles(timed, n=4)[0], 4),
        "median_sec_per_step": round(statistics.median(timed), 4),
        "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
        "optimizer_state_bytes": runs[-1]["optimizer_state_bytes"],
        "trainable_params": runs[-1]["trainable_params"],
        "wall_sec_per_step": round(statistics.median(wall), 4),
        "timed_steps": len(timed),
        "clock": args.clock,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="leading steps of each run left out of the timing")
    parser.add_argument("--rounds", type=int, default=3, help="runs per row, interleaved across rows")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each run")
    parser.add_argument("--group", type=int, default=3, help="rows run at the same time (in --rows order)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--budget-s", type=float, default=1080, help="start no round projected to end past this")
    parser.add_argument("--raw", help="also write every run's per-step times to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
    groups = [rows[i : i + args.group] for i in range(0, len(rows), args.group)]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            if i and (time.time() - t0) * (i + 1) / i > args.budget_s:
                print(f"skipping rounds {i + 1}-{args.rounds}: over the time budget", file=sys.stderr, flush=True)
                break
            for group in groups if i % 2 == 0 else groups[::-1]:
                for result in run_group(group, args, Path(tmp)):
                    runs[result["method"]].append(result)
                done = f"[{time.time() - t0:6.0f}s] round {i + 1}: {', '.join(group)} done"
                print(done, file=sys.stderr, flush=True)
    if args.raw:
        Path(args.raw).write_text(json.dumps(runs))
    for row in rows:
        print(json.dumps(summarize(runs[row], args)), flush=True)


if __name__ == "__main__":
    main()
