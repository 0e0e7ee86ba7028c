"""The machine's matmul speed, printed beside every absolute time the benchmarks report (machines here differ 3x)."""

from __future__ import annotations

import time


def matmul_gflops(dtype: str = "fp32", n: int = 1024, reps: int = 10) -> float:
    """Best of five timings of ``reps`` n×n matmuls in ``dtype`` (``fp32`` or ``bf16``), in GFLOP/s."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best / 1e9
