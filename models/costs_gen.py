"""Analytic cost models for generative image models, small RL agents and classic ML.

    vae / gan   MLPs on flattened images: params = sum(w_i*w_(i+1) + w_(i+1)) per network
                FLOPs = 6 x params x samples x passes      (a GAN step runs D on real and fake, G through D)
    ddpm        a conv U-Net: per level, res_blocks x 2 convs 3x3 at that level's width, down and up
                FLOPs = 6 x MACs per training image + 2 x MACs x T steps per image drawn
    dqn / ppo   a small MLP policy; time is mostly environment steps and per-update fixed costs
    tree / forest / svm   scikit-learn: CART is O(d n log n) per tree, a kernel SVM O(n^2 d)

Pure arithmetic like models/costs.py (same `Cost`), kept apart so that module stays
under the size limit. Each formula's numbers are filled into `basis` for --explain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from inventory.units import MB, fmt_bytes
from models.costs import Cost, fmt_count, fmt_flops, mlp_params

ADAM_BYTES = 16                  # fp32 weights + grads + Adam m, v per parameter


def _mlp_acts(widths: list[int], batch: int) -> float:
    """fp32 outputs and pre-activations of every layer for one batch."""
    return 2 * batch * sum(widths) * 4


def vae(pixels: int, hidden: list[int], latent: int, samples: int, epochs: float, batch: int) -> Cost:
    """A VAE of MLPs: encoder pixels -> hidden -> 2*latent (mean, log-variance), decoder latent -> hidden' -> pixels."""
    enc, dec = [pixels, *hidden, 2 * latent], [latent, *reversed(hidden), pixels]
    n = mlp_params(enc) + mlp_params(dec)
    flops = 6 * n * samples * epochs
    acts = _mlp_acts(enc, batch) + _mlp_acts(dec, batch)
    basis = [f"encoder {enc} + decoder {dec}: {n:,} params",
             (f"weights + grads + Adam: {ADAM_BYTES} B x {fmt_count(n)} = {fmt_bytes(ADAM_BYTES * n)}; "
             f"activations 2*batch*sum(widths)*4 B = {fmt_bytes(acts)}"),
             f"FLOPs = 6*N*samples*epochs = 6*{n:,}*{samples:,}*{epochs:g} = {fmt_flops(flops)}"]
    return Cost(params=n, flops=flops, memory={"weights+grads+Adam": ADAM_BYTES * n, "activations": acts},
                basis=basis, extra={"width": max(hidden), "layers": len(enc) + len(dec) - 2})


def gan(pixels: int, hidden: list[int], latent: int, samples: int, epochs: float, batch: int) -> Cost:
    """A GAN of MLPs: G latent -> hidden -> pixels, D pixels -> hidden' -> 1, both with Adam.

    One step: D forward+backward on a real and a fake batch (6*Nd*2b, G forward 2*Ng*b for the
    fakes), then G's step through D (6*(Ng+Nd)*b): 6*Nd*2 + 2*Ng + 6*(Ng+Nd) per image.
    """
    gw, dw = [latent, *hidden, pixels], [pixels, *reversed(hidden), 1]
    ng, nd = mlp_params(gw), mlp_params(dw)
    per = 12 * nd + 2 * ng + 6 * (ng + nd)
    flops = per * samples * epochs
    acts = 2 * _mlp_acts(dw, batch) + _mlp_acts(gw, batch)
    basis = [f"G {gw}: {ng:,} params; D {dw}: {nd:,} params",
             (f"weights + grads + Adam: {ADAM_BYTES} B x {fmt_count(ng + nd)} = {fmt_bytes(ADAM_BYTES * (ng + nd))}; "
             f"activations (D on real and fake, G) = {fmt_bytes(acts)}"),
             (f"FLOPs per image = 12*Nd + 2*Ng + 6*(Ng+Nd) = {fmt_count(per)}; x {samples:,} x {epochs:g} epochs "
             f"= {fmt_flops(flops)}")]
    return Cost(params=ng + nd, flops=flops, memory={"weights+grads+Adam": ADAM_BYTES * (ng + nd),
                                                     "activations": acts},
                basis=basis, extra={"width": max(hidden), "layers": len(gw) + len(dw) - 2})


@dataclass(frozen=True)
class UNetShape:
    """A DDPM U-Net (Ho et al. 2020, small): `levels` resolutions, width channels * mult[i], res blocks of 2 convs."""

    hw: int
    in_ch: int
    channels: int
    levels: int
    res_blocks: int = 2

    def widths(self) -> list[int]:
        return [self.channels * min(2 ** i, 4) for i in range(self.levels)]


