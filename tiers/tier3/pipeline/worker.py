"""A pipeline worker: one stage of the model, hosted until killed, epoch after epoch.

    python -m tiers.tier3.pipeline worker --model SPEC --layers A:B --rank R --world-size W --master HOST:PORT
      load blocks A..B-1 (launch.check_worker_args first: the same checks as the agent's)
      loop: connect to the head's rendezvous store -> say "idle/R" -> wait for the next epoch's name
            -> join its process group -> serve: receive from rank R-1, compute, pass to R+1
               (the last rank samples and replies to the head) -> the epoch ends (closed, or a peer lost)

A lost peer breaks a torch.distributed process group for good, so the worker
never tries to mend one: it clears its KV caches, goes back to idle and joins
the head's next epoch. An optional status port answers one JSON line (what it
hosts, its state), for an agent or a person to probe.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from tiers.tier3 import checks
from tiers.tier3.engine import EngineError
from tiers.tier3.pipeline.launch import check_worker_args
from tiers.tier3.pipeline.source import NAME, load_stage, resolve
from tiers.tier3.pipeline.stage import StageRunner
from tiers.tier3.pipeline.wire import (
    H_MAXLEN,
    H_OP,
    H_RID,
    H_SEED,
    H_START,
    H_T,
    H_TEMP,
    H_TOPK,
    H_TOPP,
    HDR,
    OP_BATCH,
    OP_CLOSE,
    OP_FREE,
    OP_STEP,
    REPLY,
    Link,
    LinkDown,
    Wire,
    batch_bytes,
    connect_store,
    make_group,
    pack_batch,
    short_error,
    unpack_batch,
)


class _Status(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _status_server(host: str, port: int, info: dict[str, Any]) -> _Status:
    class H(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall((json.dumps(info) + "\n").encode())

    srv = _Status((host, port), H)
    threading.Thread(target=srv.serve_forever, daemon=True, name="pipeline-status").start()
    return srv


def worker_status(host: str, port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """A worker's status line from its status port, or None if nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)
    except (OSError, ValueError):
        return None


def run_worker(a: dict[str, Any], log: Callable[[str], None] | None = None) -> None:
    """Host stage ``a["rank"]`` until killed: load the layers, then serve epoch after epoch."""
    log = log or (lambda msg: print(f"pipeline worker {a['rank']}: {msg}", flush=True))
    runner, info = _load(a, log)
    mhost, mport = checks.hostport(a["master"], "master")
    me = f"{os.getpid()}-{secrets.token_hex(4)}"
    while True:
        try:
            store = connect_store(mhost, mport, a["timeout"])
        except Exception as e:  # noqa: BLE001 - head not up (yet): keep trying, the agent stops us
            info["state"] = "waiting for the head"
            log(f"head rendezvous {a['master']} not reachable ({short_error(e, 'connect')}); retrying")
            time.sleep(1.0)
            continue
        try:
            _epochs(store, runner, info, a, me, log)
        except Exception as e:  # noqa: BLE001 - the store went away (head restarted or gone): reconnect
            log(f"lost the rendezvous store ({short_error(e, 'store')}); reconnecting")
            time.sleep(0.5)


def _load(a: dict[str, Any], log: Callable[[str], None]) -> tuple[StageRunner, dict[str, Any]]:
    """This rank's layers, loaded; its status (served on the status port, when it has one)."""
    import torch

    if a["threads"]:
        torch.set_num_threads(a["threads"])
    if a["device"].startswith("cuda"):
        torch.cuda.set_device(torch.device(a["device"]))   # NCCL's point-to-point uses the current device
    lo, hi = a["layers"]
    t0 = time.perf_counter()
    model, _ = load_stage(resolve(a["model"]), (lo, hi), a["seed"], a["dtype"], a["device"])
    if model.has_head != (a["rank"] == a["world_size"] - 1):
        raise EngineError(f"rank {a['rank']} of {a['world_size']} holds layers {lo}:{hi}, but the last rank must "
                          f"hold the last layer ({model.config.n_layer - 1}) and only the last rank")
    info = {"engine": NAME, "model": a["model"], "rank": a["rank"], "layers": [lo, hi], "state": "loaded",
            "epoch": None, "pid": os.getpid()}
    if a["port"]:
        try:
            _status_server(a["host"], a["port"], info)
        except OSError as e:
            raise EngineError(f"cannot listen on {a['host']}:{a['port']} for status ({e.strerror})") from None
    log(f"layers {lo}:{hi} of {a['model']} loaded in {time.perf_counter() - t0:.1f} s; "
        f"rendezvous at {a['master']}")
    return StageRunner(model), info


def _epoch_name(store: Any) -> str:
    return store.get("epoch").decode() if store.check(["epoch"]) else ""


def _epochs(store: Any, runner: StageRunner, info: dict[str, Any], a: dict[str, Any], me: str,
            log: Callable[[str], None]) -> None:
    """Idle at the rendezvous, join each new epoch the head starts, serve it until it ends; again."""
    seen = _epoch_name(store)
    while True:
        info["state"] = "idle"
        store.set(f"idle/{a['rank']}", me)
        while (cur := _epoch_name(store)) == seen:
            time.sleep(0.05)
        seen = cur
        try:
            pg = make_group(store, f"epoch/{cur}", a["rank"], a["world_size"], a["host"], a["timeout"], a["backend"])
        except Exception as e:  # noqa: BLE001 - the head gave up on that epoch; wait for the next
            log(f"could not join epoch {cur}: {short_error(e, 'rendezvous')}")
            continue
        info.update(state="serving", epoch=cur)
        log(f"joined epoch {cur}")
        link = Link(pg, a["rank"], a["world_size"], a["timeout"], a["device"] if a["backend"] == "nccl" else "cpu")
        try:
            _serve_epoch(link, runner, a)
            log(f"epoch {cur} closed by the head")
        except LinkDown as e:
            log(f"epoch {cur} ended: {e}")
        finally:
            runner.clear()
            link.close()


