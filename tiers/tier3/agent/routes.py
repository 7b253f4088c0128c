"""The agent's HTTP side: stdlib http.server (the base install has no web framework), JSON in and out.

    GET    /v1/ping                   {"ok", "name", "version"}             open
    GET    /v1/profile                {"profile", "summary"}                open
    GET    /v1/bandwidth?bytes=N      N random bytes                        open
    POST   /v1/bandwidth              swallows the body, says how long      open
    GET    /v1/workers                every worker's status                 token
    POST   /v1/workers                launch {"engine", "args", "restart"}  token
    GET    /v1/workers/ID?lines=N     one worker, its last N log lines      token
    DELETE /v1/workers/ID             stop it                               token

Ping, profile and bandwidth reveal nothing an mDNS TXT record does not; a
request to the workers without the token gets 401 before its body is read.
Every answer is JSON (the bandwidth stream aside), errors included: never an
HTML page, never a traceback.
"""
from __future__ import annotations

import hmac
import json
import os
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from inventory import __version__
from inventory.protocol import BANDWIDTH, MAX_TRANSFER, PING, PROFILE, TOKEN_ENV, WORKERS
from tiers.tier3.agent.errors import LaunchError

MAX_BODY = 64 << 10
_CHUNK = 1 << 20
# Random bytes, so that no compression anywhere on the path flatters the link.
_PAYLOAD = memoryview(os.urandom(_CHUNK))
# Idle keep-alive connections are dropped after this, so they cannot pin threads.
_IDLE_SECONDS = 60.0
_ONE_WORKER = WORKERS + "/*"
_NEEDS_TOKEN = {WORKERS, _ONE_WORKER}
_NO_BODY = object()


class Server(ThreadingHTTPServer):
    """A threading HTTP server that knows its open connections, so stop() can close them.

    Without that, a keep-alive connection's daemon thread would go on answering
    after the agent was stopped. `agent` gives the handlers its name, profile,
    token, supervisor and log.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], agent: Any) -> None:
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

    server: Server
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
            PING: {"GET": self._ping},
            PROFILE: {"GET": self._profile},
            BANDWIDTH: {"GET": self._download, "POST": self._upload},
            WORKERS: {"GET": self._workers, "POST": self._launch},
            _ONE_WORKER: {"GET": self._worker, "DELETE": self._worker},
        }
        try:
            parts = urlsplit(self.path)
            path = parts.path
            if re.fullmatch(re.escape(WORKERS) + r"/[0-9a-f]{8}", path):
                self._wid = path.rsplit("/", 1)[1]
                path = _ONE_WORKER
            methods = routes.get(path)
            if methods is None:
                self._error(404, f"no such endpoint: {parts.path} (try {PING}, {PROFILE}, {BANDWIDTH}, {WORKERS})",
                            close=self._has_body())
                return
            handler = methods.get(self.command)
            if handler is None:
                allowed = ", ".join(methods)
                self._error(405, f"{self.command} not allowed on {parts.path}; use {allowed}", close=True,
                            headers={"Allow": allowed})
                return
            if path not in _NEEDS_TOKEN or self._authorized():
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

    def _length(self, limit: int, code: int, what: str) -> int | None:
        """The request's Content-Length when it is a whole number within `limit`; else an error sent, None."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            self._error(411, f"send {what} with a Content-Length", close=True)
            return None
        if not length.strip().isdigit():
            self._error(400, f"Content-Length must be a whole number, got {length!r}", close=True)
            return None
        n = int(length)
        if n > limit:
            self._error(code, f"body of {n} bytes is over the limit of {limit}", close=True)
            return None
        return n

    def _body_json(self) -> Any:
        n = self._length(MAX_BODY, 413, "a JSON body")
        if n is None:
            return _NO_BODY
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self._error(400, "the body is not valid JSON")
            return _NO_BODY

    # -- workers (the token was checked before these run)

    def _workers(self, query: str) -> None:
        workers = self.server.agent.supervisor.list()
        self._json(200, {"ok": True, "workers": [w.status(lines=0) for w in workers]})

    def _launch(self, query: str) -> None:
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
        """GET: one worker's status and last log lines; DELETE: stop it first."""
        sup = self.server.agent.supervisor
        w = sup.stop(self._wid) if self.command == "DELETE" else sup.get(self._wid)
        if w is None:
            self._error(404, f"no worker {self._wid} on this node")
            return
        lines = parse_qs(query).get("lines", ["20"])[0]
        n = int(lines) if lines.isdigit() else 20
        self._json(200, {"ok": True, "worker": w.status(lines=min(n, 200))})

    # -- open endpoints

    def _ping(self, query: str) -> None:
        self._json(200, {"ok": True, "name": self.server.agent.name, "version": __version__})

    def _profile(self, query: str) -> None:
        agent = self.server.agent
        self._json(200, {"profile": agent.profile.to_dict(), "summary": agent.summary()})

    def _download(self, query: str) -> None:
        """Stream N bytes from one preallocated buffer: the peer times how fast they arrive."""
        try:
            values = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query)).get("bytes", [])
        except ValueError:
            values = ["?"]
        if len(values) != 1 or not values[0].isdigit():
            self._error(400, f"bytes must be one whole number 0..{MAX_TRANSFER}, as in {BANDWIDTH}?bytes=8388608")
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
        n = self._length(MAX_TRANSFER, 413, "the body")
        if n is None:
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
