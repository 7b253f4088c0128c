"""The wire between pipeline stages: one process group per epoch, fixed-size messages, waits with timeouts.

    head (rank 0) --[header | hidden state]--> rank 1 --> ... --> rank W-1 --[op, rid, token, ms...]--> head

    header (float64): op, request id, T positions, start, max_len, temperature, top_k, top_p, seed, spare,
                      then one compute-ms slot per stage (each stage fills its own on the way)
    reply  (float64): op, request id, sampled token, spare, then the stages' compute-ms slots

    a batch (OP_BATCH): header with request id = B entries and T = N positions in all, then one payload
        [table (B x 9 float64: rid, T, start, max_len, temperature, top_k, top_p, seed, sample?) | (N, C) states]
    its reply: op, B, -1, spare, the compute-ms slots, then B sampled tokens (-1 where not sampled)

A decode step (T == 1) is one message per hop: the header and the one hidden
state share a buffer, so the receiver wakes once. Messages are float64 so ids
and seeds up to 2**53 travel exactly. Transport is torch.distributed
point-to-point (gloo; NCCL on CUDA nodes) and every wait has a timeout, never
the 30-minute default. A process group that fails is over for good
(`LinkDown`): the head starts a new epoch with a fresh group instead.
"""
from __future__ import annotations

import datetime as dt
import re
import socket
from collections import deque
from typing import Any

from tiers.tier3.engine import EngineError

OP_STEP, OP_FREE, OP_PING, OP_CLOSE, OP_BATCH = 1.0, 2.0, 3.0, 4.0, 5.0
H_OP, H_RID, H_T, H_START, H_MAXLEN, H_TEMP, H_TOPK, H_TOPP, H_SEED = range(9)
HDR = 10        # header: the fields above + one spare, then one compute-ms slot per stage
REPLY = 4       # reply: op, rid, token, spare, then one compute-ms slot per stage
ROW = 9         # a batch table's row: rid, T, start, max_len, temperature, top_k, top_p, seed, sample


class LinkDown(Exception):
    """The process group of this epoch failed (peer gone, timeout); the epoch is over."""


class Link:
    """Point-to-point messages of one epoch: async sends kept alive until done, waits with a timeout."""

    def __init__(self, pg: Any, rank: int, world: int, timeout: float, comm_device: str = "cpu"):
        self.pg, self.rank, self.world, self.timeout = pg, rank, world, timeout
        self.comm_device = comm_device
        self.sends: deque[tuple[Any, Any]] = deque()

    def send(self, dst: int, t: Any) -> int:
        t = t.contiguous()
        try:
            self.sends.append((self.pg.send([t], dst, 0), t))
        except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError with the transport's message
            raise LinkDown(short_error(e, f"send to rank {dst}")) from None
        self.reap()
        return t.numel() * t.element_size()

    def reap(self, block: bool = False) -> None:
        """Retire finished sends (re-raising their errors); with block, wait for all of them."""
        while self.sends and (block or self.sends[0][0].is_completed()):
            w, _ = self.sends.popleft()
            self.wait(w, f"send from rank {self.rank}")

    def post_recv(self, src: int, t: Any) -> Any:
        try:
            return self.pg.recv([t], src, 0)
        except Exception as e:  # noqa: BLE001
            raise LinkDown(short_error(e, f"recv from rank {src}")) from None

    def wait(self, work: Any, what: str, timeout: float | None = None) -> None:
        try:
            work.wait(dt.timedelta(seconds=timeout or self.timeout))
        except Exception as e:  # noqa: BLE001
            raise LinkDown(short_error(e, what)) from None

    def recv(self, src: int, t: Any, what: str, timeout: float | None = None) -> Any:
        self.wait(self.post_recv(src, t), what, timeout)
        return t

    def close(self) -> None:
        self.sends.clear()
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                if hasattr(pg, "abort"):
                    pg.abort()   # wake any wait still pending on this group
            except Exception:  # noqa: BLE001, S110 - best effort: the group is being thrown away
                pass
            del pg


