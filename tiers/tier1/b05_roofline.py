"""B5: the roofline of this machine, drawn from its own measurements.

    bandwidth roof   STREAM triad over arrays bigger than the cache          -> GB/s
    compute roof     numpy matmul at n = n_min, 2 n_min, ... n_max (best)    -> GFLOP/s
    each size        intensity = 2n^3 / (3 n^2 x 4 B) = n/6 FLOP/B;  attainable = min(compute, intensity x GB/s)

A square matmul of size n does 2n^3 floating-point operations and, at the very
least, moves its three n x n matrices through memory once: 3 n^2 x 4 bytes in
fp32. Their ratio, the *arithmetic intensity* (n/6 FLOP per byte in fp32), says
which roof limits it: below the ridge point a kernel waits on memory (attainable
FLOP/s = intensity x bandwidth), above it on the arithmetic units (the compute
roof). We measure both roofs here, place every matmul size on the chart, and see
how close numpy's BLAS gets.

Reads top to bottom: config, bandwidth roof, matmul sweep, (GPU sweep), the
roofline, plots, numbers.
"""
from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from annotated_types import Gt, MinLen

from inventory import bench
from tiers.report import pyplot, save

if TYPE_CHECKING:
    from tiers.runner import Context, Output


# ------------------------------------------------------------------ config

@dataclass
class Config:
    n_min: Annotated[int, Gt(0)] = 64            # smallest matmul
    n_max: Annotated[int, Gt(0)] = 4096          # largest matmul (3 x 64 MiB in fp32); the sweep doubles n
    sizes: Annotated[list[Annotated[int, Gt(0)]], MinLen(1)] | None = None  # these n instead of n_min..n_max
    dtype: Literal["float32", "float64"] = "float32"
    min_seconds: Annotated[float, Gt(0)] = 0.25  # time each size for at least this long (the best repeat counts)
    bandwidth_bytes: Annotated[int, Gt(0)] | None = None  # bytes per STREAM array; None: as the probe chooses
    gpu_bandwidth_bytes: Annotated[int, Gt(0)] = 512 << 20  # the GPU's device-to-device copy

    def __post_init__(self) -> None:
        if self.sizes is None and self.n_min > self.n_max:
            raise ValueError(f"n_min {self.n_min} is above n_max {self.n_max}: no matmul size to sweep")


def sizes_from(cfg: Config) -> list[int]:
    if cfg.sizes:
        return sorted(cfg.sizes)
    n, out = cfg.n_min, []
    while n <= cfg.n_max:
        out.append(n)
        n *= 2
    return out


def intensity(n: int, itemsize: int) -> float:
    """FLOP per byte of a square matmul with each matrix moved once: 2n^3 / (3 n^2 b)."""
    return 2 * n**3 / (3 * n**2 * itemsize)


def time_it(fn: Callable[[], object], min_seconds: float, sync: Callable[[], object] = lambda: None,
            warmup: bool = True) -> tuple[float, float, int]:
    """(best, median, repeats) seconds of `fn` over at least 2 repeats and `min_seconds` of timing.

    The roofline asks what the machine *can* do, so the best repeat counts: on a
    shared machine the slow repeats measure the neighbours, not the kernel.
    """
    if warmup:
        fn()
        sync()
    times: list[float] = []
    while len(times) < 2 or (sum(times) < min_seconds and len(times) < 200):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times), len(times)


