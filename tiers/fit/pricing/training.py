"""Pricing training: GPT pretraining, DPO, MLPs, CNNs, LSTMs.

    time = FLOPs (models/costs.py: 6*N*D and friends)
           / (measured matmul FLOP/s x efficiency x width utilisation)
         + steps x fixed cost per step + startup
    peak = weights + grads + optimizer state + activations (models/costs.py) + runtime

The profile's FLOP/s is what one large matmul reaches; a training step reaches a
fraction of it (layer norms, softmax, the optimizer are memory-bound), and a
narrow model less again (a GPU idles on small matrices), so each rate carries an
efficiency below, with where it comes from.
"""
from __future__ import annotations

from math import ceil

from inventory.profile import Profile
from inventory.units import fmt_bytes
from models import costs
from models.costs import fmt_count
from tiers import catalog
from tiers.catalog import Milestone
from tiers.fit.pricing.common import NUMPY_CALL_S, Priced, runtime_bytes, startup_time
from tiers.fit.rules import fmt_seconds, pool_check
from tiers.fit.targets import Target, flops, mixed_dtype, python_speed, usable_cpus

# GPT training on a GPU (torch, mixed precision): nanoGPT and llm.c report ~35-50% MFU
# against the datasheet peak for GPT-2 124M on A100/H100, and a large bf16 matmul reaches
# ~80% of peak (REFERENCE.md), so ~0.55 of the measured matmul at full width.
EFF_GPU_TRAIN = 0.55
# ... and narrow models leave a GPU idle: utilisation h / (h + 256) (h=768: 0.75, h=128: 0.33).
GPU_HALF_WIDTH = 256
# torch training on a CPU (fp32, oneDNN/MKL): the GEMMs run near the matmul benchmark, the
# rest (layer norm, softmax, GELU, AdamW) is memory-bound; Karpathy's CPU recipe (0.8M params,
# 2000 steps of 12x64 tokens in ~3 min on a MacBook) works out at ~0.3-0.4 of numpy's matmul;
# measured here on one core (B11 0.8M, 2000 steps in 105 s) at 0.5 of it.
EFF_CPU_TRAIN = 0.50
CPU_HALF_WIDTH = 32
# numpy code written by a learner (B8, B10): no fused kernels, a temporary per operation
# (measured here: B10's attention 0.45 of the matmul rate, B8's MLP on Fashion-MNIST 0.3).
EFF_NUMPY_TRAIN = 0.36
# Eager PyTorch pays fixed time per optimizer micro-step (Python, optimizer, loss sync) and per
# layer (~100-150 eager ops forward + backward at 5-8 us each): what keeps tiny models from
# using a GPU, and why a small model is only 10-50x faster there than on a laptop CPU (REFERENCE.md).
STEP_OVERHEAD_S = 2e-3
LAYER_OVERHEAD_S = 0.8e-3
NUMPY_LAYER_OVERHEAD_S = 0.3e-3   # ~60 numpy calls per layer per step at ~5 us each
# Convolutions (cuDNN / oneDNN) on small images reach less of the matmul rate than GEMMs.
EFF_GPU_CONV = 0.35
EFF_CPU_CONV = 0.30
EFF_LSTM = 0.30                   # an LSTM steps through time: small matmuls, one per step
PY_SCALAR_OP_S = 1e-6             # micrograd: one Python Value object per scalar operation
_OPT_BYTES = {"sgd": 0, "momentum": 4, "adam": 8}   # optimizer state per fp32 parameter: none, a velocity, m and v


def _steps_overhead(micro_steps: float, layers: int, t: Target, framework: str) -> tuple[float, str]:
    if framework == "numpy":
        per = layers * NUMPY_LAYER_OVERHEAD_S
    else:
        per = STEP_OVERHEAD_S + layers * LAYER_OVERHEAD_S
    s = micro_steps * per
    return s, f"fixed cost per step: {micro_steps:,.0f} steps x {per * 1e3:.2g} ms = {fmt_seconds(s)}"


def _width_util(width: int, t: Target) -> float:
    half = GPU_HALF_WIDTH if t.gpu else CPU_HALF_WIDTH
    return width / (width + half)


