"""Analytic cost models: parameters, FLOPs, bytes, from plain numbers.

Each function here is pure arithmetic over a workload's shape (no device, no
framework): it returns a `Cost` that says how many parameters the model has,
how many floating-point operations the workload does, how many bytes it must
move, and which bytes sit in memory at the peak, part by part. The planner
(tiers/fit/) divides these by a profile's measured throughput; this module
never looks at hardware. Every Cost carries its `basis`: the formulas with the
numbers filled in, which `tierkit fit --explain` prints.

Sources for the formulas (see ../shared/REFERENCE.md, "Memory and time formulas"):
- training state: 16 bytes/param for Adam, fp32 or mixed precision (ZeRO, Rajbhandari et al. 2020)
- activations per layer: s*b*h*(34 + 5*a*s/h) B in 16-bit (Korthikanti et al. 2022) x EAGER_ACTIVATIONS
- training compute: 6*N*D (+ 6*L*s*h per token for attention, Kaplan et al. 2020)
- decode: tokens/s <= bandwidth / bytes read per token (weights + KV cache)
- DS-CNN: the MLPerf Tiny keyword-spotting reference (22.6K params, 2.66M MACs, 53,936 B, arena 24,272 B)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from math import ceil

from inventory.units import KB, MB, fmt_bytes

# ---------------------------------------------------------------- units and formatting

HEADROOM = 0.10   # fraction of a device's free memory never planned for: OS, allocator slack, other users
BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "int8": 1}


def fmt_count(n: float) -> str:
    """1234 -> 1.23K, 124_439_808 -> 124M."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.3g}{unit}" if v < 100 else f"{v:,.0f}{unit}"
    return f"{n:g}"


def fmt_flops(n: float) -> str:
    return f"{n:.3g} FLOP"


@dataclass
class Cost:
    """What a workload needs, independent of the machine that runs it."""

    params: int = 0                                    # model parameters
    flops: float = 0.0                                 # floating-point operations, whole workload
    bytes_moved: float = 0.0                           # bytes that must cross memory (memory-bound work)
    memory: dict[str, float] = field(default_factory=dict)  # resident bytes at the peak, by part
    basis: list[str] = field(default_factory=list)     # the arithmetic, for --explain
    extra: dict[str, float] = field(default_factory=dict)   # other derived numbers (MACs, tokens, ...)

    @property
    def peak_bytes(self) -> float:
        return float(sum(self.memory.values()))

    def memory_line(self) -> str:
        parts = " + ".join(f"{k} {fmt_bytes(v)}" for k, v in self.memory.items() if v)
        return f"memory = {parts} = {fmt_bytes(self.peak_bytes)}"


# ---------------------------------------------------------------- runtime overheads
# Resident bytes a process holds before the workload allocates anything. Measured
# here (Python 3.11, Linux x86-64) unless REFERENCE.md gives a figure.

PYTHON_NUMPY_BYTES = 60 * MB     # interpreter + tierkit CLI + numpy: 51 MB RSS measured
MATPLOTLIB_BYTES = 50 * MB       # `import matplotlib.pyplot` added 38 MB RSS here, drawing and saving 3 panels 11 MB
TORCH_BYTES = 350 * MB           # Python + tierkit + torch after its first backward pass: 325 MB RSS bare, ~345 under the CLI
CUDA_CONTEXT_BYTES = 400 * MB    # the CUDA context on the GPU: 300-500 MB (REFERENCE.md)
TENSORFLOW_BYTES = 700 * MB      # Python + TensorFlow/Keras on a CPU (estimate: TF 2.x imports ~0.5-0.8 GB)
LLAMA_CPP_BYTES = 150 * MB       # Python + llama-cpp-python, before model and compute buffers (estimate)
SKLEARN_BYTES = 75 * MB          # `from sklearn.manifold import TSNE` (scipy included) added 73 MB RSS here
TIKTOKEN_BYTES = 60 * MB         # tiktoken + regex + the gpt2 and cl100k ranks, in Python and in its Rust core (estimate)
SPM_BYTES_PER_BYTE = 20          # SentencePiece training holds the corpus and its pieces (estimate)


def runtime_overhead(framework: str, on_gpu: bool = False) -> tuple[dict[str, float], str]:
    """(memory parts, basis line) of the process before the workload; GPU runs add the CUDA context."""
    host = {"numpy": PYTHON_NUMPY_BYTES, "torch": TORCH_BYTES, "tensorflow": TENSORFLOW_BYTES,
            "llama.cpp": LLAMA_CPP_BYTES, "python": PYTHON_NUMPY_BYTES}[framework]
    if on_gpu:
        return {"CUDA context": CUDA_CONTEXT_BYTES}, f"runtime: CUDA context {fmt_bytes(CUDA_CONTEXT_BYTES)}"
    return {"runtime": host}, f"runtime: Python + {framework} {fmt_bytes(host)}"


# ---------------------------------------------------------------- GPT (nanoGPT-style decoder)

