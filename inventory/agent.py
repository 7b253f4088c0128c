"""The node agent: `tierkit agent` runs on every machine of a tier-3 cluster.

It does three small things, each so that a head node can decide where to put
which layers without logging in anywhere:

- advertise itself over mDNS (`_tierkit._tcp.local.`), so peers are found with
  no configuration;
- serve its hardware profile (`GET /v1/profile`), so the head knows each node's
  memory and compute;
- serve bytes to download or swallow (`/v1/bandwidth`), and a tiny `GET /v1/ping`,
  so the head measures the link it will actually use, not a datasheet figure.

- start, watch and stop the worker side of a tier-3 engine (`/v1/workers`) for a
  head that presents the shared secret (`Authorization: Bearer TOKEN`; the token
  is generated on first run, mode 0600, or taken from $TIERKIT_AGENT_TOKEN).
  Only engines it knows, with arguments each engine validates into an argv:
  no shell, no free-form command. Workers that die are restarted.

Profile, ping and bandwidth stay open (they reveal nothing a mDNS TXT does not);
everything that starts or stops a process needs the token, and a request
without it gets 401 before its body is even read. Stdlib `http.server` (the
base install has no web framework) and zeroconf, imported only when
advertising starts.
"""
from __future__ import annotations

import argparse
import collections
import errno
import hmac
import secrets
import subprocess
import ipaddress
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from inventory import __version__
from inventory.profile import Profile

DEFAULT_PORT = 8477
SERVICE_TYPE = "_tierkit._tcp.local."
# Largest transfer either way: enough to time a 10 Gbit/s link, small enough
# that a typo cannot make the agent stream for minutes.
MAX_TRANSFER = 256 << 20
_CHUNK = 1 << 20
# Random bytes, so that no compression anywhere on the path flatters the link.
_PAYLOAD = memoryview(os.urandom(_CHUNK))
# Idle keep-alive connections are dropped after this, so they cannot pin threads.
_IDLE_SECONDS = 60.0
# zeroconf probes for name conflicts and announces three times (~1.7 s);
# stopping waits at most this long for that to finish.
_REGISTER_GRACE = 3.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class AgentError(Exception):
    """The agent cannot start; str() is one line that names the fix."""


class PortInUse(AgentError):
    """Another process already listens on the requested address and port."""


class LaunchError(Exception):
    """A launch request the agent refuses (HTTP 400); str() is one line."""


# ---------------------------------------------------------------- the shared secret

TOKEN_ENV = "TIERKIT_AGENT_TOKEN"
MAX_BODY = 64 << 10
MAX_WORKERS = 8
ENGINES = ("llama-rpc", "pipeline", "vllm")


def token_path() -> Path:
    """$TIERKIT_HOME/agent.token, else ~/.config/tierkit/agent.token (next to the profile)."""
    from inventory.profile import default_path

    return default_path().parent / "agent.token"


def load_or_create_token(path: Path | None = None) -> tuple[str, bool]:
    """(token, created): $TIERKIT_AGENT_TOKEN, else the token file, else a new one written 0600.

    A token file others can read is refused: anyone who reads it can start
    processes on this machine.
    """
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        if len(env) < 16:
            raise AgentError(f"${TOKEN_ENV} is too short to be a secret: use at least 16 characters")
        return env, False
    path = Path(path) if path else token_path()
    if path.exists():
        return read_token_file(path), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token, True


