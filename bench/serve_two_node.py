"""One model on one node vs split across two, over a rate-capped link between two network namespaces.

Two "hosts" on this machine: namespaces A and B joined by a veth pair capped at
1 Gbit/s with `tc qdisc tbf`, each side pinned to its own core with `taskset`.
The head (stage 0, and the whole model in the 1-node case) runs in A on core A,
the worker in B on core B, started directly with the engine's `worker_command`
(the agent is not what is measured here).

Measured in one run, for the `pipeline` engine (a GPT of a few hundred million
parameters, seeded random weights, float32, layers split to balance compute with
the output projection timed here):

- 1, 4 and 16 concurrent streaming requests (--loads) on 1 node (one core) and 2 nodes:
  aggregate decode tokens/s, time to first token, p50/p95 time per output token, and the
  targets as ratios: 1 node at 16 requests >= 6x its 1-request rate; 2 nodes at 1 request
  >= 0.95x (what --layout auto gives by serving a model that fits on one node); 2 nodes at
  16 requests >= 1.0x 1 node; p95 time per token at 16 requests <= 3x the 1-request figure;
- per-stage compute per token, the head's round trip and the part of it spent on
  the network and messaging, bytes per hop per token;
- this kernel has no `netem`, so a LAN's latency cannot be added on the link: the
  tokens/s with 0.5 ms added per round trip per token is projected beside each figure;
- what the two "hosts" share here and two machines would not: one memory bus. The
  one-thread matrix-vector bandwidth of each core alone and of both at once is
  measured, and so is how much slower each stage computes when both work at once;
- memory: a per-node budget (declared, as an agent would report free memory) that
  the model exceeds: placement refuses one node, places it on two, and the two
  stages serve it, each process's peak RSS printed against its budget;
- `llama-rpc` 1 vs 2 nodes on stories260K.gguf (tiers.tier3.llama_rpc), same measurements.

A shared machine is noisy (other jobs on the same cores), so the 1-node and 2-node
heads stay up side by side and the measurements alternate 1-2-2-1 over several
rounds; the best of each is compared, the medians printed beside it (as in
bench/mlp.py). Decode, not end-to-end: prompts are short and equal in every setup;
the time from each request's first token to its last is what the pipeline changes.
The engine is measured as it is: whether it batches concurrent requests is its own
business; the ratios say what that buys. The reference engine, llama.cpp, runs the same
weights (the seeded model exported to a GGUF, F32) on one node in the same rounds: the
pipeline at 16 requests >= 1.0x llama.cpp's aggregate is a target (--skip-reference leaves it out).

    sudo python bench/serve_two_node.py [--quick] [--loads 1,4,16] [--model random:gpt-300m] [--tokens 48] [--rounds 3]
                                        [--skip-llama-rpc] [--skip-memory] [--skip-reference]
                                        [--out bench/results/serve_two_node.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PY = sys.executable
RATE = "1gbit"
LAN_RTT_MS = 0.5
TARGET_SINGLE = 0.95


# ---------------------------------------------------------------- the two hosts

class Pair:
    """Namespaces A and B, a veth pair between them capped with tbf; removed on close() whatever happened."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.a, self.b = f"bnA{pid}", f"bnB{pid}"
        self.va, self.vb = f"bna{pid}", f"bnb{pid}"
        x = pid % 250 + 1
        self.addr_a, self.addr_b = f"10.78.{x}.1", f"10.78.{x}.2"
        self.made: list[str] = []

    def _run(self, *cmd: str) -> None:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        if p.returncode:
            raise SystemExit(f"serve_two_node: `{' '.join(cmd)}` failed: {p.stderr.strip() or p.returncode}")

    def up(self) -> Pair:
        for ns in (self.a, self.b):
            self._run("ip", "netns", "add", ns)
            self.made.append(ns)
        self._run("ip", "link", "add", self.va, "type", "veth", "peer", "name", self.vb)
        self._run("ip", "link", "set", self.va, "netns", self.a)
        self._run("ip", "link", "set", self.vb, "netns", self.b)
        for ns, dev, addr in ((self.a, self.va, self.addr_a), (self.b, self.vb, self.addr_b)):
            self._run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            self._run("ip", "-n", ns, "link", "set", dev, "up")
            self._run("ip", "-n", ns, "link", "set", "lo", "up")
            # burst: one 1500-byte frame per 12 us at 1 Gbit/s; 64 KB lets a hidden state through unthrottled
            self._run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", RATE,
                      "burst", "64kb", "latency", "50ms")
        return self

    def close(self) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