def unet_counts(s: UNetShape) -> tuple[int, int, int]:
    """(params, MACs per image, activation values per image) of the U-Net.

    Each level holds res_blocks blocks of two 3x3 convs at width c on its way down and
    res_blocks + 1 on its way up (the up path reads the skip, so its first conv sees 2c):
    params 9*c*c per conv, MACs 9*c*c*H*W; the stem and head are 3x3 convs in_ch <-> c0.
    """
    params = macs = acts = 0
    for i, c in enumerate(s.widths()):
        hw = (s.hw // 2 ** i) ** 2
        convs = 2 * s.res_blocks + 2 * (s.res_blocks + 1)
        per = 9 * c * c * convs + 9 * c * c * s.res_blocks      # the up path's first convs see 2c inputs
        params += per + 4 * c * convs                              # + bias and group-norm scale/shift
        macs += per * hw
        acts += 3 * c * hw * convs                                 # conv out, norm, activation kept for backward
    c0 = s.channels
    stem = 2 * 9 * s.in_ch * c0
    return params + stem, macs + stem * s.hw ** 2, acts


def ddpm(s: UNetShape, samples: int, epochs: float, batch: int, timesteps: int, draws: int) -> Cost:
    """Training a DDPM (one random timestep per image per step), then drawing `draws` images with T steps."""
    n, macs, acts = unet_counts(s)
    train = 6 * macs * samples * epochs
    sample = 2 * macs * timesteps * draws
    act_bytes = acts * batch * 4
    basis = [(f"U-Net {s.widths()} x {s.res_blocks} res blocks on {s.hw}x{s.hw}x{s.in_ch}: {n:,} params, "
             f"{fmt_count(macs)} MACs/image"),
             (f"weights + grads + Adam: {ADAM_BYTES} B x {fmt_count(n)} = {fmt_bytes(ADAM_BYTES * n)}; "
             f"activations 3 values per conv output x batch {batch} x 4 B = {fmt_bytes(act_bytes)}"),
             (f"training 6*MACs*samples*epochs = {fmt_flops(train)}; sampling 2*MACs*T*draws = "
             f"2*{fmt_count(macs)}*{timesteps}*{draws} = {fmt_flops(sample)}")]
    return Cost(params=n, flops=train + sample, memory={"weights+grads+Adam": ADAM_BYTES * n, "activations": act_bytes},
                basis=basis, extra={"width": s.channels, "layers": 2 * s.levels * (2 * s.res_blocks + 1),
                                    "macs": macs})


def rl_agent(algo: str, widths: list[int], env_steps: int, batch: int, replay: int, epochs: int) -> Cost:
    """DQN (an update of `batch` transitions per env step, a target network) or PPO (rollouts of `batch`
    steps, `epochs` passes over each): FLOPs of the network; memory of the replay buffer or rollout."""
    n = mlp_params(widths)
    obs = widths[0]
    if algo == "dqn":
        updates = env_steps
        per_update = 6 * n * batch + 2 * n * batch            # online net forward+backward, target net forward
        buffer = replay * (2 * obs + 3) * 4                  # s, s', action, reward, done in fp32
        nets = 2
    else:
        updates = math.ceil(env_steps / batch) * epochs
        per_update = 6 * 2 * n * batch                       # actor and critic of the same shape
        buffer = batch * (obs + 4) * 4
        nets = 2
    flops = 2 * n * env_steps + per_update * updates
    state = nets * ADAM_BYTES * n
    basis = [f"{algo.upper()} network {widths}: {n:,} params x {nets} networks, {ADAM_BYTES} B each = {fmt_bytes(state)}",
             f"{'replay' if algo == 'dqn' else 'rollout'} buffer: {fmt_bytes(buffer)}",
             f"FLOPs = 2*N per env step + {fmt_count(per_update)} per update x {updates:,} updates = {fmt_flops(flops)}"]
    return Cost(params=n, flops=flops, memory={"networks": state, "buffer": buffer}, basis=basis,
                extra={"updates": updates, "layers": len(widths) - 1})


SVM_CACHE_BYTES = 200 * MB       # scikit-learn SVC's default kernel cache (cache_size=200 MB)


def classic_ml(algo: str, samples: int, features: int, trees: int, depth: int) -> Cost:
    """scikit-learn: CART sorts each feature it tries once per node level, d*n*log2(n) comparisons per
    level and tree (a random forest tries sqrt(d) features a split); an RBF SVC computes O(n^2) kernel rows of d features (libsvm's SMO, ~n^2 evaluations).

    Here `flops` counts those elementary operations (comparisons, multiply-adds).
    """
    data = samples * features * 8                          # float64, as scikit-learn holds it
    if algo == "svm":
        ops = 2.0 * samples ** 2 * features
        model = min(SVM_CACHE_BYTES, samples ** 2 * 8)
        line = f"kernel rows: 2*n^2*d = 2*{samples:,}^2*{features} = {ops:.3g} operations"
        mem = {"data": data, "kernel cache": model}
    else:
        tried = max(1, round(math.sqrt(features))) if algo == "forest" else features   # max_features="sqrt"
        ops = float(trees) * depth * tried * samples * max(1.0, math.log2(samples))
        model = trees * 2 ** min(depth, 20) * 64           # ~64 B per node
        line = (f"CART: trees*depth*features tried*n*log2(n) = {trees}*{depth}*{tried}*{samples:,}*{math.log2(samples):.1f} = "
                f"{ops:.3g} comparisons")
        mem = {"data": data, "trees": model, "sort buffers": data}
    basis = [f"data n*d*8 B = {samples:,}*{features}*8 = {fmt_bytes(data)}",
             " + ".join(f"{k} {fmt_bytes(v)}" for k, v in mem.items()), line]
    return Cost(params=0, flops=ops, memory=mem, basis=basis)

