"""How fast is `tierkit probe --no-bench` next to inxi? And how close is numpy to peak?

Both commands run several times in this same run, alternating so that a busy
moment hurts both alike; medians are compared. Target: tierkit <= 0.5x inxi.
Then the measured FP32 matmul FLOP/s over the CPU's theoretical peak.

    python bench/probe_speed.py [--runs 7] [--out bench/results/probe_speed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env, cwd=env.get("TIERKIT_HOME"))
    sec = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-300:]}")
    return sec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/probe_speed.json")
    args = ap.parse_args()

    inxi = shutil.which("inxi")
    if not inxi:
        sys.exit("inxi is not installed: `sudo apt-get install inxi` (make setup-dev does it as root)")
    home = tempfile.mkdtemp(prefix="tierkit-bench-")
    env = {**os.environ, "TIERKIT_HOME": home, "PYTHONPATH": str(REPO)}
    tierkit = [sys.executable, "-m", "tiers.cli", "probe", "--no-bench", "--out", f"{home}/p.yaml"]
    inxi_cmd = [inxi, "-C", "-G", "-m", "-F"]

    timed(tierkit, env), timed(inxi_cmd, env)  # warm the page cache for both
    ours, theirs = [], []
    for _ in range(args.runs):
        ours.append(timed(tierkit, env))
        theirs.append(timed(inxi_cmd, env))
    t_ours, t_inxi = statistics.median(ours), statistics.median(theirs)
    ratio = t_ours / t_inxi
    print(f"tierkit probe --no-bench: median {t_ours * 1000:.0f} ms over {args.runs} runs")
    print(f"inxi -C -G -m -F:         median {t_inxi * 1000:.0f} ms over {args.runs} runs")
    print(f"ratio tierkit/inxi: {ratio:.2f}x  (target <= 0.50x: {'PASS' if ratio <= 0.5 else 'MISS'})")

    from inventory import bench
    from inventory.detect import cpu

    c = cpu.detect()
    fp32 = bench.cpu_matmul("float32")
    frac = fp32.value / c.peak_fp32_gflops.value if c.peak_fp32_gflops else None
    print(f"fp32 matmul: {fp32.value:g} GFLOP/s measured ({fp32.method})")
    if frac is not None:
        print(f"theoretical peak: {c.peak_fp32_gflops.value:g} GFLOP/s ({c.peak_fp32_gflops.method})")
        print(f"measured / peak: {frac:.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "runs": args.runs, "tierkit_s": ours, "inxi_s": theirs, "tierkit_median_s": t_ours,
        "inxi_median_s": t_inxi, "ratio": ratio, "target_ratio": 0.5,
        "fp32_matmul_gflops": fp32.value, "fp32_peak_gflops": c.peak_fp32_gflops.value if c.peak_fp32_gflops else None,
        "fp32_fraction_of_peak": frac}, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