def _train_time(p: Profile, t: Target, flop: float, width: int, dtype: str, framework: str,
                eff_gpu: float = EFF_GPU_TRAIN, eff_cpu: float = EFF_CPU_TRAIN) -> tuple[float, list[str]]:
    """FLOPs over (measured FLOP/s x efficiency x width utilisation)."""
    rate, line = flops(p, t, dtype)
    eff = EFF_NUMPY_TRAIN if framework == "numpy" else (eff_gpu if t.gpu else eff_cpu)
    util = _width_util(width, t)
    cores = usable_cpus(p) if framework == "numpy" and not t.gpu else 1
    if cores > 1:   # a learner's numpy: small matmuls that more BLAS threads do not speed up (B10: 90 s on 1 CPU, 86 on 2)
        rate, line = rate / cores, f"{line}, numpy at one CPU's share: / {cores}"
    s = flop / (rate * eff * util)
    return s, [line, (f"compute: {flop:.3g} FLOP / ({rate / 1e12:.3g} TFLOP/s x efficiency {eff:g} x width "
                     f"utilisation {util:.2f}) = {fmt_seconds(s)}")]


def price_gpt_train(r: catalog.GPTTrain, t: Target, p: Profile, m: Milestone) -> Priced:
    """Pretraining or fine-tuning a GPT (the whole model, or LoRA adapters on a frozen base)."""
    shape = r.shape()
    numpy = r.framework == "numpy"
    dtype = "fp32" if numpy else mixed_dtype(t)
    flash = not numpy and t.kind != "mps"
    tokens = r.steps * r.grad_accum * r.batch_size * r.block_size
    cost = costs.gpt_train(shape, r.batch_size, tokens, dtype, flash, lora_rank=r.lora_rank or 0)
    runtime, rt_lines = runtime_bytes(r.framework, t, m)
    need = cost.peak_bytes + sum(runtime.values())
    compute, lines = _train_time(p, t, cost.flops, r.n_embd, dtype, r.framework)
    over, over_line = _steps_overhead(r.steps * r.grad_accum, r.n_layer, t, r.framework)
    ev, ev_line = _eval_time(r, shape, p, t, dtype)
    base, base_line = standin_time(r, p, t)
    start, start_line = startup_time(r.framework, t, "matplotlib" in m.needs.packages)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", *lines, over_line, *ev_line, *base_line,
             start_line]
    summary = (f"{fmt_count(cost.params)} params, L{r.n_layer} h{r.n_embd} ctx{r.block_size}, "
               f"{fmt_count(tokens)} tokens, {dtype}{_lora(r.lora_rank, cost)}")
    return Priced(need, compute + over + ev + base + start, basis, [pool_check(t, need)],
                  {"params": cost.params, "tokens": tokens, "dtype": dtype}, summary)


