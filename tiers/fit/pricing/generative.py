"""Pricing generative image models (VAE, GAN, DDPM), small RL agents (DQN, PPO) and classic ML (trees, SVMs).

    gen-train   time = FLOPs (models/costs_gen.py) / (matmul FLOP/s x efficiency x width utilisation)
                       + steps x fixed cost per step + startup          (as training.py's CNNs and MLPs)
    rl-train    time = env steps x (env step + one eager forward) + updates x fixed cost + FLOPs
    classic-ml  time = elementary operations / the rate compiled scikit-learn code sustains on one core

A tiny network spends its time in Python and per-call overheads, not in FLOPs,
so the fixed costs carry most of an RL run's time; the constants below say where
each figure comes from.
"""
from __future__ import annotations

from math import ceil

from inventory.profile import Profile
from inventory.units import fmt_bytes
from models import costs_gen
from models.costs import PYTHON_NUMPY_BYTES, SKLEARN_BYTES, fmt_count
from tiers import catalog
from tiers.catalog import Milestone
from tiers.fit.pricing.common import Priced, runtime_bytes, startup_time
from tiers.fit.pricing.training import (
    EFF_CPU_CONV,
    EFF_CPU_TRAIN,
    EFF_GPU_CONV,
    EFF_GPU_TRAIN,
    _steps_overhead,
    _train_time,
)
from tiers.fit.rules import fmt_seconds, pool_check
from tiers.fit.targets import Target, python_speed

EAGER_FORWARD_S = 60e-6          # one eager torch forward of a tiny MLP on one observation (~50-80 us on a laptop)
RL_UPDATE_S = 1.5e-3             # one optimizer update: forward, backward, Adam, target sync checks (eager torch)
SKLEARN_OPS_PER_S = 2e8          # CART split search / libsvm kernel evaluations: ~2e8 simple ops/s on one core (estimate)


def price_gen_train(r: catalog.GenTrain, t: Target, p: Profile, m: Milestone) -> Priced:
    """VAE, GAN (MLPs, as training.py's MLPs) or DDPM (a U-Net, at the conv efficiency)."""
    pixels = r.in_hw[0] * r.in_hw[1] * r.in_ch
    if r.kind == "ddpm":
        shape = costs_gen.UNetShape(r.in_hw[0], r.in_ch, r.channels, r.levels, r.res_blocks)
        cost = costs_gen.ddpm(shape, r.samples, r.epochs, r.batch, r.timesteps, r.draws)
        effs = (EFF_GPU_CONV, EFF_CPU_CONV)
        what = f"U-Net {shape.widths()}, {fmt_count(cost.extra['macs'])} MACs/image, T={r.timesteps}"
    else:
        build = costs_gen.vae if r.kind == "vae" else costs_gen.gan
        cost = build(pixels, r.hidden, r.latent, r.samples, r.epochs, r.batch)
        effs = (EFF_GPU_TRAIN, EFF_CPU_TRAIN)
        what = f"hidden {r.hidden}, latent {r.latent}"
    data = 0 if (t.gpu and not t.unified) else r.samples * pixels      # uint8 images in host memory
    runtime, rt_lines = runtime_bytes("torch", t, m)
    need = cost.peak_bytes + data + sum(runtime.values())
    run, lines = _train_time(p, t, cost.flops, int(cost.extra["width"]), "fp32", "torch", *effs)
    steps = ceil(r.samples / r.batch) * r.epochs * (2 if r.kind == "gan" else 1)
    over, oline = _steps_overhead(steps, int(cost.extra["layers"]), t, "torch")
    start, start_line = startup_time("torch", t, True)
    basis = [*cost.basis, f"dataset in memory: {fmt_bytes(data)}", *rt_lines, f"peak memory = {fmt_bytes(need)}",
             *lines, oline, start_line]
    return Priced(need, run + over + start, basis, [pool_check(t, need)], {"params": cost.params},
                  f"{r.kind.upper()} {fmt_count(cost.params)} params, {what}, {r.epochs:g} epochs")


def price_rl_train(r: catalog.RLTrain, t: Target, p: Profile, m: Milestone) -> Priced:
    """DQN or PPO on a small Python environment: mostly per-step Python and per-update eager overheads."""
    cost = costs_gen.rl_agent(r.algo, r.widths, r.env_steps, r.batch, r.replay, r.epochs)
    runtime, rt_lines = runtime_bytes("torch", t, m)
    need = cost.peak_bytes + sum(runtime.values())
    scale, sline = python_speed(p)
    env = r.env_steps * (r.env_step_us * 1e-6 + EAGER_FORWARD_S) * scale
    updates = cost.extra["updates"]
    upd = updates * RL_UPDATE_S * scale
    run, lines = _train_time(p, t, cost.flops, max(r.widths[1:-1] or r.widths), "fp32", "torch")
    start, start_line = startup_time("torch", t, True)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", sline,
             (f"environment: {r.env_steps:,} steps x ({r.env_step_us:g} us step + {EAGER_FORWARD_S * 1e6:g} us "
              f"forward) = {fmt_seconds(env)}"),
             f"updates: {updates:,} x {RL_UPDATE_S * 1e3:g} ms = {fmt_seconds(upd)}", *lines, start_line]
    return Priced(need, env + upd + run + start, basis, [pool_check(t, need)], {"params": cost.params},
                  f"{r.algo.upper()} on {r.env}, {fmt_count(r.env_steps)} env steps, {cost.params:,} params")


def price_classic_ml(r: catalog.ClassicML, t: Target, p: Profile, m: Milestone) -> Priced:
    """scikit-learn on one core (a forest with n_jobs=-1 splits its trees over the cores)."""
    cost = costs_gen.classic_ml(r.algo, r.samples, r.features, r.trees, r.depth)
    need = cost.peak_bytes + PYTHON_NUMPY_BYTES + SKLEARN_BYTES
    scale, sline = python_speed(p)
    cores = (p.cpu.usable_cpus or p.cpu.physical_cores) if p.cpu and r.algo == "forest" else 1
    secs = cost.flops / (SKLEARN_OPS_PER_S / scale * min(cores, r.trees))
    start, start_line = startup_time("numpy", t, True)
    basis = [*cost.basis, f"runtime: Python + numpy + scikit-learn {fmt_bytes(PYTHON_NUMPY_BYTES + SKLEARN_BYTES)}",
             f"peak memory = {fmt_bytes(need)}", sline,
             (f"{cost.flops:.3g} operations / ({SKLEARN_OPS_PER_S:.2g}/s x {min(cores, r.trees)} core(s)) = "
              f"{fmt_seconds(secs)}"), start_line]
    return Priced(need, secs + start, basis, [pool_check(t, need)], {},
                  f"{r.algo} on {fmt_count(r.samples)} x {r.features}")
