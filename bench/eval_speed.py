"""Batched vs one-at-a-time generation on the ``world-facts`` suite with the embedded model.

Run: ``python bench/eval_speed.py [--batch-size 16] [--limit N]``. Prints one JSON line on stdout:
``{"suite", "n", "batch_size", "batched_s", "sequential_s", "speedup", "identical"}``, where ``identical`` says
whether every generated answer is the same string in both runs. Progress and notes go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="world-facts")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()

    from ftlab.evals import evaluate, load_suite
    from ftlab.models import load_model

    model, tok = load_model(args.model)
    suite = load_suite(args.suite, limit=args.limit)
    # Warm-up outside the timings: first calls pay for lazy initialisation in torch and transformers.
    warm = load_suite(args.suite, limit=2)
    evaluate(model, tok, warm, batch_size=2, progress=False)

    t0 = time.perf_counter()
    batched = evaluate(model, tok, suite, batch_size=args.batch_size, progress=True)
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sequential = evaluate(model, tok, suite, batch_size=1, progress=True)
    sequential_s = time.perf_counter() - t0

    identical = [r.output for r in batched.items] == [r.output for r in sequential.items]
    if not identical:
        pairs = zip(batched.items, sequential.items, strict=True)
        diff = [(a.item_id, a.output, b.output) for a, b in pairs if a.output != b.output]
        print(f"{len(diff)} outputs differ, first: {diff[0]}", file=sys.stderr)
    print(
        json.dumps(
            {
                "suite": suite.name,
                "n": len(suite.items),
                "batch_size": args.batch_size,
                "batched_s": round(batched_s, 2),
                "sequential_s": round(sequential_s, 2),
                "speedup": round(sequential_s / batched_s, 2),
                "identical": identical,
                "score": batched.score,
            }
        )
    )


if __name__ == "__main__":
    main()