@dataclass(frozen=True)
class GPTShape:
    """The shape of a nanoGPT-style decoder (models/gpt.py builds the same thing in torch)."""

    vocab_size: int
    block_size: int          # context length
    n_layer: int
    n_head: int
    n_embd: int
    bias: bool = True        # biases in Linear and LayerNorm, as GPT-2 (llama: on q, k, v only, as Qwen2)
    tied: bool = True        # lm_head shares the token embedding's weights
    arch: str = "gpt2"       # gpt2: learned positions, GELU MLP 4h; llama: RoPE, RMSNorm, SwiGLU (Llama, Qwen2)
    n_kv_head: int | None = None    # llama: grouped-query attention's K/V heads (None: n_head)
    ffn_hidden: int | None = None   # llama: the SwiGLU width f (None: 8h/3 rounded up to 32, as models/gpt.py)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def llama_widths(s: GPTShape) -> tuple[int, int]:
    """(K/V heads, SwiGLU width f) of a llama-shaped model: n_head and 8h/3 rounded up to 32 unless given."""
    return s.n_kv_head or s.n_head, s.ffn_hidden or 32 * math.ceil(8 * s.n_embd / 3 / 32)


def gpt_params(s: GPTShape) -> int:
    """Exact parameter count of models/gpt.py's GPT (what sum(p.numel()) says).

    per block: LayerNorm 2h (+2h bias) + attention 4h^2 (+4h) + MLP 8h^2 (+5h)
             = 12h^2 + 2h + 11h if biased
    plus token embedding V*h, position embedding T*h, final LayerNorm h (+h),
    and an untied lm_head V*h (no bias, as nanoGPT).
    """
    if s.arch == "llama":
        return llama_params(s.vocab_size, s.n_layer, s.n_embd, s.n_head, s.n_kv_head, s.ffn_hidden, s.tied, s.bias)
    h, b = s.n_embd, int(s.bias)
    block = 12 * h * h + 2 * h + 11 * h * b
    return (s.vocab_size * h + s.block_size * h + s.n_layer * block + h + h * b
            + (0 if s.tied else s.vocab_size * h))


def llama_params(vocab_size: int, n_layer: int, n_embd: int, n_head: int, n_kv_head: int | None = None,
                 hidden: int | None = None, tied: bool = True, qkv_bias: bool = False) -> int:
    """Exact parameter count of models/gpt.py's llama flavour (RoPE: no position table; no biases),
    and of transformers' Llama and Qwen2 (qkv_bias: Qwen2's biases on q, k and v).

    per block: RMSNorm 2h + q, k, v h*(n_head + 2 n_kv_head)*d + output h^2 + SwiGLU 3*h*f
    plus token embedding V*h, final RMSNorm h, and an untied lm_head V*h.
    f defaults as in models/gpt.py: 8h/3 rounded up to a multiple of 32.
    (SmolLM2-135M: V=49152, L=30, h=576, 9 heads, 3 KV heads, f=1536, tied -> 134,515,008.)
    """
    h, d, kv = n_embd, n_embd // n_head, n_kv_head or n_head
    f = hidden or 32 * math.ceil(8 * h / 3 / 32)
    block = 2 * h + h * (n_head + 2 * kv) * d + h * h + 3 * h * f + (h + 2 * kv * d) * int(qkv_bias)
    return vocab_size * h + n_layer * block + h + (0 if tied else vocab_size * h)


def gpt_params_basis(s: GPTShape) -> str:
    h = s.n_embd
    head = "" if s.tied else " + V*h (untied head)"
    if s.arch == "llama":
        bias, (kv, f) = " + qkv bias" if s.bias else "", llama_widths(s)
        return (f"params = V*h + L*(2h + h*(a + 2*kv)*d + h^2 + 3*h*f{bias}) + h{head} (llama: RoPE, SwiGLU) "
                f"with V={s.vocab_size}, L={s.n_layer}, h={h}, a={s.n_head}, kv={kv}, d={s.head_dim}, "
                f"f={f} = {gpt_params(s):,}")
    bias = " + 11h" if s.bias else ""
    return (f"params = V*h + T*h + L*(12h^2 + 2h{bias}) + LN_f{head} with V={s.vocab_size}, T={s.block_size}, "
            f"L={s.n_layer}, h={h} = {gpt_params(s):,}")


def lora_params(s: GPTShape, rank: int) -> int:
    """LoRA adapters (peft: A r x in, B out x r) on every linear of every block; embeddings, head frozen.

    per layer, gpt2: c_attn h->3h, c_proj h->h, c_fc h->4h, c_proj 4h->h: r*16h; llama: q, o h->h,
    k, v h->kv*d, gate, up h->f, down f->h: r*(9h + 2*kv*d + 3f)
    """
    kv, f = llama_widths(s)
    per_layer = 9 * s.n_embd + 2 * kv * s.head_dim + 3 * f if s.arch == "llama" else 16 * s.n_embd
    return s.n_layer * rank * per_layer


def gpt_matmul_params(s: GPTShape) -> int:
    """Parameters that take part in a matmul per token: all but the embedding lookups.

    The position embedding is a lookup; with tied weights the token embedding is
    counted once, as the lm_head matmul (2*V*h FLOPs per token forward).
    """
    positions = 0 if s.arch == "llama" else s.block_size * s.n_embd   # RoPE has no table
    return gpt_params(s) - positions - (0 if s.tied else s.vocab_size * s.n_embd)