def read_token_file(path: Path) -> str:
    """The token in `path`; AgentError (one line) if missing, empty or readable by others."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise AgentError(f"cannot read token file {path} ({exc.strerror or exc}): copy it from the agent's "
                         f"machine or set ${TOKEN_ENV}") from None
    if mode & 0o077:
        raise AgentError(f"token file {path} is readable by other users: chmod 600 {path}")
    if len(text) < 16:
        raise AgentError(f"token file {path} holds no usable token: delete it and restart the agent")
    return text


# ---------------------------------------------------------------- workers

def worker_argv(engine: str, args: Any) -> list[str]:
    """Ask the engine's module for the worker argv; every refusal is a LaunchError (one line)."""
    if engine not in ENGINES:
        raise LaunchError(f"unknown engine {engine!r}: this agent launches {', '.join(ENGINES)}")
    if not isinstance(args, dict):
        raise LaunchError("args must be a JSON object")
    import importlib

    module = {"llama-rpc": "tiers.tier3.llama_rpc", "pipeline": "tiers.tier3.pipeline", "vllm": "tiers.tier3.vllm"}
    try:
        mod = importlib.import_module(module[engine])
        from tiers.tier3.engine import EngineError
    except ImportError as exc:
        raise LaunchError(f"the {engine} engine is not available on this node ({exc}): update tierkit here") from None
    fn = getattr(mod, "worker_command", None)
    if fn is None:
        raise LaunchError(f"the {engine} engine on this node cannot start workers (no worker_command)")
    try:
        argv = fn(dict(args))
    except EngineError as exc:
        raise LaunchError(f"{engine}: {exc}") from None
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise LaunchError(f"the {engine} engine returned no command to run")
    return argv


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Worker:
    """One supervised worker process: restarted when it dies, until stopped."""

    def __init__(self, wid: str, engine: str, args: dict[str, Any], argv: list[str], restart: bool,
                 log: Any) -> None:
        self.id, self.engine, self.args, self.argv, self.restart = wid, engine, args, argv, restart
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.stopped = False
        self.ready = False
        self.exit_code: int | None = None
        self.started_at = 0.0
        self._log = log
        self._lock = threading.Lock()

    def spawn(self) -> None:
        repo = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop(TOKEN_ENV, None)  # workers have no business with the agent's secret
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, cwd=repo, env=env, start_new_session=True)
        except OSError as exc:
            raise LaunchError(f"cannot start {self.argv[0]} ({exc.strerror or exc})") from None
        self.proc, self.ready, self.exit_code = proc, False, None
        self.starts += 1
        self.started_at = time.time()
        self.lines.append(f"[agent] started pid {proc.pid} (start #{self.starts}): {' '.join(self.argv)}")
        threading.Thread(target=self._pump, args=(proc,), daemon=True, name=f"worker-{self.id}").start()

    def _pump(self, proc: subprocess.Popen) -> None:
        """Keep the last lines of output; when the process ends, restart it unless stopped."""
        for raw in proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip())
        code = proc.wait()
        with self._lock:
            self.exit_code = code
            self.lines.append(f"[agent] pid {proc.pid} exited with {code}")
            if self.stopped or not self.restart or self.proc is not proc:
                return
        # Back off a little when it dies young, so a worker that cannot start does not spin.
        young = time.time() - self.started_at < 2.0
        time.sleep(2.0 if young else 0.2)
        with self._lock:
            if self.stopped:
                return
            self._log(f"worker {self.id} ({self.engine}) exited with {code}; restarting")
            try:
                self.spawn()
            except LaunchError as exc:
                self.lines.append(f"[agent] restart failed: {exc}")

    def port(self) -> int | None:
        port = self.args.get("port")
        return port if isinstance(port, int) else None

    def status(self, lines: int = 20) -> dict[str, Any]:
        proc = self.proc
        alive = proc is not None and proc.poll() is None
        if alive and not self.ready and self.engine == "llama-rpc":
            # Ready = the RPC port accepts; probed only until it first does (a connection
            # to the RPC server waits in its accept queue, so do not keep knocking).
            try:
                socket.create_connection((self.args["host"], self.args["port"]), timeout=0.5).close()
                self.ready = True
            except OSError:
                pass
        state = "stopped" if self.stopped else ("running" if alive else ("restarting" if self.restart else "exited"))
        return {"id": self.id, "engine": self.engine, "args": self.args, "state": state,
                "pid": proc.pid if alive else None, "starts": self.starts, "restarts": max(self.starts - 1, 0),
                "ready": (self.ready and alive) if self.engine == "llama-rpc" else None,
                "exit_code": self.exit_code, "argv": self.argv, "log": list(self.lines)[-lines:] if lines else []}

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self.stopped = True
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