def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config
    sizes = sizes_from(cfg)
    dtype = np.dtype(cfg.dtype)
    cpu, mem = ctx.profile.cpu, ctx.profile.memory

    # -------------------------------------------------------------- the bandwidth roof
    # STREAM triad over arrays bigger than the last-level cache, every core loading
    # memory: the rate at which data reaches the cores from DRAM.
    nbytes = cfg.bandwidth_bytes or bench.bandwidth_array_bytes(
        cpu.caches.l3 if cpu else None, mem.available_bytes if mem else None)
    threads = cpu.physical_cores if cpu else 1
    with ctx.progress("memory bandwidth (STREAM triad)", None):
        bw = bench.cpu_bandwidth(int(nbytes), threads=threads)
    bandwidth = bw.value  # GB/s
    ctx.log(f"bandwidth roof: {bandwidth:g} GB/s ({bw.method})")

    # -------------------------------------------------------------- the matmul sweep (numpy)
    rows = cpu_sweep(ctx, sizes, dtype, cfg.min_seconds)

    # -------------------------------------------------------------- the compute roofs
    # Measured: the best any matmul reached. Theoretical: cores x clock x FLOP/cycle
    # from the profile (a datasheet figure), drawn dashed: what no code reaches.
    compute_roof = max(r["gflops"] for r in rows)
    peak_fig = (cpu.peak_fp64_gflops if dtype == np.float64 else cpu.peak_fp32_gflops) if cpu else None
    peak = peak_fig.value if peak_fig else None
    ridge = compute_roof / bandwidth  # FLOP/byte where the two roofs meet
    place(rows, compute_roof, bandwidth)
    for r in rows:
        r["fraction_of_peak"] = round(r["gflops"] / peak, 3) if peak else None

    # -------------------------------------------------------------- the same on a CUDA GPU (torch)
    gpu = gpu_sweep(ctx, sizes, cfg) if ctx.device.startswith("cuda") else None

    # -------------------------------------------------------------- plots
    ctx.log("plotting the roofline")
    plots = draw(ctx.out_dir, rows, bandwidth, compute_roof, peak, cpu.model if cpu else "CPU", dtype.name, gpu)

    # -------------------------------------------------------------- numbers
    best = max(rows, key=lambda r: r["gflops"])
    metrics: dict[str, Any] = {
        "dtype": dtype.name,
        "sizes": sizes,
        "per_size": rows,
        "bandwidth_gbs": bandwidth,
        "bandwidth_method": bw.method,
        "compute_roof_gflops": compute_roof,
        "compute_roof_n": best["n"],
        "theoretical_peak_gflops": peak,
        "theoretical_peak_method": peak_fig.method if peak_fig else None,
        "ridge_flop_per_byte": round(ridge, 2),
        "fraction_of_peak": round(compute_roof / peak, 3) if peak else None,
        "profile_matmul_gflops": (cpu.matmul_gflops[key].value
                                  if cpu and (key := "fp64" if dtype == np.float64 else "fp32") in cpu.matmul_gflops
                                  else None),
        **({"gpu": gpu} if gpu else {}),
    }
    summary = (f"numpy's {dtype.name} matmul peaks at {compute_roof:.1f} GFLOP/s (n={best['n']})"
               + (f", {compute_roof / peak:.0%} of the {peak:g} GFLOP/s theoretical peak" if peak else "")
               + f"; memory delivers {bandwidth:g} GB/s, so the ridge point is {ridge:.1f} FLOP/byte: "
               f"a kernel needs that many FLOPs per byte it moves before the arithmetic, not memory, limits it.")
    return Output(metrics=metrics, summary=summary, report=report(metrics), plots=plots)


def cpu_sweep(ctx: Context, sizes: list[int], dtype: np.dtype, min_seconds: float) -> list[dict[str, Any]]:
    """numpy's matmul at every size: the best of its repeats."""
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    with ctx.progress(f"numpy matmul {sizes[0]}..{sizes[-1]}", len(sizes)) as bar:
        for n in sizes:
            a = rng.standard_normal((n, n), dtype=dtype)  # drawn in dtype: no float64 temporary
            b = rng.standard_normal((n, n), dtype=dtype)
            c = np.zeros((n, n), dtype=dtype)
            c[...] = 1  # touch every page now, so the timing holds no page faults
            # The big sizes take ~0.5-1.5 s each on a laptop: their first repeat is warm enough.
            r = measured(n, dtype.itemsize, time_it(functools.partial(np.matmul, a, b, out=c), min_seconds,
                                                    warmup=n < 2048))
            rows.append(r)
            ctx.log(f"n={n}: {2 * n**3 / r['seconds'] / 1e9:.1f} GFLOP/s, {r['seconds'] * 1e3:.3f} ms "
                    f"(best of {r['repeats']}; median {r['median_seconds'] * 1e3:.3f} ms)")
            del a, b, c
            bar.advance()
    return rows


def gpu_sweep(ctx: Context, sizes: list[int], cfg: Config) -> dict[str, Any]:
    """The same sweep with torch.mm on the plan's CUDA device; device-to-device copy as the bandwidth roof."""
    import torch

    dev = torch.device(ctx.device)
    sync = functools.partial(torch.cuda.synchronize, dev)  # kernels are async: time them to completion
    nbytes = cfg.gpu_bandwidth_bytes
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    sec, _, _ = time_it(functools.partial(dst.copy_, src), 0.1, sync)
    bandwidth = 2 * nbytes / sec / 1e9  # read + write
    del src, dst
    rows: list[dict[str, Any]] = []
    with ctx.progress(f"torch.mm on {ctx.device}", len(sizes)) as bar:
        for n in sizes:
            a = torch.randn(n, n, device=dev)
            b = torch.randn(n, n, device=dev)
            rows.append(measured(n, 4, time_it(functools.partial(torch.mm, a, b), cfg.min_seconds, sync)))
            del a, b
            bar.advance()
    roof = max(r["gflops"] for r in rows)
    place(rows, roof, bandwidth)
    index = dev.index or 0
    probed = next((g for g in ctx.profile.gpus if g.backend == "cuda" and (g.index or 0) == index), None)
    fp32 = probed.matmul_tflops.get("fp32") if probed else None
    ctx.log(f"{ctx.device}: {roof / 1e3:.1f} TFLOP/s fp32, {bandwidth:.0f} GB/s copy")
    return {"name": torch.cuda.get_device_name(dev), "per_size": rows, "bandwidth_gbs": round(bandwidth, 1),
            "compute_roof_gflops": roof, "ridge_flop_per_byte": round(roof / bandwidth, 2),
            "probe_gflops": fp32.value * 1e3 if fp32 else None}