def _serve_epoch(link: Link, runner: StageRunner, a: dict[str, Any]) -> None:
    """Receive from the previous rank, compute, pass on (or reply to the head from the last stage)."""
    import torch

    rank, world = a["rank"], a["world_size"]
    dev = torch.device(a["device"])
    dtype = next(runner.model.parameters()).dtype
    wire = Wire(world, runner.model.config.n_embd, dtype, link.comm_device)
    last = rank == world - 1
    bufs = [wire.empty(), wire.empty()]
    cur = 0
    pending = link.post_recv(rank - 1, bufs[cur])
    while True:
        link.wait(pending, f"waiting for rank {rank - 1}")
        buf = bufs[cur]
        hdr = wire.header(buf).clone()
        h = hdr.tolist()
        op, rid, T = h[H_OP], int(h[H_RID]), int(h[H_T])
        x = None
        if op == OP_BATCH:
            payload = link.recv(rank - 1, torch.empty(batch_bytes(rid, T, wire.C, dtype), dtype=torch.uint8,
                                                      device=wire.device), f"a batch from rank {rank - 1}")
            cur ^= 1
            pending = link.post_recv(rank - 1, bufs[cur])
            _batch(link, runner, wire, hdr, unpack_batch(payload, rid, T, wire.C, dtype), dev, a)
            continue
        if op == OP_STEP:
            x = wire.inline(buf).clone() if T == 1 else link.recv(
                rank - 1, torch.empty(1, T, wire.C, dtype=dtype, device=wire.device),
                f"hidden states from rank {rank - 1}")
        cur ^= 1
        pending = link.post_recv(rank - 1, bufs[cur])   # the next message may arrive while we compute
        y = None
        if op == OP_STEP:
            t = time.perf_counter()
            y = runner.step(rid, x.to(dev), int(h[H_START]), int(h[H_MAXLEN]))
            if last:
                token = runner.sample(rid, y, h[H_TEMP], int(h[H_TOPK]), h[H_TOPP], int(h[H_SEED]))
            else:
                y = y.to(wire.device)
            hdr[HDR + rank] = (time.perf_counter() - t) * 1e3
        elif op == OP_FREE:
            runner.free(rid)
        if last:
            reply = torch.zeros(REPLY + world, dtype=torch.float64, device=wire.device)
            reply[0], reply[1] = op, rid
            reply[2] = token if op == OP_STEP else -1
            reply[REPLY:] = hdr[HDR:]
            link.send(0, reply)
        else:
            link.send(rank + 1, wire.pack(hdr, y))
            if y is not None and T > 1:
                link.send(rank + 1, y)
        if op == OP_CLOSE:
            link.reap(block=True)
            return


def _batch(link: Link, runner: StageRunner, wire: Wire, hdr: Any, payload: tuple[Any, Any], dev: Any,
           a: dict[str, Any]) -> None:
    """One micro-batch: run the stage on all its rows, pass it on (or, from the last stage, reply
    with a token for every entry that asked for one)."""
    import torch

    rank, world = a["rank"], a["world_size"]
    table, x = payload
    B = table.shape[0]
    rows = table.tolist()
    entries = [(int(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]
    t = time.perf_counter()
    y = runner.step_batch(entries, x.to(dev))
    if rank < world - 1:
        hdr[HDR + rank] = (time.perf_counter() - t) * 1e3
        link.send(rank + 1, wire.pack(hdr, None))
        link.send(rank + 1, pack_batch(table, y.to(wire.device)))
        return
    toks = [runner.sample(int(r[0]), y[i:i + 1, None, :], r[4], int(r[5]), r[6], int(r[7])) if r[8] else -1
            for i, r in enumerate(rows)]
    hdr[HDR + rank] = (time.perf_counter() - t) * 1e3
    reply = torch.zeros(REPLY + world + B, dtype=torch.float64)
    reply[0], reply[1], reply[2] = OP_BATCH, B, -1
    reply[REPLY:REPLY + world] = hdr[HDR:].cpu()
    reply[REPLY + world:] = torch.tensor(toks, dtype=torch.float64)
    link.send(0, reply.to(wire.device))


def worker_main(argv: list[str]) -> int:
    """`python -m tiers.tier3.pipeline worker ...`: exit 2 with one line when the arguments or the model are wrong."""
    # c10d logs every retry of a rendezvous with a C++ stack trace; this loop reports its own, in one line
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    ap = argparse.ArgumentParser(prog="python -m tiers.tier3.pipeline worker",
                                 description="Host one stage of a pipeline-parallel model.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--master", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--backend", default="gloo")
    ns = ap.parse_args(argv)
    try:
        run_worker(check_worker_args(vars(ns)))   # the options are named as the launch arguments
    except EngineError as e:
        print(f"pipeline worker: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "worker":
        print("usage: python -m tiers.tier3.pipeline worker --model SPEC --layers A:B --rank R --world-size W "
              "--master HOST:PORT [--host H] [--port P] ...", file=sys.stderr)
        return 2
    return worker_main(argv[1:])