def _eval_time(r: catalog.GPTTrain, shape: costs.GPTShape, p: Profile, t: Target, dtype: str) -> tuple[float, list[str]]:
    """The loss estimates during training: forward passes only (2*N per token), a third of a step's fixed cost."""
    if not r.eval_iters:
        return 0.0, []
    evals, splits = (r.steps // r.eval_interval if r.eval_interval else 0) + 1, r.eval_splits or 1
    batches = evals * splits * r.eval_iters
    flop = 2 * costs.gpt_matmul_params(shape) * batches * r.batch_size * r.block_size
    s, _ = _train_time(p, t, flop, r.n_embd, dtype, r.framework)
    fixed, _ = _steps_overhead(batches / 3, r.n_layer, t, r.framework)
    return s + fixed, [f"loss estimates: {evals} x {splits} splits x {r.eval_iters} batches = {batches:,} forward "
                       f"passes, {flop:.3g} FLOP + a third of a step's fixed cost each = {fmt_seconds(s + fixed)}"]


# A rung with model "standin" first trains its own small char model (tiers/tier2/b12_pretrain.py standin():
# 300 steps of 16 windows, the rung's own shape).
STANDIN_STEPS, STANDIN_BATCH = 300, 16


def standin_time(r: catalog.GPTShaped, p: Profile, t: Target) -> tuple[float, list[str]]:
    """Seconds to train the stand-in a "standin" rung starts from (none for any other model)."""
    if r.model != "standin":
        return 0.0, []
    shape, dtype = r.shape(), mixed_dtype(t)
    tokens = STANDIN_STEPS * STANDIN_BATCH * r.block_size
    compute, _ = _train_time(p, t, costs.gpt_train(shape, STANDIN_BATCH, tokens, dtype).flops, r.n_embd, dtype, "torch")
    fixed, _ = _steps_overhead(STANDIN_STEPS, r.n_layer, t, "torch")
    return compute + fixed, [f"the stand-in model first: {STANDIN_STEPS} steps x {STANDIN_BATCH} x {r.block_size} "
                             f"tokens = {fmt_seconds(compute + fixed)}"]


def _lora(rank: int | None, cost: costs.Cost) -> str:
    return f", LoRA r={rank} ({fmt_count(cost.extra['trainable'])} trained)" if rank else ""


def price_dpo(r: catalog.DPO, t: Target, p: Profile, m: Milestone) -> Priced:
    """DPO: the policy trains on chosen and rejected (2 sequences a pair); a frozen reference scores both.

    Fine-tuning the whole model, the reference is a second, frozen copy in the run's dtype; with
    LoRA it is the same weights with the adapters disabled (peft's disable_adapter), so it costs
    its forward passes and no memory.
    """
    shape = r.shape()
    dtype = mixed_dtype(t)
    seq_tokens = r.pairs * 2 * r.seq * r.epochs
    cost = costs.gpt_train(shape, 2 * r.batch_size, seq_tokens, dtype, t.kind != "mps", seq=r.seq,
                           lora_rank=r.lora_rank or 0)
    ref_bytes = 0 if r.lora_rank else cost.params * costs.BYTES[dtype]
    ref_flops = 2 * cost.extra["matmul_params"] * seq_tokens
    runtime, rt_lines = runtime_bytes("torch", t, m)
    need = cost.peak_bytes + ref_bytes + sum(runtime.values())
    compute, lines = _train_time(p, t, cost.flops + ref_flops, r.n_embd, dtype, "torch")
    over, over_line = _steps_overhead(ceil(r.pairs * r.epochs / r.batch_size) * 2, r.n_layer, t, "torch")
    base, base_line = standin_time(r, p, t)
    start, start_line = startup_time("torch", t, True)
    ref = ("reference: the base with its LoRA adapters disabled, no copy" if r.lora_rank
           else f"reference: a frozen copy ({dtype}) {fmt_bytes(ref_bytes)}")
    basis = [*cost.basis, f"{ref}; its forward passes 2*N per token = {ref_flops:.3g} FLOP", *rt_lines,
             f"peak memory = {fmt_bytes(need)}", *lines, over_line, *base_line, start_line]
    summary = f"{fmt_count(cost.params)} params, {r.pairs:,} pairs x {r.seq} tokens, {dtype}{_lora(r.lora_rank, cost)}"
    return Priced(need, compute + over + base + start, basis, [pool_check(t, need)],
                  {"params": cost.params, "dtype": dtype}, summary)


def image_bytes(samples: int, test: int, pixels: int, t: Target) -> tuple[float, str]:
    """Labelled images as tiers/data/images.py holds them: float32 rows of the training and test images
    (moved whole to a GPU), and in host memory the uint8 files they were decoded from."""
    per = 4 if (t.gpu and not t.unified) else 4 + 1
    data = (samples + test) * pixels * per
    return data, (f"images: {samples + test:,} ({samples:,} training + {test:,} test) x {pixels:,} pixels x float32"
                  f"{'' if per == 4 else ' + the uint8 files'} = {fmt_bytes(data)}")


def price_mlp_train(r: catalog.MLPTrain, t: Target, p: Profile, m: Milestone) -> Priced:
    data, data_line = (image_bytes(r.samples, r.test_samples, r.widths[0], t) if r.test_samples   # images (B8)
                       else (r.samples * r.widths[0] * 4, ""))                                     # synthetic rows (B4)
    epochs = r.epochs * r.runs            # each run (one per optimiser compared) trains from scratch
    cost = costs.mlp_train(r.widths, r.samples, epochs, r.batch, "fp32", _OPT_BYTES[r.optimizer],
                           0 if (t.gpu and not t.unified) else data)
    framework = "python" if r.framework == "python" else r.framework
    runtime, rt_lines = runtime_bytes("torch" if framework == "torch" else "numpy", t, m)
    need = cost.peak_bytes + sum(runtime.values())
    layers = len(r.widths) - 1
    steps = ceil(r.samples / r.batch) * epochs
    if data_line:
        rt_lines.append(data_line)
    if r.runs > 1:
        rt_lines.append(f"{r.runs} runs of {r.epochs:g} epochs (one per optimiser), each from scratch")
    if framework == "python":           # micrograd: every scalar operation is a Python object
        scale, sline = python_speed(p)
        run = cost.flops * PY_SCALAR_OP_S * scale
        lines = [sline, (f"scalar autograd: {cost.flops:.3g} operations x {PY_SCALAR_OP_S * 1e6:g} us = "
                        f"{fmt_seconds(run)}")]
    else:
        run, lines = _train_time(p, t, cost.flops, int(cost.extra["width"]), "fp32", framework)
        over, oline = _steps_overhead(steps, layers, t, framework)
        if framework == "numpy":        # ~10 numpy calls per layer per batch, forward and backward
            over = steps * layers * 10 * NUMPY_CALL_S
            oline = f"fixed cost: {steps:,.0f} batches x {layers} layers x 10 numpy calls = {fmt_seconds(over)}"
        run += over
        lines.append(oline)
    start, start_line = startup_time(framework, t, True)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", *lines, start_line]
    return Priced(need, run + start, basis, [pool_check(t, need)], {"params": cost.params},
                  f"{'-'.join(map(str, r.widths))}, {cost.params:,} params, {r.epochs:g} epochs ({r.framework})")


def price_cnn_train(r: catalog.CNNTrain, t: Target, p: Profile, m: Milestone) -> Priced:
    shape = costs.CNNShape(tuple(r.in_hw), r.in_ch, tuple(r.widths), r.convs_per_stage, tuple(r.fc), r.classes)
    data, data_line = image_bytes(r.samples, r.test_samples, r.in_hw[0] * r.in_hw[1] * r.in_ch, t)
    cost = costs.cnn_train(shape, r.samples, r.epochs, r.batch, "fp32", data)
    runtime, rt_lines = runtime_bytes("torch", t, m)
    rt_lines.append(data_line)
    need = cost.peak_bytes + sum(runtime.values())
    run, lines = _train_time(p, t, cost.flops, int(cost.extra["width"]), "fp32", "torch", EFF_GPU_CONV, EFF_CPU_CONV)
    layers = len(r.widths) * r.convs_per_stage + len(r.fc) + 1
    over, oline = _steps_overhead(ceil(r.samples / r.batch) * r.epochs, layers, t, "torch")
    start, start_line = startup_time("torch", t, True)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", *lines, oline, start_line]
    return Priced(need, run + over + start, basis, [pool_check(t, need)], {"params": cost.params},
                  f"{fmt_count(cost.params)} params, {fmt_count(cost.extra['macs'])} MACs/sample, {r.epochs:g} epochs")


def price_lstm_train(r: catalog.LSTMTrain, t: Target, p: Profile, m: Milestone) -> Priced:
    tokens = r.steps * r.batch * r.seq
    cost = costs.lstm_train(r.vocab, r.embed, r.hidden, r.layers, r.batch, r.seq, tokens)
    runtime, rt_lines = runtime_bytes("torch", t, m)
    need = cost.peak_bytes + sum(runtime.values())
    run, lines = _train_time(p, t, cost.flops, r.hidden, "fp32", "torch", EFF_GPU_TRAIN * EFF_LSTM,
                             EFF_CPU_TRAIN * EFF_LSTM)
    over, oline = _steps_overhead(r.steps, r.layers, t, "torch")
    start, start_line = startup_time("torch", t, True)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", *lines, oline, start_line]
    return Priced(need, run + over + start, basis, [pool_check(t, need)], {"params": cost.params, "tokens": tokens},
                  f"{fmt_count(cost.params)} params, {r.layers}x{r.hidden}, {fmt_count(tokens)} tokens")