class Supervisor:
    """The agent's workers: launch (validated), look up, stop."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.workers: dict[str, Worker] = {}
        self._lock = threading.Lock()

    def launch(self, body: Any) -> Worker:
        if not isinstance(body, dict):
            raise LaunchError('the body must be a JSON object: {"engine": NAME, "args": {...}}')
        unknown = set(body) - {"engine", "args", "restart"}
        if unknown:
            raise LaunchError(f"unknown field(s) {', '.join(sorted(unknown))}: send engine, args, restart")
        engine, args = body.get("engine"), body.get("args", {})
        restart = body.get("restart", True)
        if not isinstance(restart, bool):
            raise LaunchError("restart must be true or false")
        if not isinstance(engine, str):
            raise LaunchError(f"engine must be one of {', '.join(ENGINES)}")
        if not isinstance(args, dict):
            raise LaunchError("args must be a JSON object")
        args = dict(args)
        if engine == "llama-rpc":
            # The RPC protocol has no authentication: bind it where the agent is bound, unless told
            # a more specific address; port 0 (or none) lets the agent pick a free one.
            default_host = "127.0.0.1" if self.agent.host == "0.0.0.0" else self.agent.host
            args.setdefault("host", default_host)
            if args.get("port") in (None, 0):
                try:
                    args["port"] = free_port(str(args["host"]))
                except OSError as exc:
                    raise LaunchError(f"llama-rpc: cannot bind {args['host']!r} on this node "
                                      f"({exc.strerror or exc}): pass one of its addresses") from None
        argv = worker_argv(engine, args)
        with self._lock:
            live = [w for w in self.workers.values() if not w.stopped]
            if len(live) >= MAX_WORKERS:
                raise LaunchError(f"this agent already runs {len(live)} workers: stop one first")
            port = args.get("port")
            if isinstance(port, int) and any(w.port() == port for w in live):
                raise LaunchError(f"port {port} is already used by another worker on this node: pick another")
            stopped = [k for k, v in self.workers.items() if v.stopped]
            for k in stopped[: max(0, len(stopped) - 16)]:  # keep a little history, not all of it
                del self.workers[k]
            wid = secrets.token_hex(4)
            w = Worker(wid, engine, args, argv, restart, self.agent.log)
            w.spawn()
            self.workers[wid] = w
        self.agent.log(f"launched worker {wid}: {engine} {json.dumps(args, sort_keys=True)}")
        return w

    def get(self, wid: str) -> Worker | None:
        with self._lock:
            return self.workers.get(wid)

    def stop(self, wid: str) -> Worker | None:
        w = self.get(wid)
        if w is not None:
            w.stop()
            self.agent.log(f"stopped worker {wid}")
        return w

    def stop_all(self) -> None:
        with self._lock:
            workers = list(self.workers.values())
        for w in workers:
            w.stop()


# ---------------------------------------------------------------- what the agent tells others

def summarize(profile: Profile, name: str, memory_budget: int | None = None) -> dict[str, Any]:
    """The few numbers a head needs to place layers, in one small dict.

    Available memory is read now rather than from the profile: the head splits
    the model by free memory at launch time, not at probe time.
    """
    cpu = profile.cpu
    mem = profile.memory
    available = mem.available_bytes if mem else None
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unsupported: keep the probed figure
        pass
    return {
        "name": name,
        "version": __version__,
        "cpu": cpu.model if cpu else None,
        "physical_cores": cpu.physical_cores if cpu else None,
        "threads": cpu.threads if cpu else None,
        "cpu_matmul_gflops_fp32": cpu.matmul_gflops["fp32"].value if cpu and "fp32" in cpu.matmul_gflops else None,
        "memory_bandwidth_gbs": cpu.memory_bandwidth_gbs.value if cpu and cpu.memory_bandwidth_gbs else None,
        "memory_total_bytes": mem.total_bytes if mem else None,
        "memory_available_bytes": available,
        "gpus": [{"model": g.model, "backend": g.backend, "memory_bytes": g.memory_bytes,
                  "memory_free_bytes": g.memory_free_bytes, "unified_memory": g.unified_memory}
                 for g in profile.gpus],
        "boards": len(profile.boards),
        # What this node lets placement use (--memory-budget), when the user capped it.
        "memory_budget_bytes": memory_budget,
        "engines": list(ENGINES),
    }


def txt_properties(summary: dict[str, Any]) -> dict[str, str]:
    """mDNS TXT record: a glance at the node before anyone connects (kept short: TXT has ~1300 bytes)."""
    mem = summary.get("memory_total_bytes")
    gpus = summary.get("gpus") or []
    return {
        "version": str(summary.get("version", "")),
        "cpu": str(summary.get("cpu") or "")[:60],
        "threads": str(summary.get("threads") or ""),
        "mem_gb": f"{mem / 2**30:.1f}" if mem else "",
        "gpu": ", ".join(str(g["model"]) for g in gpus)[:80],
        "budget_gb": f"{summary['memory_budget_bytes'] / 2**30:.3f}" if summary.get("memory_budget_bytes") else "",
        "engines": ",".join(summary.get("engines") or []),
    }


# ---------------------------------------------------------------- HTTP

class _Server(ThreadingHTTPServer):
    """A threading HTTP server that knows its open connections, so stop() can close them.

    Without that, a keep-alive connection's daemon thread would go on answering
    after the agent was stopped.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], agent: Agent) -> None:
        self.agent = agent
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a dropped client is not news.
        if self.agent.verbose:
            exc = sys.exc_info()[1]
            self.agent.log(f"{client_address[0]} connection error: {type(exc).__name__}: {exc}")