def gpt_activation_bytes(s: GPTShape, batch: int, seq: int, value_bytes: int = 2, flash: bool = True) -> float:
    """Activations kept for the backward pass, all layers (Korthikanti et al. 2022, no recomputation),
    times EAGER_ACTIVATIONS. s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit (doubled in fp32); the
    5*a*s/h term is the attention scores, which a fused (flash) kernel never stores. llama (no dropout,
    in the same spirit): attention keeps its input, Q, grouped-query K and V and the projection's input,
    2*(3 + 2*kv/a)*h; two RMSNorm inputs 4h; SwiGLU its input 2h and gate, up, silu(gate), product 8f.
    """
    scores = 0 if flash else 5 * s.n_head * seq / s.n_embd
    if s.arch == "llama":
        kv, f = llama_widths(s)
        per_value = 12 + 4 * kv / s.n_head + 8 * f / s.n_embd + scores
    else:
        per_value = 34 + scores
    return s.n_layer * seq * batch * s.n_embd * per_value * (value_bytes / 2) * EAGER_ACTIVATIONS[s.arch]


# Eager PyTorch holds more at a training step's peak: unfused RMSNorm, RoPE and SwiGLU keep their
# intermediates, and early in the backward the activations' gradients sit beside them. Measured here
# (torch 2.13, CPU, fp32, peak RSS of one step at two batch sizes, per s*b*h*L): llama 125 B (L6 h384)
# and 122 B (L4 h768) against the count's 75; gpt2 100 B and 86 B against 68.
EAGER_ACTIVATIONS = {"llama": 1.65, "gpt2": 1.35}


def logits_bytes(batch: int, seq: int, vocab: int) -> float:
    """fp32 logits and their gradient: b*s*V*4 x 2 (REFERENCE.md)."""
    return 2 * batch * seq * vocab * 4


def gpt_train(s: GPTShape, batch: int, tokens: float, dtype: str = "fp32", flash: bool = True,
              seq: int | None = None, lora_rank: int = 0) -> Cost:
    """Training a GPT with AdamW: memory for one micro-batch, FLOPs for `tokens` tokens.

    dtype 'fp32' keeps everything in fp32; 'bf16'/'fp16' is mixed precision (16-bit
    activations, fp32 master weights and Adam state). Both hold 16 bytes per param.
    lora_rank > 0 (LoRA, Hu et al. 2021): only the adapters train, so only they have
    gradients and Adam state (16 B each); the frozen base sits in the run's dtype. The
    activations are the same (the gradient still flows back through every layer), and a
    token costs 4*N (forward, and backward to the activations: no weight gradients for the
    base) + 6*N_adapters instead of 6*N.
    """
    seq = seq or s.block_size
    n = gpt_params(s)
    nm = gpt_matmul_params(s)
    value_bytes = 4 if dtype == "fp32" else 2
    acts = gpt_activation_bytes(s, batch, seq, value_bytes, flash)
    logits = logits_bytes(batch, seq, s.vocab_size)
    attn_flops = 6 * s.n_layer * seq * s.n_embd
    attn = "" if flash else " + 5*a*s/h"
    precision = "fp32" if dtype == "fp32" else f"mixed {dtype}"
    if lora_rank:
        na = lora_params(s, lora_rank)
        weights = {"frozen base": n * BYTES[dtype], "adapters+grads+Adam": 16 * na}
        per_token = 4 * nm + 6 * na + attn_flops
        state_lines = [f"frozen base ({dtype}): {fmt_count(n)} x {BYTES[dtype]} B = {fmt_bytes(n * BYTES[dtype])}",
                       (f"LoRA r={lora_rank} on every block linear: {na:,} adapter params x 16 B (weights, grads, "
                       f"AdamW m, v) = {fmt_bytes(16 * na)}")]
        flop_line = f"(4*{fmt_count(nm)} + 6*{fmt_count(na)} adapters + 6*L*s*h)"
    else:
        na, weights = 0, {"weights+grads+Adam": 16 * n}
        per_token = 6 * nm + attn_flops
        state_lines = [f"weights + grads + AdamW m, v ({precision}): 16 B/param x {fmt_count(n)} = {fmt_bytes(16 * n)}"]
        flop_line = f"(6*N_matmul + 6*L*s*h) = (6*{fmt_count(nm)} + 6*{s.n_layer}*{seq}*{s.n_embd})"
    flops = per_token * tokens
    basis = [
        gpt_params_basis(s), *state_lines,
        (f"activations: L*s*b*({'(12 + 4*kv/a)*h + 8f' if s.arch == 'llama' else '34h'}{attn}) x {value_bytes / 2:g}"
         f" (Korthikanti, {'flash attention' if flash else 'attention scores stored'}) x {EAGER_ACTIVATIONS[s.arch]:g}"
         f" (eager PyTorch, measured) with s={seq}, b={batch} = {fmt_bytes(acts)}"),
        f"logits: b*s*V*4 x 2 = {batch}*{seq}*{s.vocab_size}*4*2 = {fmt_bytes(logits)}",
        f"FLOPs = {flop_line} per token x D = {fmt_count(tokens)} tokens = {fmt_flops(flops)}",
    ]
    return Cost(params=n, flops=flops, memory={**weights, "activations": acts, "logits": logits},
                basis=basis, extra={"tokens": tokens, "matmul_params": nm, "trainable": na or n})


def kv_cache_bytes(n_layer: int, kv_heads: int, head_dim: int, ctx: int, batch: int = 1,
                   value_bytes: float = 2) -> float:
    """2 (K and V) x layers x kv_heads x head_dim x context x batch x bytes."""
    return 2 * n_layer * kv_heads * head_dim * ctx * batch * value_bytes