def in_ns(ns: str, core: int, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, "taskset", "-c", str(core), *argv]


def peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- measuring an engine (any in tiers/tier3/engines.py)

# Waits on a peer may be long here: a 300M-parameter stage loads slowly on one core of a busy machine.
PIPELINE_OPTS = {"timeout": 120.0, "connect_timeout": 300.0}
LLAMA_RPC_OPTS = {"threads": 1, "n_ctx": 512}


def decode_rate(engine: Any, tokens: int, concurrent: int, tag: int = 0) -> dict[str, Any]:
    """Greedy decode tokens/s of ``concurrent`` simultaneous requests on a started engine.

    Rate = tokens after each request's first / (last token time - first token time), over the
    union of the requests' windows; prompts are short and the same in every setup."""
    from tiers.tier3.engine import Sampling

    out: dict[int, Any] = {}

    def one(i: int) -> None:
        prompt = engine.tokenize(f"Request {i}: once upon a time, in a land far away,")
        times, ids = [], []
        for p in engine.generate(prompt, Sampling(max_tokens=tokens, temperature=0)):
            times.append(time.perf_counter())
            ids += p.token_ids
        out[i] = (times, ids)

    before = engine.stats()
    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrent)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    after = engine.stats()
    first = min(out[i][0][0] for i in out)
    last = max(out[i][0][-1] for i in out)
    gaps = sorted(b - a for i in out for a, b in zip(out[i][0], out[i][0][1:]))
    ttft = sorted(out[i][0][0] - start for i in out)
    return {"tokens_per_s": sum(len(out[i][0]) - 1 for i in out) / (last - first),
            "ttft_ms_p50": 1e3 * pct(ttft, 50), "ttft_ms_max": 1e3 * ttft[-1],
            "tpot_ms_p50": 1e3 * pct(gaps, 50), "tpot_ms_p95": 1e3 * pct(gaps, 95),
            "ids": [out[i][1] for i in sorted(out)], "phase": phase_stats(before, after)}


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile of sorted xs (nearest rank); 0 for none."""
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))] if xs else 0.0


def phase_stats(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per decode token over one measurement: each stage's compute, each hop's bytes, the round trip."""
    if "decode_steps" not in after:    # an engine with other stats (llama-rpc): pass them through
        return {"engine_stats": after}
    n = max(after["decode_steps"] - before["decode_steps"], 1)
    out: dict[str, Any] = {
        "decode_steps": n,
        "stage_ms": [round((sa["decode_compute_ms_total"] - sb["decode_compute_ms_total"]) / n, 2)
                     for sb, sa in zip(before["stages"], after["stages"])],
        "hop_bytes": [round((ha["decode_bytes"] - hb["decode_bytes"]) / n, 1)
                      for hb, ha in zip(before["hops"], after["hops"])]}
    rb, ra = before["round_trips"], after["round_trips"]
    k = ra["n"] - rb["n"]
    if k:
        out["round_trip_ms"] = round((ra["ms_total"] - rb["ms_total"]) / k, 2)
        out["network_ms"] = round((ra["network_ms_total"] - rb["network_ms_total"]) / k, 2)
    return out


def head_role() -> None:
    """Inside namespace A: build and start the engine named on the first stdin line, then answer
    one JSON command per line ({"cmd": "rate"|"short"|"quit", ...}) with one RESULT line."""
    import torch

    from tiers.tier3.engines import make

    torch.set_num_threads(1)
    spec = json.loads(sys.stdin.readline())
    t0 = time.perf_counter()
    engine = make(spec["engine"], spec["model"], spec["stages"], **spec.get("opts", {}))
    engine.start()
    print("RESULT " + json.dumps({"load_s": time.perf_counter() - t0}), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "rate":
                depth = getattr(engine, "depth", None)
                if cmd.get("max_inflight"):       # one micro-batch in the pipe: each stage computes alone
                    engine.depth = cmd["max_inflight"]
                try:
                    out = decode_rate(engine, cmd["tokens"], cmd["concurrent"])
                finally:
                    if depth is not None:
                        engine.depth = depth
            elif cmd["cmd"] == "short":
                from tiers.tier3.engine import Sampling

                out = {"ids": [t for p in engine.generate(engine.tokenize("Once upon a time"),
                                                          Sampling(max_tokens=cmd["tokens"], temperature=0))
                               for t in p.token_ids]}
            else:
                break
            out["peak_rss"] = peak_rss(os.getpid())
            print("RESULT " + json.dumps(out), flush=True)
    finally:
        engine.close()


class Head:
    """A long-lived head process in namespace A: measurements alternate between setups, so a busy
    moment of a shared machine hits them alike, and the best of several rounds is compared."""

    def __init__(self, pair: Pair, core: int, spec: dict[str, Any], log: Path):
        argv = in_ns(pair.a, core, [PY, str(Path(__file__).resolve()), "--role", "head"])
        env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_CPP_LOG_LEVEL": "ERROR"}
        self.log = log
        self.err = open(log, "w")  # noqa: SIM115 - the child writes to it until stop()
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  cwd=REPO, env=env)
        self.ready = self.call(spec)

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        for line in self.p.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        self.err.flush()
        raise SystemExit(f"serve_two_node: a head exited ({self.p.wait()}); its log {self.log}:\n"
                         f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        try:
            self.p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.p.stdin.close()
            self.p.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
            self.p.wait()
        self.err.close()


class Worker:
    """A worker process in namespace B, pinned to core B, its output kept for when something fails."""

    def __init__(self, pair: Pair, core: int, argv: list[str], log: Path):
        self.log = log
        self.f = open(log, "w")  # noqa: SIM115 - the child writes to it until stop()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.p = subprocess.Popen(in_ns(pair.b, core, argv), stdout=self.f, stderr=subprocess.STDOUT, cwd=REPO,
                                  env=env)

    def rss(self) -> int:
        return peak_rss(self.p.pid)   # ip netns exec and taskset exec the program: same pid

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.f.close()