def measured(n: int, itemsize: int, timing: tuple[float, float, int]) -> dict[str, Any]:
    """One size's row: its best and median time, its rate, its arithmetic intensity."""
    sec, median, reps = timing
    return {"n": n, "seconds": sec, "median_seconds": median, "repeats": reps,
            "gflops": round(2 * n**3 / sec / 1e9, 2), "intensity": round(intensity(n, itemsize), 2)}


def place(rows: list[dict[str, Any]], roof: float, bandwidth: float) -> None:
    """Each size under the roofline: what its intensity lets it attain, how much of that it reached, which roof."""
    for r in rows:
        attainable = min(roof, r["intensity"] * bandwidth)
        r["attainable_gflops"] = round(attainable, 2)
        r["fraction_of_roof"] = round(r["gflops"] / attainable, 3)
        r["region"] = "memory-bound" if r["intensity"] < roof / bandwidth else "compute-bound"


# ------------------------------------------------------------------ plots

def draw(out: Any, rows: list[dict[str, Any]], bandwidth: float, roof: float, peak: float | None, cpu_name: str,
         dtype: str, gpu: dict[str, Any] | None) -> list[str]:
    """roofline.png (and roofline_gpu.png), gflops_vs_n.png; their README captions."""
    plt = pyplot()
    roofline_plot(plt, out / "roofline.png", rows, bandwidth, roof, peak, f"Roofline: {cpu_name}, numpy {dtype}",
                  "GFLOP/s")
    plots = [f"roofline.png: roofline of {cpu_name} ({dtype}); points are matmul sizes"]
    if gpu:
        roofline_plot(plt, out / "roofline_gpu.png", gpu["per_size"], gpu["bandwidth_gbs"],
                      gpu["compute_roof_gflops"], gpu.get("probe_gflops"),
                      f"Roofline: {gpu['name']}, torch float32", "GFLOP/s", peak_label="probe's torch.mm",
                      points_label="torch.mm, measured")
        plots.append(f"roofline_gpu.png: roofline of {gpu['name']} (torch float32)")
    gflops_plot(plt, out / "gflops_vs_n.png", rows, roof, peak, gpu)
    plots.append("gflops_vs_n.png: achieved GFLOP/s against matrix size n")
    return plots


# The triad a = b + s*c does 2 FLOPs per element and moves 5 x 8 bytes (as counted
# by inventory.bench.cpu_bandwidth): the textbook memory-bound kernel.
TRIAD_INTENSITY = 2 / 40


def roofline_plot(plt: Any, path: Any, rows: list[dict[str, Any]], bandwidth: float, roof: float,
                  peak: float | None, title: str, unit: str, peak_label: str = "theoretical peak",
                  points_label: str = "numpy matmul, measured") -> None:
    """Log-log: the bandwidth slope, the compute ceiling, the ridge, the regions, one point per size."""
    ridge = roof / bandwidth
    xs = [r["intensity"] for r in rows]
    lo, hi = min(min(xs), ridge, TRIAD_INTENSITY) / 3, max(max(xs), ridge) * 4
    grid = np.geomspace(lo, hi, 400)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.axvspan(lo, ridge, color="tab:blue", alpha=0.07)
    ax.axvspan(ridge, hi, color="tab:orange", alpha=0.07)
    ax.plot(grid, np.minimum(grid * bandwidth, roof), color="black", lw=2,
            label=f"roofline: min({bandwidth:g} GB/s x intensity, {roof:.0f} {unit})")
    if peak:
        ax.axhline(peak, color="gray", ls="--", lw=1.2, label=f"{peak_label}: {peak:.0f} {unit}")
    ax.axvline(ridge, color="gray", ls=":", lw=1)
    triad = TRIAD_INTENSITY * bandwidth
    ax.scatter([TRIAD_INTENSITY], [triad], marker="D", color="tab:blue", zorder=3,
               label=f"STREAM triad (bandwidth roof, {TRIAD_INTENSITY:g} FLOP/B)")
    ymin = min(min(r["gflops"] for r in rows), lo * bandwidth) / 2
    ax.annotate(f"ridge {ridge:.1f} FLOP/B", (ridge, ymin * 1.3), rotation=90, fontsize=8,
                ha="right", va="bottom", color="gray")
    ax.text(lo * 1.3, roof * 1.6, "memory-bound", color="tab:blue", fontsize=9)
    ax.text(ridge * 1.3, roof * 1.6, "compute-bound", color="tab:orange", fontsize=9)
    ax.scatter(xs, [r["gflops"] for r in rows], color="tab:red", zorder=3, label=points_label)
    for i, r in enumerate(rows):  # labels alternate below and above, so neighbours do not collide
        ax.annotate(f"n={r['n']}", (r["intensity"], r["gflops"]), textcoords="offset points",
                    xytext=(-8, -14) if i % 2 == 0 else (-8, 7), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(ymin, max(roof, peak or 0) * 3)
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved, each matrix once)")
    ax.set_ylabel(f"achieved {unit}")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    save(fig, path)