def gpt_infer(s: GPTShape, dtype: str, ctx: int, new_tokens: int, prompt_tokens: int = 0, batch: int = 1,
              requests: int = 1) -> Cost:
    """Generation with a KV cache: weights + cache resident; each new token reads them all once."""
    n, b = gpt_params(s), BYTES[dtype]
    weights = n * b
    kv_heads = llama_widths(s)[0]
    kv = kv_cache_bytes(s.n_layer, kv_heads, s.head_dim, ctx, batch, b)
    per_token_bytes = weights + kv / 2      # on average the cache is half full while decoding
    tokens = (new_tokens + prompt_tokens) * requests
    flops = 2 * gpt_matmul_params(s) * tokens
    basis = [gpt_params_basis(s),
             f"weights: {fmt_count(n)} x {b} B ({dtype}) = {fmt_bytes(weights)}",
             (f"KV cache: 2*L*kv_heads*head_dim*ctx*batch*bytes = 2*{s.n_layer}*{kv_heads}*{s.head_dim}*{ctx}*{batch}*{b}"
             f" = {fmt_bytes(kv)}"),
             f"decode reads weights + KV/2 per token = {fmt_bytes(per_token_bytes)}; FLOPs 2*N per token"]
    return Cost(params=n, flops=flops, bytes_moved=per_token_bytes * new_tokens * requests,
                memory={"weights": weights, "KV cache": kv}, basis=basis,
                extra={"bytes_per_token": per_token_bytes, "decode_tokens": new_tokens * requests,
                       "prefill_tokens": prompt_tokens * requests})


def int8_copy(s: GPTShape) -> Cost:
    """Dynamic int8 quantisation of every Linear: int8 weights + one fp32 scale per output row."""
    n = gpt_params(s)
    rows = s.n_layer * (3 + 1 + 4 + 1) * s.n_embd + s.vocab_size
    q = gpt_matmul_params(s) + 4 * rows
    return Cost(params=n, memory={"int8 copy": q},
                basis=[f"int8 copy: 1 B per matmul weight + 4 B per output row = {fmt_bytes(q)}"])


# ---------------------------------------------------------------- MLP

def mlp_params(widths: list[int]) -> int:
    """Dense layers in -> ... -> out, each with a bias: sum(w_i * w_{i+1} + w_{i+1})."""
    return sum(a * b + b for a, b in pairwise(widths))


def mlp_train(widths: list[int], samples: int, epochs: float, batch: int, dtype: str = "fp32",
              optimizer_bytes_per_param: float = 4, dataset_bytes: float = 0) -> Cost:
    """Minibatch training of an MLP: 2*params FLOPs per sample forward, 6* with backward.

    Memory: weights + grads (+ optimizer state: 4 B/param for SGD momentum, 8 for Adam,
    in the dtype's size) + the batch's activations (each layer's output and its
    pre-activation) + the dataset held in memory.
    """
    n, b = mlp_params(widths), BYTES[dtype]
    state = n * (2 * b + optimizer_bytes_per_param * b / 4)
    acts = 2 * batch * sum(widths) * b
    flops = 6 * n * samples * epochs
    basis = [f"params = sum(w_i*w_(i+1) + w_(i+1)) over {widths} = {n:,}",
             (f"weights + grads + optimizer: {fmt_count(n)} x {2 * b + optimizer_bytes_per_param * b / 4:g} B "
             f"= {fmt_bytes(state)}; activations 2*batch*sum(widths)*{b} B = {fmt_bytes(acts)}"),
             f"FLOPs = 6*N*samples*epochs = 6*{n:,}*{samples:,}*{epochs:g} = {fmt_flops(flops)}"]
    mem = {"weights+grads+optimizer": state, "activations": acts}
    if dataset_bytes:
        mem["dataset"] = dataset_bytes
        basis.append(f"dataset in memory: {fmt_bytes(dataset_bytes)}")
    return Cost(params=n, flops=flops, memory=mem, basis=basis, extra={"width": max(widths[1:-1] or widths)})


# ---------------------------------------------------------------- small CNN (VGG-style)

@dataclass(frozen=True)
class CNNShape:
    """Stages of 3x3 'same' convs (ReLU), each stage ending in a 2x2 max-pool; then FC layers."""

    in_hw: tuple[int, int]
    in_ch: int
    widths: tuple[int, ...]          # channels per stage
    convs_per_stage: int = 1
    fc: tuple[int, ...] = (128,)
    classes: int = 10
    kernel: int = 3


def cnn_counts(s: CNNShape) -> tuple[int, int, int]:
    """(params, MACs per sample, activation values per sample)."""
    h, w = s.in_hw
    c_in, params, macs, acts = s.in_ch, 0, 0, 0
    k2 = s.kernel * s.kernel
    for c in s.widths:
        for _ in range(s.convs_per_stage):
            params += k2 * c_in * c + c
            macs += h * w * k2 * c_in * c
            acts += h * w * c
            c_in = c
        h, w = h // 2, w // 2
        acts += h * w * c
    flat = h * w * c_in
    for a, b in zip((flat, *s.fc), (*s.fc, s.classes)):
        params += a * b + b
        macs += a * b
        acts += b
    return params, macs, acts


