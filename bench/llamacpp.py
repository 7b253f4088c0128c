"""B16's timing path against raw llama-cpp-python on the same GGUF, same settings, in one run.

tierkit: `tiers.tier2.b16_llamacpp.Engine` + `time_speed`, exactly what `tierkit run B16`
times (its reusable batch filled through numpy views, the argmax per token, the
bookkeeping). raw: the shortest loop llama-cpp-python's C API allows, written inline
here: `llama_batch_get_one` over the token array, `llama_decode`, `llama_get_logits_ith`,
numpy argmax. Both load the file with the same Settings (threads, n_ctx, n_batch,
n_gpu_layers, KV type) and run the same prompt and the same number of greedy tokens.
Repetitions alternate (tierkit, raw, raw, tierkit, ...) so a busy moment on a shared
machine hurts both alike; the overhead is the median over pairs of adjacent repetitions.
Target: tierkit's overhead <= 3% for prompt processing and for generation.

    python bench/llamacpp.py [--gguf PATH] [--prompt-tokens 256] [--new-tokens 128] [--reps 15]
                             [--threads 1] [--out bench/results/llamacpp.json]

Default model: stories260K.gguf from $TIERKIT_DATA (or ../shared/data).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np

from inventory.files import atomic_write

TARGET = 0.03


def raw_rep(llm: Any, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """One repetition through the C API directly: (prompt seconds, generation seconds)."""
    import llama_cpp as lc

    ctx, n_vocab = llm.ctx, llm.n_vocab()
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    nb = llm.n_batch
    t0 = time.perf_counter()
    for s in range(0, len(prompt), nb):
        chunk = np.ascontiguousarray(prompt[s:s + nb], dtype=np.int32)
        lc.llama_decode(ctx, lc.llama_batch_get_one(chunk.ctypes.data_as(lc.llama_token_p), len(chunk)))
    logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
    t1 = time.perf_counter()
    tok = np.zeros(1, dtype=np.int32)
    p = tok.ctypes.data_as(lc.llama_token_p)
    for _ in range(new_tokens):
        tok[0] = logits.argmax()
        lc.llama_decode(ctx, lc.llama_batch_get_one(p, 1))
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def alternate(eng: Any, raw: Any, prompt: np.ndarray, new_tokens: int,
              reps: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """`reps` repetitions of each, in alternating order: tokens/s (tierkit prompt, tierkit generation,
    raw prompt, raw generation), one figure per repetition."""
    from tiers.tier2 import b16_llamacpp as b16

    t_pp, t_tg, r_pp, r_tg = [], [], [], []
    for i in range(reps):
        for who in (("tierkit", "raw") if i % 2 == 0 else ("raw", "tierkit")):
            if who == "tierkit":
                s = b16.time_speed(eng, prompt.tolist(), new_tokens, 1)
                t_pp.append(s["prompt_tokens_per_s"])
                t_tg.append(s["gen_tokens_per_s"])
            else:
                a, b = raw_rep(raw, prompt, new_tokens)
                r_pp.append(len(prompt) / a)
                r_tg.append(new_tokens / b)
    return t_pp, t_tg, r_pp, r_tg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = Path(os.environ.get("TIERKIT_DATA") or REPO.parent / "shared" / "data")
    ap.add_argument("--gguf", type=Path, default=data / "stories260K.gguf")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads for both (1 on a shared machine: spinning threads measure the neighbours)")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/llamacpp.json")
    args = ap.parse_args()

    import llama_cpp

    from tiers.tier2 import b16_llamacpp as b16

    settings = b16.Settings(n_threads=args.threads, n_threads_batch=args.threads,
                            n_ctx=args.prompt_tokens + args.new_tokens, n_batch=512, n_ubatch=512,
                            n_gpu_layers=args.n_gpu_layers, kv_type="f16")
    eng = b16.Engine(args.gguf, settings)   # tierkit's path (also silences llama.cpp's log)
    raw = llama_cpp.Llama(str(args.gguf), n_ctx=settings.n_ctx, n_batch=settings.n_batch,
                          n_ubatch=settings.n_ubatch, n_threads=settings.n_threads,
                          n_threads_batch=settings.n_threads_batch, n_gpu_layers=settings.n_gpu_layers,
                          type_k=b16.KV_TYPES[settings.kv_type], type_v=b16.KV_TYPES[settings.kv_type],
                          flash_attn=settings.flash_attn, logits_all=False, verbose=False)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, eng.n_vocab, size=args.prompt_tokens).astype(np.int32)

    # warm-up (first-touch of the weights, thread pools), then the same greedy tokens from both
    b16.time_speed(eng, prompt.tolist(), args.new_tokens, 1)
    raw_rep(raw, prompt, args.new_tokens)
    same = eng.greedy(prompt.tolist()[:32], 16) == _raw_greedy(raw, prompt[:32], 16)

    t_pp, t_tg, r_pp, r_tg = alternate(eng, raw, prompt, args.new_tokens, args.reps)
    med = statistics.median
    # tokens/s, so overhead = raw / tierkit - 1 (how much slower tierkit is). Judged on the median of the
    # paired ratios: each tierkit repetition against the raw one run right beside it, so a slow minute
    # on a shared machine cancels out; best-vs-best and median-vs-median are saved beside it.
    over_pp = med([r / t for r, t in zip(r_pp, t_pp)]) - 1
    over_tg = med([r / t for r, t in zip(r_tg, t_tg)]) - 1
    med_pp, med_tg = med(r_pp) / med(t_pp) - 1, med(r_tg) / med(t_tg) - 1
    best_pp, best_tg = max(r_pp) / max(t_pp) - 1, max(r_tg) / max(t_tg) - 1
    desc = eng.describe()
    eng.close()
    raw.close()

    print(f"model: {args.gguf.name} ({desc['desc']}, {desc['params']:,} params); settings: {settings}")
    print(f"{'':14}{'tierkit med':>13}{'raw med':>10}{'tierkit best':>14}{'raw best':>10}"
          f"{'overhead (paired median)':>26}{'best/best':>11}")
    print(f"{'prompt tok/s':14}{med(t_pp):13,.0f}{med(r_pp):10,.0f}{max(t_pp):14,.0f}{max(r_pp):10,.0f}"
          f"{over_pp:26.2%}{best_pp:11.2%}")
    print(f"{'gen tok/s':14}{med(t_tg):13,.0f}{med(r_tg):10,.0f}{max(t_tg):14,.0f}{max(r_tg):10,.0f}"
          f"{over_tg:26.2%}{best_tg:11.2%}")
    print(f"same greedy tokens: {same}; target overhead <= {TARGET:.0%}: "
          f"{'PASS' if max(over_pp, over_tg) <= TARGET else 'MISS'}")
    doc = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "gguf": str(args.gguf), "model": desc,
        "settings": vars(settings), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "reps": args.reps, "llama_cpp_python": llama_cpp.__version__,
        "tierkit": {"prompt_tokens_per_s": t_pp, "gen_tokens_per_s": t_tg},
        "raw": {"prompt_tokens_per_s": r_pp, "gen_tokens_per_s": r_tg},
        "median": {"tierkit_prompt": med(t_pp), "raw_prompt": med(r_pp), "tierkit_gen": med(t_tg), "raw_gen": med(r_tg)},
        "best": {"tierkit_prompt": max(t_pp), "raw_prompt": max(r_pp), "tierkit_gen": max(t_tg), "raw_gen": max(r_tg)},
        "overhead": {"prompt": over_pp, "gen": over_tg}, "overhead_median_vs_median": {"prompt": med_pp, "gen": med_tg},
        "overhead_best_vs_best": {"prompt": best_pp, "gen": best_tg},
        "target": TARGET, "same_greedy_tokens": same,
        "pass": max(over_pp, over_tg) <= TARGET,
    }
    atomic_write(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"results: {args.out}")


def _raw_greedy(llm: Any, prompt: np.ndarray, n: int) -> list[int]:
    import llama_cpp as lc

    ctx, n_vocab = llm.ctx, llm.n_vocab()
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    arr = np.ascontiguousarray(prompt, dtype=np.int32)
    lc.llama_decode(ctx, lc.llama_batch_get_one(arr.ctypes.data_as(lc.llama_token_p), len(arr)))
    out, tok = [], np.zeros(1, dtype=np.int32)
    for _ in range(n):
        tok[0] = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).argmax()
        out.append(int(tok[0]))
        lc.llama_decode(ctx, lc.llama_batch_get_one(tok.ctypes.data_as(lc.llama_token_p), 1))
    return out


if __name__ == "__main__":
    main()