class _Handler(BaseHTTPRequestHandler):
    """Routes the agent's endpoints; every reply is JSON except the bandwidth stream."""

    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: RTT is measured over one connection
    server_version = f"tierkit-agent/{__version__}"
    sys_version = ""
    timeout = _IDLE_SECONDS
    # Headers and body go out as separate writes; with Nagle on, the second waits
    # for the peer's delayed ACK (~40 ms on Linux), which would swamp the RTT.
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return self.server_version

    # -- plumbing

    def _json(self, code: int, body: dict[str, Any], close: bool = False,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(data)

    def _error(self, code: int, message: str, close: bool = False,
               headers: dict[str, str] | None = None) -> None:
        self._json(code, {"ok": False, "error": message}, close, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests are refused by the base class through here: answer JSON, not HTML."""
        self.close_connection = True
        # The base class answers an unparsable request line HTTP/0.9-style (a bare body);
        # no client speaks 0.9 any more, and a status line is what they can read.
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.1"
        try:
            self._error(code, message or self.responses.get(code, ("error",))[0], close=True)
        except OSError:
            pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.server.agent.verbose:
            path = getattr(self, "path", "-")
            self.server.agent.log(f"{self.client_address[0]} {self.command or '-'} {path} {code}")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.agent.verbose:
            self.server.agent.log(f"{self.client_address[0]} " + (format % args))

    # -- dispatch

    def _dispatch(self) -> None:
        routes = {
            "/v1/ping": {"GET": self._ping},
            "/v1/profile": {"GET": self._profile},
            "/v1/bandwidth": {"GET": self._download, "POST": self._upload},
            "/v1/workers": {"GET": self._workers, "POST": self._launch},
            "/v1/workers/*": {"GET": self._worker, "DELETE": self._stop_worker},
        }
        try:
            parts = urlsplit(self.path)
            path = parts.path
            if re.fullmatch(r"/v1/workers/[0-9a-f]{8}", path):
                self._wid = path.rsplit("/", 1)[1]
                path = "/v1/workers/*"
            methods = routes.get(path)
            if methods is None:
                self._error(404, f"no such endpoint: {parts.path} (try /v1/ping, /v1/profile, /v1/bandwidth, "
                            "/v1/workers)", close=self._has_body())
                return
            handler = methods.get(self.command)
            if handler is None:
                allowed = ", ".join(methods)
                self._error(405, f"{self.command} not allowed on {parts.path}; use {allowed}", close=True,
                            headers={"Allow": allowed})
                return
            handler(parts.query)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # never a traceback to the client
            self.close_connection = True
            if self.server.agent.verbose:
                self.server.agent.log(f"internal error on {self.command} {self.path}: {type(exc).__name__}: {exc}")
            try:
                self._error(500, f"internal error: {type(exc).__name__}", close=True)
            except OSError:
                pass

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _has_body(self) -> bool:
        return bool(self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding"))

    # -- authentication

    def _authorized(self) -> bool:
        """Bearer token, compared in constant time; otherwise 401 and the connection closes (body unread)."""
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        expected = self.server.agent.token
        ok = scheme.lower() == "bearer" and bool(expected) and hmac.compare_digest(
            given.strip().encode(), expected.encode())
        if not ok:
            what = "missing" if not header else "wrong"
            self.server.agent.log(f"{self.client_address[0]} {self.command} {self.path}: 401 ({what} token)")
            self._error(401, f"{what} token: send 'Authorization: Bearer TOKEN' with the agent's token "
                        f"(its token file, or ${TOKEN_ENV})", close=True, headers={"WWW-Authenticate": "Bearer"})
        return ok

    def _body_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None or not length.strip().isdigit():
            self._error(411, "send a JSON body with a Content-Length", close=True)
            return _NO_BODY
        n = int(length)
        if n > MAX_BODY:
            self._error(413, f"body of {n} bytes is over the limit of {MAX_BODY}", close=True)
            return _NO_BODY
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self._error(400, "the body is not valid JSON")
            return _NO_BODY

    # -- workers

    def _workers(self, query: str) -> None:
        if not self._authorized():
            return
        sup = self.server.agent.supervisor
        with sup._lock:
            workers = list(sup.workers.values())
        self._json(200, {"ok": True, "workers": [w.status(lines=0) for w in workers]})

    def _launch(self, query: str) -> None:
        if not self._authorized():
            return
        body = self._body_json()
        if body is _NO_BODY:
            return
        try:
            w = self.server.agent.supervisor.launch(body)
        except LaunchError as exc:
            self._error(400, str(exc))
            return
        self._json(201, {"ok": True, "worker": w.status()})

    def _worker(self, query: str) -> None:
        if not self._authorized():
            return
        w = self.server.agent.supervisor.get(self._wid)
        if w is None:
            self._error(404, f"no worker {self._wid} on this node")
            return
        lines = parse_qs(query).get("lines", ["20"])[0]
        n = int(lines) if lines.isdigit() else 20
        self._json(200, {"ok": True, "worker": w.status(lines=min(n, 200))})

    def _stop_worker(self, query: str) -> None:
        if not self._authorized():
            return
        w = self.server.agent.supervisor.stop(self._wid)
        if w is None:
            self._error(404, f"no worker {self._wid} on this node")
            return
        self._json(200, {"ok": True, "worker": w.status()})

    # -- endpoints

    def _ping(self, query: str) -> None:
        agent = self.server.agent
        self._json(200, {"ok": True, "name": agent.name, "version": __version__})

    def _profile(self, query: str) -> None:
        agent = self.server.agent
        self._json(200, {"profile": agent.profile.to_dict(),
                         "summary": summarize(agent.profile, agent.name, agent.memory_budget)})

    def _download(self, query: str) -> None:
        """Stream N bytes from one preallocated buffer: the peer times how fast they arrive."""
        try:
            values = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query)).get("bytes", [])
        except ValueError:
            values = ["?"]
        if len(values) != 1 or not values[0].isdigit():
            self._error(400, f"bytes must be one whole number 0..{MAX_TRANSFER}, as in /v1/bandwidth?bytes=8388608")
            return
        n = int(values[0])
        if n > MAX_TRANSFER:
            self._error(400, f"bytes={n} is over the limit of {MAX_TRANSFER}; ask for less")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        left = n
        while left > 0:
            k = min(left, _CHUNK)
            self.wfile.write(_PAYLOAD[:k])
            left -= k

    def _upload(self, query: str) -> None:
        """Swallow a body and say how long reading it took: the upload direction of the link."""
        if self.headers.get("Transfer-Encoding"):
            self._error(411, "send the body with a Content-Length, not chunked", close=True)
            return
        length = self.headers.get("Content-Length")
        if length is None:
            self._error(411, "Content-Length is required", close=True)
            return
        if not length.strip().isdigit():
            self._error(400, f"Content-Length must be a whole number, got {length!r}", close=True)
            return
        n = int(length)
        if n > MAX_TRANSFER:
            self._error(413, f"body of {n} bytes is over the limit of {MAX_TRANSFER}", close=True)
            return
        buf = bytearray(min(n, _CHUNK) or 1)
        view = memoryview(buf)
        got = 0
        t0 = time.perf_counter()
        while got < n:
            k = self.rfile.readinto(view[: min(n - got, len(buf))])
            if not k:  # the client gave up before sending everything
                self.close_connection = True
                return
            got += k
        seconds = time.perf_counter() - t0
        self._json(200, {"ok": True, "bytes": got, "seconds": seconds})


_NO_BODY = object()


# ---------------------------------------------------------------- mDNS

def _advertised_addresses(host: str) -> list[str]:
    """The IPv4 addresses peers should use: the bound one, or every non-loopback one for 0.0.0.0."""
    if host != "0.0.0.0":
        return [host]
    found: list[str] = []
    try:
        import psutil

        stats = psutil.net_if_stats()
        for nic, addrs in psutil.net_if_addrs().items():
            if nic in stats and not stats[nic].isup:
                continue
            for a in addrs:
                if a.family == socket.AF_INET and not a.address.startswith("127.") and a.address not in found:
                    found.append(a.address)
    except Exception:  # no psutil: fall back to what the host name resolves to
        try:
            found = [a for a in socket.gethostbyname_ex(socket.gethostname())[2] if not a.startswith("127.")]
        except OSError:
            found = []
    return found or ["127.0.0.1"]  # a lone machine: at least same-host peers find it


class _Advertiser:
    """Registers the agent over mDNS in a background thread (it takes ~1.7 s) and unregisters on stop."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.done = threading.Event()  # registration finished, one way or the other
        self.error: str | None = None
        self.instance = f"{agent.name}.{SERVICE_TYPE}"
        self._zc: Any = None
        self._thread = threading.Thread(target=self._register, name="tierkit-agent-mdns", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _register(self) -> None:
        agent = self.agent
        try:
            from zeroconf import NonUniqueNameException, ServiceInfo, Zeroconf

            addresses = _advertised_addresses(agent.host)
            # A specific address: answer only on that interface (the one peers can reach).
            self._zc = Zeroconf(interfaces=[agent.host]) if agent.host != "0.0.0.0" else Zeroconf()
            info = ServiceInfo(
                SERVICE_TYPE, self.instance, port=agent.port,
                addresses=[socket.inet_aton(a) for a in addresses],
                properties=txt_properties(summarize(agent.profile, agent.name, agent.memory_budget)),
                # Not "<name>.local.": that host name may already belong to the machine's own avahi.
                server=f"tierkit-{agent.name}.local.",
            )
            try:
                self._zc.register_service(info)
            except NonUniqueNameException:
                self.error = (f"another agent already advertises {agent.name!r} on this network: "
                              "pass --name with a unique name")
            else:
                agent.log(f"advertised {self.instance} at {', '.join(addresses)} port {agent.port}")
        except Exception as exc:  # no multicast, no zeroconf: HTTP still works for manual peers
            self.error = f"mDNS advertising failed ({type(exc).__name__}: {exc}); peers can still use --peer"
        finally:
            if self.error:
                agent.log(self.error)
            self.done.set()

    def stop(self) -> None:
        """Send goodbyes so peers forget us at once, then close the sockets."""
        if self._thread.is_alive():
            self._thread.join(_REGISTER_GRACE)
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            zc.unregister_all_services()
        except Exception:
            pass
        try:
            zc.close()
        except Exception:
            pass


# ---------------------------------------------------------------- the agent

def _check_host(host: str) -> str:
    if host in ("", "*"):
        return "0.0.0.0"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            return socket.gethostbyname(host)
        except OSError:
            raise AgentError(f"cannot resolve --host {host!r}: pass one of this machine's IPv4 addresses") from None
    if ip.version != 4:
        raise AgentError(f"--host {host}: the agent speaks IPv4 only for now; pass an IPv4 address or 0.0.0.0")
    return host


def _check_name(name: str | None) -> str:
    """An mDNS instance label peers can type: letters, digits, '-', '_'; at most 63."""
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]).strip("-") or "tierkit"
        return name[:63]
    if not _NAME_RE.match(name):
        raise AgentError(f"--name {name!r}: use 1-63 letters, digits, '-' or '_', starting with a letter or digit")
    return name


def _bind(host: str, port: int, agent: Agent) -> _Server:
    if not 0 <= port <= 65535:
        raise AgentError(f"--port {port}: must be 1-65535")
    try:
        return _Server((host, port), agent)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} on {host} is in use: pass --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise AgentError(f"{host} is not an address of this machine: pass --host with one of its "
                             "addresses, or 0.0.0.0") from None
        if exc.errno == errno.EACCES:
            raise AgentError(f"port {port} on {host} needs privileges: pass --port above 1023") from None
        raise AgentError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class Agent:
    """One agent: bound on construction (so a busy port fails at once), serving after start()."""

    def __init__(self, host: str, port: int, profile: Profile, name: str | None = None, *,
                 verbose: bool = False, advertise: bool = True, token: str | None = None,
                 memory_budget: int | None = None) -> None:
        self.host = _check_host(host)
        self.name = _check_name(name if name is not None else _safe_default(profile.name))
        self.profile = profile
        self.verbose = verbose
        # No token given: a random one nobody knows, so launching stays closed rather than open.
        self.token = token or secrets.token_urlsafe(32)
        if memory_budget is not None and memory_budget <= 0:
            raise AgentError(f"--memory-budget must be positive, got {memory_budget}")
        self.memory_budget = memory_budget
        self.supervisor = Supervisor(self)
        self._server = _bind(self.host, port, self)
        self.port: int = self._server.server_address[1]
        self.advertiser: _Advertiser | None = _Advertiser(self) if advertise else None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"http://{host}:{self.port}"

    def log(self, line: str) -> None:
        print(f"tierkit agent: {line}", file=sys.stderr, flush=True)

    def start(self) -> Agent:
        """Serve HTTP in a background thread at once; advertise over mDNS alongside."""
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="tierkit-agent-http", daemon=True)
        self._thread.start()
        if self.advertiser is not None:
            self.advertiser.start()
        return self

    def stop(self) -> None:
        """Unregister from mDNS, stop workers, stop accepting, close open connections; safe to call twice."""
        self.supervisor.stop_all()
        if self.advertiser is not None:
            self.advertiser.stop()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.close_connections()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _safe_default(profile_name: str | None) -> str | None:
    """A profile's name used as the agent's, when it is already a valid label; else None (the host name)."""
    return profile_name if profile_name and _NAME_RE.match(profile_name) else None