def cnn_train(s: CNNShape, samples: int, epochs: float, batch: int, dtype: str = "fp32",
              dataset_bytes: float = 0) -> Cost:
    """Training with Adam: 16 B/param; activations stored twice (conv output, ReLU mask/output); 6*MACs FLOPs."""
    params, macs, acts = cnn_counts(s)
    b = BYTES[dtype]
    act_bytes = 2 * acts * batch * b
    flops = 2 * 3 * macs * samples * epochs
    basis = [(f"CNN {s.widths} x{s.convs_per_stage} on {s.in_hw[0]}x{s.in_hw[1]}x{s.in_ch}, fc {s.fc}: "
             f"{params:,} params, {fmt_count(macs)} MACs/sample"),
             (f"weights + grads + Adam: 16 B x {params:,} = {fmt_bytes(16 * params)}; activations 2 x {fmt_count(acts)} "
             f"values x batch {batch} x {b} B = {fmt_bytes(act_bytes)}"),
             f"FLOPs = 2 FLOP/MAC x 3 (fwd+bwd) x MACs x samples x epochs = {fmt_flops(flops)}"]
    mem = {"weights+grads+Adam": 16 * params, "activations": act_bytes}
    if dataset_bytes:
        mem["dataset"] = dataset_bytes
    return Cost(params=params, flops=flops, memory=mem, basis=basis, extra={"macs": macs, "width": max(s.widths)})


# ---------------------------------------------------------------- DS-CNN keyword spotter (tier 0)

@dataclass(frozen=True)
class DSCNNShape:
    """The MLPerf Tiny KWS DS-CNN: Conv 10x4 stride 2 -> blocks x [DW 3x3, PW 1x1] -> avg pool -> FC.

    Batch norm is folded into the convolutions (as the int8 .tflite holds it).
    """

    channels: int = 64
    blocks: int = 4
    classes: int = 12
    input_hw: tuple[int, int] = (49, 10)    # 49 frames x 10 MFCCs
    first_kernel: tuple[int, int] = (10, 4)
    stride: tuple[int, int] = (2, 2)


# Flatbuffer bytes the converter adds per tensor (name, shape, buffer record, quantisation
# table header) and per model (operator codes, subgraph, metadata): fitted so the MLPerf
# reference model comes out at its published 53,936 B.
TFLITE_TENSOR_BYTES = 400
TFLITE_FIXED_BYTES = 2_000
# TFLite Micro's arena beyond the activation buffers: per-tensor eval structs and allocation
# records (~64 B), per-op node data (~112 B), and 8 B of requantisation data (multiplier + shift,
# int32 each) per output channel of every conv. Fitted to the reference arena of 24,272 B.
TFLM_TENSOR_BYTES = 64
TFLM_OP_BYTES = 112


def dscnn(s: DSCNNShape = DSCNNShape()) -> Cost:
    """Params, MACs, int8 .tflite bytes and the TFLite Micro arena of a DS-CNN."""
    c, (H, W) = s.channels, s.input_hw
    h, w = ceil(H / s.stride[0]), ceil(W / s.stride[1])           # 'same' padding
    kh, kw = s.first_kernel
    conv_w, conv_b = kh * kw * c, c
    dw_w, pw_w = 9 * c, c * c
    fc_w, fc_b = c * s.classes, s.classes
    weights = conv_w + s.blocks * (dw_w + pw_w) + fc_w            # int8
    biases = conv_b + s.blocks * 2 * c + fc_b                     # int32
    params = weights + biases
    pos = h * w
    macs = pos * c * kh * kw + s.blocks * (pos * c * 9 + pos * c * c) + c * s.classes
    convs = 1 + 2 * s.blocks
    per_channel = convs * c                                       # per-channel quantised conv outputs
    tensors = 1 + 3 * (convs + 1) + 3                             # input; w, b, out per layer; pool, reshape, softmax
    ops = convs + 4                                               # convs, pool, reshape, fc, softmax
    quant = per_channel * 12 * 2 + (tensors - 2 * convs) * 12     # scale f32 + zero point i64, weights and biases
    model_bytes = weights + 4 * biases + quant + tensors * TFLITE_TENSOR_BYTES + TFLITE_FIXED_BYTES
    in_bytes, act = H * W, pos * c                                # int8 activations
    peak_pair = max(in_bytes + act, 2 * act)                      # a sequential net ping-pongs two buffers
    arena = peak_pair + 8 * per_channel + tensors * TFLM_TENSOR_BYTES + ops * TFLM_OP_BYTES
    basis = [
        f"DS-CNN {c} ch x {s.blocks} blocks on {H}x{W} MFCC: conv {kh}x{kw}/{s.stride[0]} -> {h}x{w}x{c}",
        (f"params = conv {conv_w}+{conv_b} + {s.blocks} x (dw {dw_w}+{c} + pw {pw_w}+{c}) + fc {fc_w}+{fc_b} "
        f"= {params:,} (BN folded)"),
        f"MACs = {pos}*{c}*{kh * kw} + {s.blocks} x ({pos}*{c}*9 + {pos}*{c}*{c}) + {c}*{s.classes} = {macs:,}",
        (f"int8 .tflite = {weights:,} int8 weights + 4 x {biases} int32 biases + {quant:,} quant params + "
        f"{tensors} tensors x {TFLITE_TENSOR_BYTES} + {TFLITE_FIXED_BYTES:,} = {model_bytes:,} B"),
        (f"arena = 2 live activation buffers {peak_pair:,} + requant 8 x {per_channel} + {tensors} x "
        f"{TFLM_TENSOR_BYTES} + {ops} x {TFLM_OP_BYTES} = {arena:,} B"),
    ]
    return Cost(params=params, flops=2 * macs, memory={"arena": arena}, basis=basis,
                extra={"macs": macs, "model_bytes": model_bytes, "arena_bytes": arena})


# ---------------------------------------------------------------- LSTM language model

