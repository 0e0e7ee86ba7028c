"""ftlab's evaluation generation beside transformers ``model.generate`` on a suite with the embedded model.

Run: ``python bench/eval_speed.py [--suite world-facts] [--batch-size 64] [--limit N] [--rounds 2] [--sequential]``.

Both paths get the same prompts (chat template, one user turn), the same batch size, greedy decoding and the same
``max_new_tokens`` (the suite's): ftlab's ``evaluate`` (``ftlab.evals.generation.generate``: prompts sorted by length,
shared prompt prefix run once, finished rows leave the batch) and a plain ``model.generate`` over the prompts in
their order, left padded, stopping at the same stop tokens. The two are run interleaved ``--rounds`` times and the
best time of each is kept; the fp32 matmul speed is measured in the same run. ``--sequential`` also times ftlab one
prompt at a time (the old comparison).

The LAST line on stdout is one JSON object::

    {"suite", "n", "batch_size", "ftlab_s", "generate_s", "speedup_vs_generate", "identical", "uses_generate",
     "matmul_gflops", "score", ...}

``identical`` is true when every answer string of ftlab's path equals ``generate``'s; ``uses_generate`` says whether
ftlab's evaluation now runs ``model.generate`` itself (``ftlab.evals.generation.USE_GENERATE``). Progress and notes go
to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _machine import matmul_gflops  # bench/_machine.py (the script's folder is on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def plain_generate(model, tok, prompts: list[str], batch_size: int, max_new_tokens: int, chat) -> list[str]:
    """transformers ``model.generate``: greedy, prompts in their order, left padded, the same stop tokens."""
    from ftlab.evals.generation import _generate_hf, _pad_id, encode_prompts, eval_mode, stop_token_ids

    encoded = encode_prompts(tok, prompts, chat)
    stop, pad = stop_token_ids(model, tok), _pad_id(tok)
    out: list[list[int]] = []
    with eval_mode(model):
        for s in range(0, len(encoded), batch_size):
            out += _generate_hf(model, encoded[s : s + batch_size], max_new_tokens, stop, pad)
    return [tok.decode(r, skip_special_tokens=True).strip() for r in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="world-facts")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sequential", action="store_true", help="also time ftlab with batch size 1")
    args = parser.parse_args()

    from ftlab.evals import evaluate, generation, load_suite
    from ftlab.models import load_model

    model, tok = load_model(args.model)
    suite = load_suite(args.suite, limit=args.limit)
    if suite.kind != "generate":
        raise SystemExit(f"{args.suite} is a {suite.kind} suite; pick a generation suite")
    max_new = suite.max_new_tokens
    prompts = [item["prompt"] for item in suite.items]
    # Warm-up outside the timings: first calls pay for lazy initialisation in torch and transformers.
    warm = load_suite(args.suite, limit=2)
    evaluate(model, tok, warm, batch_size=2, progress=False)
    plain_generate(model, tok, prompts[:2], 2, 4, suite.chat)

    ftlab_s = generate_s = float("inf")
    mm = matmul_gflops()
    for rnd in range(args.rounds):
        t0 = time.perf_counter()
        ours = evaluate(model, tok, suite, batch_size=args.batch_size, progress=False)
        ftlab_s = min(ftlab_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs = plain_generate(model, tok, prompts, args.batch_size, max_new, suite.chat)
        generate_s = min(generate_s, time.perf_counter() - t0)
        mm = max(mm, matmul_gflops())
        print(f"round {rnd + 1}: ftlab {ftlab_s:.1f} s, generate {generate_s:.1f} s", file=sys.stderr)

    answers = [r.output for r in ours.items]
    identical = answers == theirs
    if not identical:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(answers, theirs, strict=True)) if a != b]
        print(f"{len(diff)} of {len(answers)} answers differ, first: {diff[0]}", file=sys.stderr)
    row = {
        "suite": suite.name,
        "n": len(suite.items),
        "batch_size": args.batch_size,
        "max_new_tokens": max_new,
        "ftlab_s": round(ftlab_s, 2),
        "generate_s": round(generate_s, 2),
        "speedup_vs_generate": round(generate_s / ftlab_s, 2),
        "identical": identical,
        "uses_generate": bool(getattr(generation, "USE_GENERATE", False)),
        "matmul_gflops": round(mm, 1),
        "score": ours.score,
    }
    if args.sequential:
        t0 = time.perf_counter()
        seq = evaluate(model, tok, suite, batch_size=1, progress=False)
        row["sequential_s"] = round(time.perf_counter() - t0, 2)
        row["identical_sequential"] = [r.output for r in seq.items] == answers
    print(json.dumps(row))


if __name__ == "__main__":
    main()
