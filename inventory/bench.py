"""Micro-benchmarks: the achieved FLOP/s and bandwidth that the planner divides by.

Datasheet peaks overstate what a learner's code gets; these numbers are what
numpy (and torch on a GPU) actually reach here. Each figure is the median of a
few timed repeats after a warm-up, and counts only the work it really did.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

from inventory.profile import GPU, Figure


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], object] = lambda: None) -> float:
    fn()
    sync()  # warm-up: page faults, thread pools, kernel selection
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_matmul(dtype: str = "float32", n: int = 2048, repeats: int = 5, budget_s: float = 1.5) -> Figure:
    """GFLOP/s of an n x n matmul (2 n^3 FLOPs) through numpy's BLAS, all cores."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.matmul(np.ones((256, 256), dtype), np.ones((256, 256), dtype))  # wake the BLAS thread pool
    while True:
        a = rng.standard_normal((n, n)).astype(dtype)
        b = rng.standard_normal((n, n)).astype(dtype)
        out = np.empty((n, n), dtype=dtype)
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        first = time.perf_counter() - t
        # Shrink on slow machines (a Pi) so the whole probe stays near 5 s.
        if first * (repeats + 1) <= budget_s or n <= 256:
            break
        n //= 2
    sec = _median_seconds(lambda: np.matmul(a, b, out=out), repeats)
    return Figure(value=round(2 * n**3 / sec / 1e9, 1), unit="GFLOP/s", source="measured",
                  method=f"numpy matmul {n}x{n} {dtype}, median of {repeats} after warm-up")


def cpu_bandwidth(array_bytes: int = 128 << 20, threads: int = 1, repeats: int = 3) -> Figure:
    """STREAM-style triad a = b + s*c in two in-place passes, bytes counted honestly.

    `np.multiply(c, s, out=a)` reads c and writes a; `np.add(a, b, out=a)` reads
    a and b and writes a: 5 array-sized transfers, no hidden temporaries. Each
    array should be larger than the last-level cache, so this measures DRAM.
    numpy's elementwise kernels run on one core; `threads` slices the arrays
    across a thread pool (numpy releases the GIL) to load every memory channel.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = array_bytes // 8
    a, b, c = np.empty(n), np.full(n, 1.0), np.full(n, 2.0)
    cuts = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def part(cut: tuple[int, int]) -> None:
        s = slice(*cut)
        np.multiply(c[s], 3.0, out=a[s])
        np.add(a[s], b[s], out=a[s])

    with ThreadPoolExecutor(threads) as pool:
        sec = _median_seconds(lambda: list(pool.map(part, cuts)), repeats)
    return Figure(value=round(5 * n * 8 / sec / 1e9, 2), unit="GB/s", source="measured",
                  method=f"triad a=b+s*c, 3 x {array_bytes >> 20} MiB float64, 5 transfers counted, "
                         f"{threads} thread(s), median of {repeats}")


def bandwidth_array_bytes(l3_bytes: int | None, available_bytes: int | None) -> int:
    """Arrays of at least the L3's size (min 64 MiB, max 128 MiB), never more than 1/16 of free memory."""
    size = max(64 << 20, l3_bytes or 0)
    if available_bytes:
        size = min(size, available_bytes // 16)
    return max(8 << 20, min(size, 128 << 20))  # page faults make bigger arrays cost seconds


def gpu(g: GPU, repeats: int = 10) -> None:
    """Fill a CUDA/MPS GPU's measured matmul TFLOP/s by dtype and copy bandwidth (torch)."""
    import torch

    if g.backend == "cuda" and torch.cuda.is_available():
        dev, sync = torch.device("cuda", g.index or 0), torch.cuda.synchronize
    elif g.backend == "mps" and torch.backends.mps.is_available():
        dev, sync = torch.device("mps"), torch.mps.synchronize
    else:
        raise RuntimeError(f"torch cannot reach the {g.backend} device")
    n = 4096 if g.backend == "cuda" else 2048
    for name, dt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        try:
            a = torch.randn(n, n, device=dev, dtype=dt)
            b = torch.randn(n, n, device=dev, dtype=dt)
            sec = _median_seconds(lambda: torch.mm(a, b), repeats, sync)
        except (RuntimeError, TypeError):  # e.g. bf16 on an old GPU
            g.matmul_tflops.pop(name, None)
            continue
        g.matmul_tflops[name] = Figure(value=round(2 * n**3 / sec / 1e12, 2), unit="TFLOP/s", source="measured",
                                       method=f"torch.mm {n}x{n} {name}, median of {repeats}")
    nbytes = 1 << 30 if g.backend == "cuda" else 256 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    sec = _median_seconds(lambda: dst.copy_(src), repeats, sync)  # noqa: F821 (src/dst are deleted below, after use)
    g.memory_bandwidth_gbs = Figure(value=round(2 * nbytes / sec / 1e9, 1), unit="GB/s", source="measured",
                                    method=f"device copy {nbytes >> 20} MiB, read+write counted, median of {repeats}")
    del src, dst  # free the device buffers before empty_cache (a, b of a failed dtype may never have been bound)
    if g.backend == "cuda":
        torch.cuda.empty_cache()