def lstm_params(vocab: int, embed: int, hidden: int, layers: int) -> int:
    """torch.nn.LSTM: 4h(x + h) + 8h per layer (two bias vectors); embedding V*e; head h*V + V."""
    total, x = vocab * embed, embed
    for _ in range(layers):
        total += 4 * hidden * (x + hidden) + 8 * hidden
        x = hidden
    return total + hidden * vocab + vocab


def lstm_train(vocab: int, embed: int, hidden: int, layers: int, batch: int, seq: int, tokens: float,
               dtype: str = "fp32") -> Cost:
    """BPTT over `seq` steps: 6*N FLOPs per token; ~10 values per hidden unit per step kept (gates, cell, out)."""
    n, b = lstm_params(vocab, embed, hidden, layers), BYTES[dtype]
    acts = 10 * hidden * layers * batch * seq * b + logits_bytes(batch, seq, vocab)
    flops = 6 * n * tokens
    basis = [f"LSTM params = V*e + sum(4h(x+h) + 8h) + h*V + V = {n:,}",
             f"16 B/param (Adam) = {fmt_bytes(16 * n)}; activations 10*h*L*b*s*{b} + logits = {fmt_bytes(acts)}",
             f"FLOPs = 6*N*tokens = {fmt_flops(flops)}"]
    return Cost(params=n, flops=flops, memory={"weights+grads+Adam": 16 * n, "activations": acts}, basis=basis,
                extra={"width": hidden})


# ---------------------------------------------------------------- GGUF models (llama.cpp)

# Bytes per parameter by quantisation, block scales included (REFERENCE.md; Q8_0 = 8.5 bits,
# Q4_0 = 4.5 bits; Q4_K_M mixes 4- and 6-bit blocks, ~4.6-4.9 bits in practice).
GGUF_BYTES_PER_PARAM = {"F32": 4.0, "F16": 2.0, "Q8_0": 1.0625, "Q6_K": 0.82, "Q5_K_M": 0.71, "Q4_K_M": 0.58,
                        "Q4_0": 0.5625}


@dataclass(frozen=True)
class GGUFModel:
    """What the cost of a llama.cpp model depends on (from each model's config.json)."""

    name: str
    params: float
    n_layer: int
    kv_heads: int
    head_dim: int
    hidden: int


GGUF_MODELS = {m.name: m for m in (
    GGUFModel("b12", 10.65e6, 6, 6, 64, 384),    # your B12 model at its char-10.7M size, exported by B16
    GGUFModel("qwen2.5-0.5b", 0.494e9, 24, 2, 64, 896),
    GGUFModel("tinyllama-1.1b", 1.10e9, 22, 4, 64, 2048),
    GGUFModel("llama-3.2-1b", 1.24e9, 16, 8, 64, 2048),
    GGUFModel("llama-3.2-3b", 3.21e9, 28, 8, 128, 3072),
    GGUFModel("llama-3.1-8b", 8.03e9, 32, 8, 128, 4096),
    GGUFModel("llama-2-13b", 13.0e9, 40, 40, 128, 5120),
    GGUFModel("qwen2.5-32b", 32.8e9, 64, 8, 128, 5120),
    GGUFModel("llama-3.1-70b", 70.6e9, 80, 8, 128, 8192),
)}


def gguf_family(name: str) -> tuple[str, str] | None:
    """A GGUF's registry name as (family, quantisation): 'llama-3.1-8b-instruct-q4_k_m' -> ('llama-3.1-8b',
    'Q4_K_M'), the stem being a family of GGUF_MODELS (plus -instruct, -chat); None if it is not one."""
    low = name.strip().lower()
    for quant in GGUF_BYTES_PER_PARAM:
        if low.endswith("-" + quant.lower()):
            stem = low[: -len(quant) - 1]
            return next(((f, quant) for f in GGUF_MODELS if stem == f or stem.startswith(f + "-")), None)
    return None


# llama.cpp's compute buffers (logits, scratch for one batch of the prompt): grows with the
# context; ~0.25 GB at 4K context for 8B-class models (estimate from llama.cpp's load log).
LLAMA_COMPUTE_BYTES_PER_CTX = 60 * KB


def gguf(model: str, quant: str, ctx: int, prompt_tokens: int, new_tokens: int, requests: int = 1,
         kv_bytes: float = 2, file_bytes: float | None = None) -> Cost:
    """A GGUF model under llama.cpp: weights (the file's size when known: K-quant mixes keep some tensors
    at higher precision) + f16 KV cache + compute buffers."""
    m = GGUF_MODELS[model]
    bpp = file_bytes / m.params if file_bytes else GGUF_BYTES_PER_PARAM[quant]
    weights = m.params * bpp
    kv = kv_cache_bytes(m.n_layer, m.kv_heads, m.head_dim, ctx, 1, kv_bytes)
    compute = ctx * LLAMA_COMPUTE_BYTES_PER_CTX
    avg_kv = kv_cache_bytes(m.n_layer, m.kv_heads, m.head_dim, prompt_tokens + new_tokens / 2, 1, kv_bytes)
    per_token = weights + avg_kv
    basis = [f"{model} {quant}: {fmt_count(m.params)} params x {bpp:.3g} B{' (its file)' * bool(file_bytes)} = {fmt_bytes(weights)}",
             (f"KV cache (f16): 2*{m.n_layer}*{m.kv_heads}*{m.head_dim}*{ctx}*{kv_bytes:g} = {fmt_bytes(kv)}; "
             f"compute buffers {fmt_bytes(compute)}"),
             f"each decoded token reads weights + KV so far ~ {fmt_bytes(per_token)}"]
    return Cost(params=int(m.params), flops=2 * m.params * (prompt_tokens + new_tokens) * requests,
                bytes_moved=per_token * new_tokens * requests,
                memory={"weights": weights, "KV cache": kv, "compute buffers": compute}, basis=basis,
                extra={"bytes_per_token": per_token, "prefill_tokens": prompt_tokens * requests,
                       "decode_tokens": new_tokens * requests, "hidden": m.hidden, "n_layer": m.n_layer})