def start_in_thread(host: str = "127.0.0.1", port: int = 0, profile: Profile | None = None,
                    name: str | None = None, *, verbose: bool = False, advertise: bool = True,
                    token: str | None = None, memory_budget: int | None = None) -> Agent:
    """An agent serving in background threads (for tests and notebooks); call .stop() when done.

    Port 0 picks a free port; read it from `.port`.
    """
    return Agent(host, port, profile or Profile(name=name), name, verbose=verbose, advertise=advertise,
                 token=token, memory_budget=memory_budget).start()


def serve(host: str, port: int, profile: Profile, name: str | None = None,
          stop: threading.Event | None = None, *, verbose: bool = False, advertise: bool = True,
          token_file: Path | None = None, memory_budget: int | None = None) -> None:
    """Run the agent until `stop` is set, SIGTERM arrives, or Ctrl-C; then unregister and close.

    Raises AgentError (one line) when it cannot start, e.g. PortInUse.
    """
    stop = stop or threading.Event()
    token, created = load_or_create_token(token_file)
    agent = Agent(host, port, profile, name, verbose=verbose, advertise=advertise, token=token,
                  memory_budget=memory_budget)
    if created:
        where = token_file or token_path()
        agent.log(f"new launch token (shown once; also in {where}, mode 0600): {token}")
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        agent.start()
        agent.log(f"{agent.name} listening on http://{agent.host}:{agent.port}")
        while not stop.wait(0.5):  # a timed wait, so Ctrl-C is seen promptly
            pass
    except KeyboardInterrupt:
        pass
    finally:
        agent.stop()
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
        agent.log("stopped")