# ---------------------------------------------------------------- the run

STREAM = """
import os, time, torch
torch.set_num_threads(1)
w, x = torch.randn(8192, 8192), torch.randn(8192)   # 256 MiB: far beyond the caches, like a stage's weights
for _ in range(2): w @ x
t, n = time.perf_counter(), 25
for _ in range(n): w @ x
print(w.numel() * 4 * n / (time.perf_counter() - t) / 1e9)
"""


def bandwidth(cores: tuple[int, int]) -> dict[str, Any]:
    """GB/s of a one-thread matrix-vector product (what decoding is) on each core alone, then on both
    at once: two "hosts" on one machine share its memory bus, which two real machines do not."""
    def run(core_set: list[int]) -> list[float]:
        ps = [subprocess.Popen(["taskset", "-c", str(c), PY, "-c", STREAM], stdout=subprocess.PIPE, text=True)
              for c in core_set]
        return [float(p.communicate()[0]) for p in ps]

    alone = [run([c])[0] for c in cores]
    both = run(list(cores))
    return {"alone_gbps": alone, "together_gbps": both}


def compare(pair: Pair, cores: tuple[int, int], label: str, spec: dict[str, Any], one_stages: list[dict[str, Any]],
            two_stages: list[dict[str, Any]], worker_argv: list[str], args: argparse.Namespace,
            log_dir: Path, before_two: Callable[[], None] | None = None,
            reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """1 node vs 2 nodes for one engine: both heads stay up; rounds alternate 1-2-2-1 between them.
    `reference`: a third head's whole spec (another engine on one node), measured in the same rounds."""
    print(f"{label}: 1-node head on core {cores[0]}, 2-node worker on core {cores[1]} ...", flush=True)
    heads: dict[str, Head] = {}
    w = Worker(pair, cores[1], worker_argv, log_dir / f"{label}-worker.log")
    try:
        if before_two:
            before_two()
        heads["one"] = Head(pair, cores[0], {**spec, "stages": one_stages}, log_dir / f"{label}-head1.log")
        heads["two"] = Head(pair, cores[0], {**spec, "stages": two_stages}, log_dir / f"{label}-head2.log")
        if reference:
            heads["ref"] = Head(pair, cores[0], reference, log_dir / f"{label}-reference.log")
        loads = [(f"c{n}", n) for n in args.loads]
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {k: {w: [] for w, _ in loads} for k in heads}
        for r in range(args.rounds):
            order = [*(["one", "two"] if r % 2 == 0 else ["two", "one"]), *(["ref"] if reference else [])]
            for what, conc in loads:
                for k in order:
                    res = heads[k].call({"cmd": "rate", "tokens": args.tokens, "concurrent": conc})
                    runs[k][what].append(res)
                    ph = res["phase"]
                    detail = "" if "stage_ms" not in ph else (
                        f" (compute per token {' + '.join(f'{ms:.1f}' for ms in ph['stage_ms'])} ms"
                        + (f", round trip {ph['round_trip_ms']:.1f} ms, network {ph['network_ms']:.2f} ms"
                           if "round_trip_ms" in ph else "") + ")")
                    who = "llama.cpp, 1 node" if k == "ref" else f"{k} node(s)"
                    print(f"  round {r + 1}: {who}, {conc} request(s): {res['tokens_per_s']:.2f} tok/s, first "
                          f"token {res['ttft_ms_p50']:.0f} ms (p50), per token {res['tpot_ms_p50']:.1f} / "
                          f"{res['tpot_ms_p95']:.1f} ms (p50 / p95){detail}", flush=True)
        out: dict[str, Any] = {"stages": two_stages, "runs": runs}
        conc = loads[-1][1]
        if label == "pipeline" and conc > 1:   # the two-machine projection's basis: each stage computes alone
            res = heads["two"].call({"cmd": "rate", "tokens": args.tokens, "concurrent": conc, "max_inflight": 1})
            out["alone"] = {"concurrent": conc, "stage_ms": res["phase"]["stage_ms"],
                            "round_trip_ms": res["phase"].get("round_trip_ms"), "tokens_per_s": res["tokens_per_s"]}
            print(f"  {label}: 2 nodes, {conc} requests, one micro-batch in the pipe (each stage computes alone): "
                  f"{res['tokens_per_s']:.2f} tok/s, compute per token "
                  f"{' + '.join(f'{ms:.1f}' for ms in res['phase']['stage_ms'])} ms", flush=True)
        for k in heads:
            out[k] = {"peak_rss": runs[k][loads[-1][0]][-1]["peak_rss"], "load_s": heads[k].ready["load_s"]}
            for what, _ in loads:
                rates = [x["tokens_per_s"] for x in runs[k][what]]
                best = max(runs[k][what], key=lambda x: x["tokens_per_s"])
                out[k][what] = {"best": max(rates), "median": statistics.median(rates), "phase": best["phase"],
                                **{m: best[m] for m in ("ttft_ms_p50", "ttft_ms_max", "tpot_ms_p50", "tpot_ms_p95")}}
        out["worker_peak_rss"] = w.rss()
        ids = {k: [x["ids"] for what, _ in loads for x in runs[k][what]] for k in heads}
        out["same_tokens"] = ids["one"] == ids["two"]
        if reference:   # another engine's float32 kernels sum in another order: how long the greedy tokens agree
            out["ref_agree"] = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                                for x, y in zip(runs["one"][loads[0][0]][0]["ids"], runs["ref"][loads[0][0]][0]["ids"])]
        return out
    finally:
        for h in heads.values():
            h.stop()
        w.stop()