# ---------------------------------------------------------------- matmul (B5, the roofline)

def matmul(n: int, dtype: str = "fp32") -> Cost:
    """An n x n @ n x n matmul: 2n^3 FLOPs; at least the three matrices cross memory once."""
    b = BYTES[dtype]
    flops, moved = 2 * n**3, 3 * n * n * b
    return Cost(flops=flops, bytes_moved=moved, memory={"matrices": moved},
                basis=[(f"n={n}: FLOPs 2n^3 = {fmt_flops(flops)}, bytes 3n^2*{b} = {fmt_bytes(moved)}, "
                       f"intensity {flops / moved:.3g} FLOP/B")])


def matmul_sweep(sizes: list[int], dtype: str = "fp32") -> Cost:
    """The roofline sweep: one size at a time, so memory is the largest size's matrices."""
    each = [matmul(n, dtype) for n in sizes]
    return Cost(flops=sum(c.flops for c in each), bytes_moved=sum(c.bytes_moved for c in each),
                memory={"matrices": max(c.peak_bytes for c in each)},
                basis=[c.basis[0] for c in each], extra={"sizes": len(sizes)})


# ---------------------------------------------------------------- small numpy workloads

def tabular_q(states: int, actions: int, episodes: int, max_steps: int) -> Cost:
    """Tabular Q-learning: one float64 Q table; each step is a few Python operations (counted as steps)."""
    table = states * actions * 8
    steps = episodes * max_steps
    return Cost(params=states * actions, memory={"Q table": table},
                basis=[f"Q table {states} states x {actions} actions x 8 B = {fmt_bytes(table)}",
                       f"at most {episodes:,} episodes x {max_steps} steps = {steps:,} Python steps"],
                extra={"python_steps": steps})


def bpe(corpus_bytes: float, vocab_size: int, impl: str = "python") -> Cost:
    """Training a byte-level BPE: naive ('python', minbpe-style) recounts pairs over the corpus per merge.

    Python work: merges x corpus elements x 2 passes (count, merge); 'fast' (a Rust
    trainer) is about linear in the corpus. Memory: the corpus as a list of Python
    ints (8 B pointer + 28 B int object) twice, during a merge.
    'numpy' (B2's trainer) counts each distinct regex chunk once, with its frequency, and
    does a merge in whole-array numpy steps over the distinct chunks' bytes: Heaps' law
    gives ~20 x corpus^0.63 of them (25.7K for 90 KB of Shakespeare, 109K for 900 KB).
    Memory: the regex chunks as Python strings (~15 B per corpus byte) + 2 int64 arrays.
    """
    merges = max(0, vocab_size - 256)
    if impl == "numpy":
        distinct = 20 * corpus_bytes ** 0.63
        elems = merges * distinct
        mem = 15 * corpus_bytes + 16 * distinct
        return Cost(params=vocab_size, memory={"chunks and arrays": mem},
                    basis=[(f"{merges} merges over ~{fmt_count(distinct)} distinct chunk bytes (20 x corpus^0.63, numpy):"
                           f" {fmt_count(elems)} array element steps"),
                           f"regex chunks 15 B per corpus byte + 2 x int64 per distinct byte = {fmt_bytes(mem)}"],
                    extra={"python_steps": 0, "native_steps": 0, "numpy_steps": elems})
    elems = merges * corpus_bytes * 2 if impl == "python" else corpus_bytes * 20
    mem = 2 * 36 * corpus_bytes if impl == "python" else 10 * corpus_bytes
    return Cost(params=vocab_size, memory={"token lists": mem},
                basis=[f"{merges} merges over {fmt_bytes(corpus_bytes)} ({impl}): {fmt_count(elems)} element steps",
                       f"token lists: {'2 x 36 B' if impl == 'python' else '10 B'} per corpus byte = {fmt_bytes(mem)}"],
                extra={"python_steps": elems if impl == "python" else 0, "native_steps": 0 if impl == "python" else elems})


def skipgram(vocab: int, dim: int, corpus_tokens: float, window: int, negatives: int, epochs: float) -> Cost:
    """word2vec skip-gram with negative sampling: two V x d tables; 6*d*(1+k) FLOPs per (word, context) pair."""
    n = 2 * vocab * dim
    pairs = corpus_tokens * 2 * window * epochs
    flops = pairs * 6 * dim * (1 + negatives)
    return Cost(params=n, flops=flops, memory={"embeddings+grads": 3 * n * 4, "corpus": corpus_tokens * 4},
                basis=[f"2 tables V*d = 2*{vocab}*{dim} = {n:,} params; x 3 (weights, grads, scratch) x 4 B",
                       f"{fmt_count(pairs)} (word, context) pairs x 6*d*(1+k) = {fmt_flops(flops)}"],
                extra={"width": dim})