def short_error(e: BaseException, what: str) -> str:
    """One line for a transport error: what was going on, and the first line of gloo's own message."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    msg = re.sub(r"^\[[^\]]*\]\s*", "", msg)   # drop gloo's "[/path/pair.cc:537]" prefix
    if "timed out" in msg.lower() or "timeout" in msg.lower():
        return f"{what}: timed out ({msg[:160]})"
    return f"{what}: {msg[:160]}"


class Wire:
    """The message format of a hop: one fixed-size byte message = header + one position's hidden state.

    A decode step (T == 1) is one message per hop, so one wake-up of the receiver; a prompt
    (T > 1) sends its (1, T, n_embd) hidden states as a second message the header announces.
    FREE, PING and CLOSE use the same message with the hidden-state part unused."""

    def __init__(self, world: int, n_embd: int, dtype: Any, device: Any):
        import torch

        self.world, self.C, self.dtype, self.device = world, n_embd, dtype, device
        self.hb = 8 * (HDR + world)
        self.size = self.hb + n_embd * torch.empty(0, dtype=dtype).element_size()

    def empty(self) -> Any:
        import torch

        return torch.zeros(self.size, dtype=torch.uint8, device=self.device)

    def header(self, buf: Any) -> Any:
        import torch

        return buf[:self.hb].view(torch.float64)

    def inline(self, buf: Any) -> Any:
        return buf[self.hb:].view(self.dtype).view(1, 1, self.C)

    def pack(self, header: Any, y: Any | None) -> Any:
        """A new message: ``header`` (float64, HDR + world) and, for one position, its hidden state."""
        buf = self.empty()
        self.header(buf).copy_(header)
        if y is not None and y.shape[1] == 1:
            self.inline(buf).copy_(y)
        return buf


def pack_batch(table: Any, y: Any) -> Any:
    """A batch's payload: its table (B, ROW) float64 and its hidden states (1, N, C), as one byte message."""
    import torch

    return torch.cat([table.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)])


def unpack_batch(buf: Any, B: int, N: int, C: int, dtype: Any) -> tuple[Any, Any]:
    """(table (B, ROW) float64, hidden states (1, N, C)) of a batch payload."""
    import torch

    tb = 8 * ROW * B
    return buf[:tb].view(torch.float64).view(B, ROW), buf[tb:].view(dtype).view(1, N, C)


def batch_bytes(B: int, N: int, C: int, dtype: Any) -> int:
    import torch

    return 8 * ROW * B + N * C * torch.empty(0, dtype=dtype).element_size()


def make_group(store: Any, prefix: str, rank: int, world: int, host: str, timeout: float,
               backend: str = "gloo") -> Any:
    """A fresh process group under ``prefix`` of the rendezvous store, bound to ``host``'s interface."""
    import torch.distributed as dist

    sub = dist.PrefixStore(prefix, store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = dt.timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(sub, rank, world, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = dt.timedelta(seconds=timeout)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(sub, rank, world, opts)


def connect_store(host: str, port: int, timeout: float) -> Any:
    import torch.distributed as dist

    return dist.TCPStore(host, port, None, False, timeout=dt.timedelta(seconds=timeout), wait_for_workers=False)


def serve_store(host: str, port: int, timeout: float) -> Any:
    """The rendezvous store, listening on ``host`` only: we bind the socket and hand its descriptor to
    TCPStore, which owns (and closes) it from then on."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise EngineError(f"cannot listen on {host}:{port} for the pipeline rendezvous ({e.strerror}); "
                          f"pick a free port or an address of this machine") from None
    return dist.TCPStore(host, port, None, True, timeout=dt.timedelta(seconds=timeout), wait_for_workers=False,
                         master_listen_fd=sock.detach(), use_libuv=False)