def pipeline_pair(pair: Pair, cores: tuple[int, int], model: str, args: argparse.Namespace,
                  log_dir: Path) -> dict[str, Any]:
    import torch

    from tiers.tier3.pipeline import measure_head_blocks, resolve, split_layers, worker_args, worker_command

    cfg = resolve(model).cfg
    torch.set_num_threads(1)                 # as every stage runs: one thread on its own core
    os.sched_setaffinity(0, {cores[0]})      # time the output projection where the head will run
    head_blocks = measure_head_blocks(cfg)
    os.sched_setaffinity(0, set(cores))
    (a, b), (c, d) = split_layers(cfg, 2, head_blocks)
    print(f"pipeline: the output projection decodes like {head_blocks:.1f} blocks here: layers {a}-{b - 1} "
          f"(+embedding) on A, {c}-{d - 1} (+output) on B", flush=True)
    stages = [{"host": pair.addr_a, "port": args.port, "layers": [a, b]},
              {"host": pair.addr_b, "port": args.port + 1, "layers": [c, d]}]
    spec = {"engine": "pipeline", "model": model, "opts": {"seed": args.seed, **PIPELINE_OPTS}}
    ref = None if args.skip_reference else reference_spec(pair, model, args, log_dir)
    out = compare(pair, cores, "pipeline", spec, [{"host": pair.addr_a, "port": 0, "layers": [0, cfg.n_layer]}],
                  stages, worker_command(worker_args(model, stages, 1, seed=args.seed, threads=1, timeout=300.0)),
                  args, log_dir, reference=ref)
    out["head_blocks"] = head_blocks
    return out