def vector_search(n: int, dim: int, queries: int, dtype: str = "fp32", batch: int = 64, singles: int = 0) -> Cost:
    """Brute-force nearest neighbours: the index n x d, scores for a batch of queries; 2*n*d FLOPs per query.

    Queries go `batch` at a time (one matrix product each); `singles` more go one at a
    time (latency). Top-k runs row by row: one int64 argpartition index of n at a time.
    """
    b = BYTES[dtype]
    index = n * dim * b
    scores = batch * n * 4 + n * 8
    flops = 2 * n * dim * (queries + singles)
    moved = index * (ceil(queries / batch) + singles)  # the index streams through once per query batch
    return Cost(flops=flops, bytes_moved=moved, memory={"index": index, "scores": scores},
                basis=[(f"index {n:,} x {dim} x {b} B = {fmt_bytes(index)}; scores {batch} x {n:,} x 4 B "
                       f"+ top-k indices {n:,} x 8 B"),
                       f"{queries + singles:,} queries x 2*n*d = {fmt_flops(flops)}; index read per batch of {batch}"
                       + (f" and per single query ({singles})" if singles else "") + f": {fmt_bytes(moved)}"])


# ---------------------------------------------------------------- a sentence encoder (B3, B15)

@dataclass(frozen=True)
class EncoderShape:
    """A BERT-style encoder: token + position + type embeddings, then layers of attention and MLP."""

    name: str
    vocab: int
    max_pos: int
    layers: int
    hidden: int
    heads: int
    intermediate: int


MINILM = EncoderShape("all-MiniLM-L6-v2", vocab=30522, max_pos=512, layers=6, hidden=384, heads=12,
                      intermediate=1536)
ENCODER_BATCH_TOKENS = 2048      # models/minilm.py (MiniLM.encode) batches texts up to this many (padded) tokens
TOKENIZERS_BYTES = 30 * MB       # tokenizers + safetensors + scipy.special (for GELU's erf): +30 MB RSS here


def encoder_params(s: EncoderShape) -> int:
    """Exact: embeddings (V + P + 2) * h + LN 2h; per layer 4(h^2 + h) + 2(h*i) + i + h + 2 LN 2h; pooler h^2 + h."""
    h, i = s.hidden, s.intermediate
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    return (s.vocab + s.max_pos + 2) * h + 2 * h + s.layers * layer + h * h + h


def sentence_encoder(s: EncoderShape, texts: int, tokens_per_text: float) -> Cost:
    """Embedding `texts` texts of ~`tokens_per_text` tokens (with [CLS] and [SEP]) in fp32, forward only.

    FLOPs per token: 2 x the layers' matmul weights, plus attention's Q K^T and A V (4*T*h per layer).
    Memory: fp32 weights; activations of one batch of ENCODER_BATCH_TOKENS tokens (about 9 h-wide and
    2 i-wide arrays live at once) and its attention scores (heads x T per token).
    """
    h, T = s.hidden, max(1.0, tokens_per_text)
    n = encoder_params(s)
    matmul = s.layers * (4 * h * h + 2 * h * s.intermediate)
    tokens = texts * T
    flops = tokens * (2 * matmul + 4 * s.layers * T * h)
    weights = 4 * n
    bt = ENCODER_BATCH_TOKENS
    acts = 4 * bt * (9 * h + 2 * s.intermediate) + 4 * bt * s.heads * min(T, bt)
    basis = [f"{s.name}: {n:,} params (fp32 {fmt_bytes(weights)}); {s.layers} layers, h={h}, {s.heads} heads",
             (f"{texts:,} texts x {T:g} tokens = {fmt_count(tokens)} tokens x (2 x {fmt_count(matmul)} + "
             f"4*L*T*h) = {fmt_flops(flops)}"),
             f"activations of a {bt}-token batch: 4 B x {bt} x (9h + 2i + heads*T) = {fmt_bytes(acts)}"]
    return Cost(params=n, flops=flops, memory={"encoder weights": weights, "encoder activations": acts,
                                               "tokenizer": TOKENIZERS_BYTES},
                basis=basis, extra={"tokens": tokens})


# ---------------------------------------------------------------- the probe (B0)

def probe_workload(matmul_n: int = 2048, bandwidth_array_bytes: float = 128 * 2**20) -> Cost:
    """The probe's micro-benchmarks (inventory/bench.py): fp32 and fp64 matmuls, a STREAM triad.

    Each matmul size runs 7 times (a warm-up, a trial, 5 timed); the triad fills
    3 float64 arrays, then 4 rounds (a warm-up, 3 timed) of 5 array transfers.
    """
    n = matmul_n
    flops32 = flops64 = 7 * 2 * n**3
    triad = (3 + 4 * 5) * bandwidth_array_bytes
    mats = 3 * n * n * 8 + 2 * n * n * 8                          # fp64 a, b, out + the float64 randoms
    return Cost(flops=flops32 + flops64, bytes_moved=triad,
                memory={"benchmark arrays": max(3 * bandwidth_array_bytes, mats)},
                basis=[f"matmul {n}x{n} fp32 and fp64, 7 runs each: {fmt_flops(flops32)} each",
                       (f"triad: 3 x {fmt_bytes(bandwidth_array_bytes)} arrays, {fmt_bytes(triad)} moved "
                       f"(the matmul arrays, {fmt_bytes(mats)}, are freed before it)")],
                extra={"flops_fp32": flops32, "flops_fp64": flops64, "matmul_bytes": mats})