# ---------------------------------------------------------------- python -m inventory.agent

def _load_profile(path: str | None) -> Profile:
    """The profile to serve: --profile, else the probed one, else a quick probe (no benchmarks)."""
    from inventory.profile import default_path, load

    if path is not None or default_path().exists():
        return load(Path(path) if path else default_path())
    from inventory.probe import probe

    return probe(bench=False, discover=False)


def _parse_budget(text: str | None) -> int | None:
    """'8GiB', '512MiB', '1.5G', bytes -> int; AgentError naming the flag otherwise."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise AgentError(f"--memory-budget {text!r}: write a size such as 8GiB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m inventory.agent` (the `tierkit agent` command wraps serve())."""
    from inventory.profile import ProfileError

    ap = argparse.ArgumentParser(prog="python -m inventory.agent", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="0.0.0.0", help="address to bind and advertise (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--name", default=None, help="name to advertise [default: host name]")
    ap.add_argument("--profile", default=None, help="profile to serve [default: the probed one, else a quick probe]")
    ap.add_argument("--no-mdns", action="store_true", help="do not advertise over mDNS")
    ap.add_argument("--verbose", action="store_true", help="log each request to stderr")
    ap.add_argument("--token-file", default=None, help=f"launch token [default: {token_path()}; or ${TOKEN_ENV}]")
    ap.add_argument("--memory-budget", default=None, help="memory placement may use here, e.g. 8GiB")
    args = ap.parse_args(argv)
    try:
        budget = _parse_budget(args.memory_budget)
        profile = _load_profile(args.profile)
        serve(args.host, args.port, profile, args.name, verbose=args.verbose, advertise=not args.no_mdns,
              token_file=Path(args.token_file) if args.token_file else None, memory_budget=budget)
    except (AgentError, ProfileError) as exc:
        print(f"tierkit agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