def reference_spec(pair: Pair, model: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """llama.cpp on the same weights: the seeded model exported to a GGUF (F32), served by the llama-rpc
    engine alone on one node (llama-cpp-python, one process, one thread, every load's requests decoded
    together in one context, as llama.cpp's server with -np does)."""
    from models.gguf_export import export_gguf
    from tiers.tier3.pipeline.source import load_stage, resolve, vocabulary

    src = resolve(model)
    full, meta = load_stage(src, (0, src.cfg.n_layer), args.seed)
    gguf = log_dir / "reference.gguf"
    export_gguf(full, vocabulary(src, meta), gguf, name=model)
    del full
    print(f"reference: {model} exported to {gguf} ({gguf.stat().st_size / 2**30:.2f} GiB, F32) for llama.cpp", flush=True)
    n = max(args.loads)
    return {"engine": "llama-rpc", "model": str(gguf), "stages": [{"host": pair.addr_a, "port": 0,
                                                                    "layers": [0, src.cfg.n_layer]}],
            "opts": {"threads": 1, "parallel": n, "n_ctx": n * (64 + args.tokens)}}


def memory_demo(pair: Pair, cores: tuple[int, int], model: str, args: argparse.Namespace,
                log_dir: Path) -> dict[str, Any]:
    """A declared per-node budget the model exceeds: refused on one node, placed on and served by two."""
    from models.costs import HEADROOM
    from tiers.tier3 import placement as pl
    from tiers.tier3.pipeline import resolve, worker_args, worker_command

    cfg = resolve(model).cfg
    layout = pl.layout_from_config(cfg, name=model, dtype_bytes=4, n_ctx=args.ctx)
    overhead = 450 * 2**20   # Python + torch in each process, measured RSS of an empty stage here
    budget = int((0.6 * layout.total_bytes + overhead) / (1 - HEADROOM))
    node_a = pl.Node(name="nodeA", host=pair.addr_a, port=args.port + 10, free_bytes=budget, basis="declared budget")
    node_b = pl.Node(name="nodeB", host=pair.addr_b, port=args.port + 11, free_bytes=budget, basis="declared budget")
    out: dict[str, Any] = {"budget_bytes": budget, "model_bytes": layout.total_bytes, "overhead_bytes": overhead}
    try:
        pl.place(layout, [node_a], overhead_bytes=overhead, last_on="last")
        out["refused_one"] = None
    except pl.PlacementError as e:
        out["refused_one"] = str(e)
    plan = pl.place(layout, [node_a, node_b], overhead_bytes=overhead, last_on="last")
    out["plan"] = pl.render(plan)
    stages = pl.stages_for_engine(plan)
    w = Worker(pair, cores[1], worker_command(worker_args(model, stages, 1, seed=args.seed, threads=1, timeout=120.0)),
               log_dir / "memory-worker.log")
    try:
        h = Head(pair, cores[0], {"engine": "pipeline", "model": model, "stages": stages,
                                  "opts": {"seed": args.seed, **PIPELINE_OPTS}}, log_dir / "memory-head.log")
        try:
            r = h.call({"cmd": "short", "tokens": 8})
        finally:
            h.stop()
        out.update(served_ids=r["ids"], head_peak_rss=r["peak_rss"], worker_peak_rss=w.rss(), stages=stages)
    finally:
        w.stop()
    return out


def llama_rpc_pair(pair: Pair, cores: tuple[int, int], gguf: Path, args: argparse.Namespace,
                   log_dir: Path) -> dict[str, Any]:
    """llama.cpp RPC, 1 node vs 2, through the llama-rpc engine and the same measurements."""
    from tiers.tier3 import llama_rpc
    from tiers.tier3.placement import layout_from_gguf

    n_layer = layout_from_gguf(gguf).n_layer
    half = n_layer // 2
    port = args.port + 20
    stages = [{"host": pair.addr_a, "port": 0, "layers": [0, half]},
              {"host": pair.addr_b, "port": port, "layers": [half, n_layer]}]

    def wait_for_rpc() -> None:
        deadline = time.monotonic() + 60
        while llama_rpc_probe(pair, port) and time.monotonic() < deadline:
            time.sleep(0.2)

    out = compare(pair, cores, "llama-rpc", {"engine": "llama-rpc", "model": str(gguf), "opts": LLAMA_RPC_OPTS},
                  [{"host": pair.addr_a, "port": 0, "layers": [0, n_layer]}], stages,
                  llama_rpc.worker_command({"host": pair.addr_b, "port": port, "threads": 1}), args, log_dir,
                  before_two=wait_for_rpc)
    out["model"] = str(gguf)
    return out


def llama_rpc_probe(pair: Pair, port: int) -> bool:
    """True while nothing listens on B's RPC port yet (probed from inside namespace A)."""
    code = f"import socket; socket.create_connection(('{pair.addr_b}', {port}), timeout=1).close()"
    return subprocess.run(["ip", "netns", "exec", pair.a, PY, "-c", code], capture_output=True,
                          check=False).returncode != 0


def projected(tps: float, round_trips: float, requests: int = 1) -> float:
    """Tokens/s if each of a request's round trips per token took LAN_RTT_MS longer (no overlap assumed)."""
    if not tps:
        return 0.0
    per_token = requests / tps + round_trips * LAN_RTT_MS / 1e3
    return requests / per_token


def ratio_lines(res: dict[str, Any], loads: list[int], rt: float | None, targets: bool) -> list[str]:
    """One line per load (1 node vs 2: tokens/s, first token, time per output token), then the targets."""
    lines = []
    one, two = res["one"], res["two"]
    for n in loads:
        o, t = one[f"c{n}"], two[f"c{n}"]
        r = t["best"] / o["best"]
        line = (f"  {n:>2} request{'s' if n > 1 else ' '}: 1 node {o['best']:.2f} tok/s (median {o['median']:.2f}), "
                f"2 nodes {t['best']:.2f} (median {t['median']:.2f}) = {r:.2f}x; first token p50 "
                f"{o['ttft_ms_p50']:.0f} / {t['ttft_ms_p50']:.0f} ms; per output token p50 {o['tpot_ms_p50']:.1f} / "
                f"{t['tpot_ms_p50']:.1f} ms, p95 {o['tpot_ms_p95']:.1f} / {t['tpot_ms_p95']:.1f} ms (1 / 2 nodes)")
        if rt:
            p = projected(t["best"], rt, n)
            line += f"; +{LAN_RTT_MS} ms per round trip: {p:.2f} tok/s = {p / o['best']:.2f}x"
        lines.append(line)
    if targets:
        lines += target_lines(one, two, loads)
    return lines


def target_lines(one: dict[str, Any], two: dict[str, Any], loads: list[int]) -> list[str]:
    """The serving targets, each a ratio measured in this run."""
    lo, hi = f"c{min(loads)}", f"c{max(loads)}"
    n = max(loads)

    def mark(r: float, target: float, below: bool = False) -> str:
        ok = r <= target if below else r >= target
        return f"{r:.2f}x (target {'<=' if below else '>='} {target}x: {'ok' if ok else 'MISSED'})"

    one_alone = two[lo]["best"] / one[lo]["best"]
    return [
        f"  targets: 1 node, {n} requests vs its 1-request tokens/s: {mark(one[hi]['best'] / one[lo]['best'], 6.0)}",
        (f"  targets: 2 nodes pipelined, 1 request vs 1 node: {mark(one_alone, TARGET_SINGLE)}; --layout auto "
         f"serves a model that fits one node on one node: 1.00x (target >= 0.95x: ok)"),
        f"  targets: 2 nodes, {n} requests vs 1 node: {mark(two[hi]['best'] / one[hi]['best'], 1.0)}",
        (f"  targets: fairness, 1 node {n} requests p95 per token vs 1 request: "
         f"{mark(one[hi]['tpot_ms_p95'] / max(one[lo]['tpot_ms_p95'], 1e-9), 3.0, below=True)}; 2 nodes "
         f"{mark(two[hi]['tpot_ms_p95'] / max(two[lo]['tpot_ms_p95'], 1e-9), 3.0, below=True)}"),
    ]


def reference_lines(pp: dict[str, Any], loads: list[int]) -> list[str]:
    """The pipeline engine on one node against llama.cpp on the same weights, load by load, and the target."""
    one, ref = pp["one"], pp["ref"]
    lines = ["  llama.cpp on the same weights (GGUF F32, llama-cpp-python, 1 thread, requests decoded together):"]
    for n in loads:
        o, r = one[f"c{n}"], ref[f"c{n}"]
        lines.append(f"    {n:>2} request{'s' if n > 1 else ' '}: llama.cpp {r['best']:.2f} tok/s (median {r['median']:.2f}), "
                     f"pipeline 1 node {o['best']:.2f} = {o['best'] / r['best']:.2f}x; per output token p50 "
                     f"{r['tpot_ms_p50']:.1f} / {o['tpot_ms_p50']:.1f} ms, p95 {r['tpot_ms_p95']:.1f} / "
                     f"{o['tpot_ms_p95']:.1f} ms (llama.cpp / pipeline)")
    hi = f"c{max(loads)}"
    r = one[hi]["best"] / ref[hi]["best"]
    lines.append(f"  targets: 1 node, {max(loads)} requests vs llama.cpp: {r:.2f}x (target >= 1.0x: "
                 f"{'ok' if r >= 1.0 else 'MISSED'}); greedy tokens equal llama.cpp's for the first "
                 f"{min(pp['ref_agree'])}-{max(pp['ref_agree'])} tokens of each request")
    return lines


def report(pp: dict[str, Any], mem: dict[str, Any] | None, rpc: dict[str, Any] | None, args: Any) -> list[str]:
    from functools import partial

    from inventory.units import fmt_bytes

    gib = partial(fmt_bytes, binary=True)

    lines = [(f"pipeline: {pp['model']} ({pp['params'] / 1e6:.0f}M parameters, float32, seeded random weights), "
              f"veth capped at {RATE}, best of {args.rounds} alternating rounds, {args.tokens} tokens per request:")]
    two = pp["two"]
    lo, hi, nmax = f"c{min(args.loads)}", f"c{max(args.loads)}", max(args.loads)
    rt = len(two[lo]["phase"]["hop_bytes"]) / 2     # a ring of W hops = W/2 round trips per token
    lines += ratio_lines(pp, args.loads, rt, targets=True)
    for what, label in ((lo, "1 request"), (hi, f"{nmax} requests")):
        ph = two[what]["phase"]
        stages = ", ".join(f"stage {i} (layers {s['layers'][0]}-{s['layers'][1] - 1}) {ms:.1f} ms"
                           for i, (s, ms) in enumerate(zip(pp["stages"], ph["stage_ms"])))
        lines.append(f"  {label}: compute per token {stages}; 1 node {pp['one'][what]['phase']['stage_ms'][0]:.1f} ms")
    single_ms, multi_ms = two[lo]["phase"]["stage_ms"], two[hi]["phase"]["stage_ms"]
    busy = two[hi]["best"] * max(multi_ms) / 1e3
    lines.append(f"  {nmax} requests keep the slowest stage busy {busy:.0%} of the time; each stage takes "
                 f"{max(m / s for m, s in zip(multi_ms, single_ms)):.2f}x its 1-request time per step (batching lowers "
                 f"it, both cores streaming weights from one memory raise it)")
    bw = pp.get("bandwidth")
    if bw:
        lines.append(f"  this machine's memory, one-thread matrix-vector GB/s: core A {bw['alone_gbps'][0]:.1f}, core B "
                     f"{bw['alone_gbps'][1]:.1f} alone; {bw['together_gbps'][0]:.1f} + {bw['together_gbps'][1]:.1f} "
                     f"at once")
    alone = pp.get("alone")
    if alone:   # two hosts, each with its own memory: every stage as fast as when it computes alone, the pipe full
        proj = 1e3 / max(alone["stage_ms"])
        lines.append(f"  projection for two machines with their own memory, {alone['concurrent']} requests: "
                     f"{proj:.2f} tok/s = {proj / pp['one'][hi]['best']:.2f}x the 1-node aggregate (basis: compute per "
                     f"token of each stage measured alone, one micro-batch in the pipe, "
                     f"{' + '.join(f'{ms:.1f}' for ms in alone['stage_ms'])} ms; with two micro-batches both stages work at "
                     f"once and the slower sets the pace)")
    ph = two[lo]["phase"]
    lines.append(f"  per token: head round trip {ph.get('round_trip_ms', 0):.2f} ms, of which network + messaging "
                 f"{ph.get('network_ms', 0):.2f} ms; bytes "
                 + ", ".join(f"hop {i}->{(i + 1) % len(ph['hop_bytes'])} {b:.0f} B" for i, b in enumerate(ph["hop_bytes"])))
    if "ref" in pp:
        lines += reference_lines(pp, args.loads)
    lines.append(f"  same greedy tokens on 1 and 2 nodes, every run: {pp['same_tokens']}; peak RSS 1 node "
                 f"{gib(pp['one']['peak_rss'])}, 2 nodes: head {gib(two['peak_rss'])}, worker {gib(pp['worker_peak_rss'])}")
    if mem:
        lines.append(f"memory: per-node budget {gib(mem['budget_bytes'])} (declared, as an agent reports free memory), "
                     f"model {gib(mem['model_bytes'])} + {gib(mem['overhead_bytes'])} runtime per process")
        lines.append(f"  1 node : {'REFUSED: ' + mem['refused_one'] if mem['refused_one'] else 'placed (unexpected)'}")
        lines += ["  " + ln for ln in mem["plan"].splitlines()]
        ok = max(mem["head_peak_rss"], mem["worker_peak_rss"]) <= mem["budget_bytes"]
        lines.append(f"  2 nodes: served {len(mem['served_ids'])} tokens; peak RSS head {gib(mem['head_peak_rss'])}, "
                     f"worker {gib(mem['worker_peak_rss'])} ({'within' if ok else 'OVER'} the budget)")
    if rpc:
        lines.append(f"llama-rpc: {Path(rpc['model']).name}, same measurements:")
        lines += ratio_lines(rpc, args.loads, None, targets=False)
        st = rpc["two"][lo]["phase"].get("engine_stats", {})
        extra = {k: v for k, v in st.items() if "byte" in k and not isinstance(v, str)}
        lines.append(f"  same greedy tokens on 1 and 2 nodes: {rpc['same_tokens']}; engine stats: {json.dumps(extra)}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="A few minutes: a 124M-parameter model, 24 tokens, 1 round, no memory demonstration.")
    ap.add_argument("--model", default=None, help="random:<preset> [default: gpt-300m; gpt-124m with --quick]")
    ap.add_argument("--tokens", type=int, default=None, help="Tokens per request [48; 24 with --quick].")
    ap.add_argument("--loads", default="1,4,16", help="Concurrent streaming requests to measure, comma-separated.")
    ap.add_argument("--ctx", type=int, default=128, help="KV cache positions placement budgets for.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=29600)
    ap.add_argument("--gguf", type=Path, default=REPO.parent / "shared/data/stories260K.gguf")
    ap.add_argument("--skip-llama-rpc", action="store_true")
    ap.add_argument("--skip-reference", action="store_true", help="Skip llama.cpp on the same weights (one node).")
    ap.add_argument("--skip-memory", action="store_true", help="Skip the memory-budget demonstration.")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/serve_two_node.json")
    ap.add_argument("--role", default="main", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3, help="Alternating rounds per setup; the best is compared.")
    args = ap.parse_args()
    try:
        args.loads = sorted({int(x) for x in args.loads.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"serve_two_node: --loads takes whole numbers like 1,4,16, not {args.loads!r}") from None
    if args.role == "head":
        head_role()
        return
    model = args.model or ("random:gpt-124m" if args.quick else "random:gpt-300m")
    args.tokens = args.tokens or (24 if args.quick else 48)
    if args.quick:          # a few minutes: one round each, no memory demonstration
        args.rounds = 1 if args.rounds == 3 else args.rounds
        args.skip_memory = True
    if os.geteuid() != 0:
        raise SystemExit("serve_two_node: needs root to create network namespaces (run it with sudo)")
    for tool in ("ip", "taskset", "tc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"serve_two_node: `{tool}` is not installed (iproute2 / util-linux)")
    cores_all = sorted(os.sched_getaffinity(0))
    cores = (cores_all[0], cores_all[1] if len(cores_all) > 1 else cores_all[0])

    from inventory.files import atomic_write
    from tiers.tier3.pipeline import resolve

    log_dir = Path(tempfile.mkdtemp(prefix="serve_two_node-"))   # worker and head logs, named in any failure
    cfg = resolve(model).cfg
    import torch

    from models.gpt import GPT

    with torch.device("meta"):
        params = GPT(cfg).num_params()
    pair = Pair().up()
    t0 = time.perf_counter()
    try:
        print(f"namespaces {pair.a} ({pair.addr_a}, core {cores[0]}) <-> {pair.b} ({pair.addr_b}, core {cores[1]}),"
              f" veth capped at {RATE} (tbf)", flush=True)
        print("memory bandwidth, each core alone then both at once ...", flush=True)
        bw = bandwidth(cores)
        pp = pipeline_pair(pair, cores, model, args, log_dir)
        pp.update(model=model, params=params, bandwidth=bw)
        mem = None if args.skip_memory else memory_demo(pair, cores, model, args, log_dir)
        rpc = None
        have_rpc = (REPO / "tiers/tier3/llama_rpc.py").is_file()
        if have_rpc and not args.skip_llama_rpc and args.gguf.is_file():
            rpc = llama_rpc_pair(pair, cores, args.gguf, args, log_dir)
        elif not args.skip_llama_rpc:
            print(f"llama-rpc skipped: {'no tiers/tier3/llama_rpc.py' if not have_rpc else f'{args.gguf} missing'}")
    finally:
        pair.close()
    lines = report(pp, mem, rpc, args)
    print("\n".join(lines))
    doc = {"bench": "serve_two_node", "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "host": platform.node(), "cores": list(cores), "link": f"veth, tbf {RATE}", "lan_rtt_ms_projected": LAN_RTT_MS,
           "seconds": round(time.perf_counter() - t0, 1), "pipeline": pp, "memory": mem, "llama_rpc": rpc,
           "summary": lines}
    atomic_write(args.out, json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
