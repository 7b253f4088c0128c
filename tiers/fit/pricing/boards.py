"""Pricing a microcontroller milestone: B6's keyword spotter, trained on the host and run on the board.

    on the board   SRAM  = tensor arena + firmware        flash = int8 model + firmware
                   latency = MACs / (clock x int8 MACs per cycle of the core)
    on the host    Keras training: 6 x MACs x clips x epochs / (CPU FLOP/s x efficiency)
                   + features + the toolchain (convert, verify, export C, build, flash)

A board has no profile benchmark: its speed comes from the datasheet clock and a
per-core figure for CMSIS-NN-style int8 kernels (below, with its sources).
"""
from __future__ import annotations

import re

from inventory.profile import Profile
from inventory.units import fmt_bytes
from models import costs
from tiers import catalog
from tiers.catalog import Milestone
from tiers.fit.pricing.common import STARTUP_S, Priced
from tiers.fit.rules import fmt_seconds, limit_check, memory_check
from tiers.fit.targets import Target, cpu_flops, free_memory

# Microcontrollers: int8 MACs per clock cycle with CMSIS-NN-style kernels. MLPerf Tiny's DS-CNN
# (2.66M MACs) takes 182 ms on a 120 MHz Cortex-M4 with TFLite Micro (0.12/cycle) and 72-100 ms
# with vendor stacks (0.22-0.31): 0.15 for a Cortex-M4. M0+ has no DSP/SIMD; ESP32-S3 has ESP-NN's
# 128-bit SIMD (estimates).
MACS_PER_CYCLE = {"cortex-m0": 0.05, "cortex-m3": 0.08, "cortex-m4": 0.15, "cortex-m7": 0.30,
                  "cortex-m33": 0.15, "cortex-m55": 0.50, "xtensa lx6": 0.10, "xtensa lx7": 0.30}
FIRMWARE_SRAM_BYTES = 80_000      # our QEMU image outside the arena: 32 KB test-mode clip buffer, 16 KB audio ring, 8 KB stack
FIRMWARE_FLASH_BYTES = 200_000    # board core/RTOS, feature front-end, int8 kernels (estimate)
FEATURE_S_PER_CLIP = 2e-3         # MFCC of a 1-s clip in numpy (estimate)
TOOLCHAIN_S = 180.0               # convert, verify on TFLM, export C, build, flash (estimate)
EFF_TF_CPU_CONV = 0.10            # Keras on a CPU, depthwise convs on 25x5 feature maps (estimate)


def _macs_per_cycle(core: str) -> tuple[float, str]:
    """'Cortex-M4F' -> cortex-m4, '2x Cortex-M0+' -> cortex-m0, '2x Xtensa LX7' -> xtensa lx7."""
    c = core.lower()
    arm = re.search(r"cortex-m(\d+)", c)
    key = f"cortex-m{arm.group(1)}" if arm else next((k for k in MACS_PER_CYCLE if k in c), None)
    if key in MACS_PER_CYCLE:
        v = MACS_PER_CYCLE[key]
        return v, f"{core}: ~{v:g} int8 MACs per cycle"
    return 0.05, f"{core}: unknown core, assumed 0.05 int8 MACs per cycle"


def price_dscnn(r: catalog.DSCNN, t: Target, p: Profile, m: Milestone) -> Priced:
    """B6: train on the host (Keras, CPU), quantise, flash; on the board: arena + firmware in SRAM."""
    b = t.board
    cost = costs.dscnn(costs.DSCNNShape(r.channels, r.blocks, r.classes))
    sram = cost.extra["arena_bytes"] + FIRMWARE_SRAM_BYTES
    flash = cost.extra["model_bytes"] + FIRMWARE_FLASH_BYTES
    mpc, mline = _macs_per_cycle(b.core)
    latency_ms = cost.extra["macs"] / (b.clock_mhz * 1e6 * mpc) * 1e3
    rate, fline = cpu_flops(p)
    train_flop = 6 * cost.extra["macs"] * r.train_samples * r.epochs
    train = train_flop / (rate * EFF_TF_CPU_CONV)
    feats = r.train_samples * FEATURE_S_PER_CLIP
    host_need = costs.TENSORFLOW_BYTES + r.train_samples * 49 * 10 * 4 + 16 * cost.params
    s = STARTUP_S["tensorflow"] + feats + train + TOOLCHAIN_S
    basis = [*cost.basis,
             f"SRAM: arena {cost.extra['arena_bytes']:,} B + firmware {FIRMWARE_SRAM_BYTES:,} B = {sram:,} B",
             f"flash: model {cost.extra['model_bytes']:,} B + firmware {FIRMWARE_FLASH_BYTES:,} B = {flash:,} B",
             (f"latency: {cost.extra['macs']:,} MACs / ({b.clock_mhz:g} MHz x {mpc:g}) = {latency_ms:.3g} ms "
             f"({mline})"), fline,
             (f"host training (Keras, CPU): 6*MACs*{r.train_samples:,} clips*{r.epochs:g} epochs = {train_flop:.3g} FLOP "
             f"at efficiency {EFF_TF_CPU_CONV} = {fmt_seconds(train)}; features {fmt_seconds(feats)}; "
             f"convert, verify, build, flash {TOOLCHAIN_S:g} s; TensorFlow startup {STARTUP_S['tensorflow']:g} s"),
             f"host memory: TensorFlow + features = {fmt_bytes(host_need)}"]
    checks = [memory_check(f"SRAM on {b.name}", sram, b.sram_bytes),
              memory_check(f"flash on {b.name}", flash, b.flash_bytes),
              limit_check("latency per inference", latency_ms, r.max_latency_ms, False, "ms"),
              memory_check("host memory", host_need, free_memory(p)[0])]
    return Priced(sram, s, basis, checks,
                  {"params": cost.params, "macs": cost.extra["macs"], "model_bytes": cost.extra["model_bytes"],
                   "arena_bytes": cost.extra["arena_bytes"], "sram_bytes": sram, "flash_bytes": flash,
                   "latency_ms": round(latency_ms, 1)},
                  f"{cost.params / 1e3:.3g}K params, {cost.extra['model_bytes'] / 1e3:.3g} KB int8, "
                  f"{latency_ms:.0f} ms/inference")