def gflops_plot(plt: Any, path: Any, rows: list[dict[str, Any]], roof: float, peak: float | None,
                gpu: dict[str, Any] | None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["n"] for r in rows], [r["gflops"] for r in rows], "o-", label="numpy (CPU)")
    ax.axhline(roof, color="black", lw=1, label=f"best measured: {roof:.0f} GFLOP/s")
    if peak:
        ax.axhline(peak, color="gray", ls="--", lw=1, label=f"theoretical peak: {peak:.0f} GFLOP/s")
    if gpu:
        ax.plot([r["n"] for r in gpu["per_size"]], [r["gflops"] for r in gpu["per_size"]], "s-",
                label=f"torch ({gpu['name']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["n"] for r in rows], [str(r["n"]) for r in rows])
    ax.set_ylim(0, max(roof, peak or 0, *(r["gflops"] for r in (gpu or {}).get("per_size", []))) * 1.15)
    ax.set_xlabel("n (n x n @ n x n)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("Achieved matmul throughput: small sizes pay call overhead, large ones reach the roof",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    save(fig, path)


# ------------------------------------------------------------------ the report

def report(m: dict[str, Any]) -> str:
    """The milestone's own README sections."""
    peak = m["theoretical_peak_gflops"]
    peak_text = f"{peak:g} GFLOP/s ({m['theoretical_peak_method']})" if peak else "unknown (not in the profile)"
    out = ["## Roofs", "",
           f"- bandwidth roof: **{m['bandwidth_gbs']:g} GB/s** ({m['bandwidth_method']})",
           f"- compute roof: **{m['compute_roof_gflops']:.1f} GFLOP/s**, the best matmul here (n={m['compute_roof_n']})",
           f"- theoretical peak: {peak_text}",
           f"- ridge point: **{m['ridge_flop_per_byte']} FLOP/byte** (compute roof / bandwidth)",
           f"- best / theoretical peak: {m['fraction_of_peak']:.0%}" if m["fraction_of_peak"] else
           "- best / theoretical peak: ?",
           "", f"## Matmul sweep ({m['dtype']})", "",
           "| n | best time | GFLOP/s | intensity (FLOP/B) | attainable | of roof | of peak | region |",
           "|---|---|---|---|---|---|---|---|"]
    for r in m["per_size"]:
        out.append(f"| {r['n']} | {r['seconds'] * 1e3:.3f} ms | {r['gflops']:.1f} | {r['intensity']:.1f} | "
                   f"{r['attainable_gflops']:.1f} | {r['fraction_of_roof']:.0%} | "
                   f"{'' if r['fraction_of_peak'] is None else format(r['fraction_of_peak'], '.0%')} | {r['region']} |")
    if "gpu" in m:
        g = m["gpu"]
        out += ["", f"## GPU: {g['name']} (torch float32)", "",
                (f"- copy bandwidth {g['bandwidth_gbs']:g} GB/s, compute roof {g['compute_roof_gflops'] / 1e3:.1f} "
                 f"TFLOP/s, ridge {g['ridge_flop_per_byte']} FLOP/byte"), "",
                "| n | GFLOP/s | intensity | of roof | region |", "|---|---|---|---|---|"]
        out += [f"| {r['n']} | {r['gflops']:.1f} | {r['intensity']:.1f} | {r['fraction_of_roof']:.0%} | {r['region']} |"
                for r in g["per_size"]]
    out += ["", "## Reading it", "",
            ("Intensity here counts each matrix moved once, the least traffic a matmul can have. By that count "
             "even n=64 sits near or past the ridge, yet small matmuls fall far below the roof: their time goes "
             "to call overhead and thread start-up, not to memory or arithmetic. From a few hundred on, blocked "
             "BLAS kernels keep tiles in cache and approach the compute roof. Elementwise work (an add, a ReLU, "
             "a layer norm) has an intensity below 1 FLOP/byte: it lives on the bandwidth slope, which is why "
             "fusing such steps matters more than faster arithmetic.")]
    return "\n".join(out)
