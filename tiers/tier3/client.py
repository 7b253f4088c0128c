"""The head's side of an agent: the one client that `tierkit serve`, the engines and B17 use.

    AgentClient(host, port, token, name)
      .launch(engine, args) -> worker      POST   /v1/workers        (Bearer token)
      .status(wid) / .wait_ready(wid)      GET    /v1/workers/ID
      .stop(wid)                           DELETE /v1/workers/ID     (a node already gone is fine)
      .rtt_ms()                            GET    /v1/ping, timed over one keep-alive connection

    Workers(token, log)                    the workers one session launched through its peers' agents,
                                           so that each is stopped at the end, however the session ends

Stdlib http.client, one connection per call. Every refusal is an
AgentClientError whose str() is one line naming the agent and the fix.
"""
from __future__ import annotations

import http.client
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inventory.protocol import PING, TOKEN_ENV, WORKERS
from tiers.tier3.agent.errors import AgentError
from tiers.tier3.agent.secret import read_token_file, token_path
from tiers.tier3.placement import Node


class AgentClientError(Exception):
    """An agent cannot be reached or refused a request; str() is one line naming which and what to do."""


def read_token(token_file: Path | None) -> str | None:
    """$TIERKIT_AGENT_TOKEN, else --token-file, else the default token file if there is one."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    path = Path(token_file) if token_file else token_path()
    if token_file is None and not path.exists():
        return None
    try:
        return read_token_file(path)
    except AgentError as exc:
        raise AgentClientError(str(exc)) from None


class AgentClient:
    """One agent's HTTP API, as the head uses it."""

    def __init__(self, host: str, port: int, token: str | None, timeout: float = 10.0, name: str | None = None):
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.name = name or f"{host}:{port}"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            raw = r.read()
        except OSError as exc:
            raise AgentClientError(f"agent {self.name} unreachable ({exc.strerror or exc}): is `tierkit agent` "
                                   "running there?") from None
        finally:
            conn.close()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            raise AgentClientError(f"{self.name} answered {r.status} with something that is not JSON: is it a "
                                   "tierkit agent?") from None

    def _check(self, status: int, reply: dict[str, Any], what: str) -> dict[str, Any]:
        if status == 401:
            raise AgentClientError(f"agent {self.name} refused the token ({what}): pass --token-file with that "
                                   f"agent's token file, or set ${TOKEN_ENV}")
        if status >= 300:
            raise AgentClientError(f"agent {self.name} refused to {what}: {reply.get('error', status)}")
        return reply

    def launch(self, engine: str, args: dict[str, Any], restart: bool = True) -> dict[str, Any]:
        status, reply = self.request("POST", WORKERS, {"engine": engine, "args": args, "restart": restart})
        return self._check(status, reply, f"launch a {engine} worker")["worker"]

    def status(self, wid: str, lines: int = 20) -> dict[str, Any]:
        status, reply = self.request("GET", f"{WORKERS}/{wid}?lines={lines}")
        return self._check(status, reply, "report on a worker")["worker"]

    def stop(self, wid: str) -> None:
        try:
            self.request("DELETE", f"{WORKERS}/{wid}")
        except AgentClientError:
            pass  # the node is gone: nothing left to stop

    def wait_ready(self, wid: str, timeout: float = 30.0) -> dict[str, Any]:
        """Until a listening worker's port accepts; AgentClientError with its last log lines if it dies first."""
        deadline = time.monotonic() + timeout
        while True:
            w = self.status(wid)
            if w.get("ready"):
                return w
            if w["state"] in ("exited", "stopped") or (w["starts"] > 1 and time.monotonic() > deadline):
                tail = " | ".join(w.get("log", [])[-3:])
                raise AgentClientError(f"the {w['engine']} worker on {self.name} did not start: {tail}")
            if time.monotonic() > deadline:
                raise AgentClientError(f"the {w['engine']} worker on {self.name} was not ready within {timeout:g} s")
            time.sleep(0.1)

    def rtt_ms(self, pings: int = 7) -> float | None:
        """Median round trip of GET /v1/ping over one keep-alive connection; None when the agent does not answer."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        times = []
        try:
            for _ in range(pings):
                t0 = time.perf_counter()
                conn.request("GET", PING)
                conn.getresponse().read()
                times.append(time.perf_counter() - t0)
        except OSError:
            return None
        finally:
            conn.close()
        return 1e3 * statistics.median(times)


class Workers:
    """The workers a session started through its peers' agents; stop_all() stops every one of them.

    `log` is where an engine's launch says what it started."""

    def __init__(self, token: str | None, log: Callable[[str], None] = lambda line: None) -> None:
        self.token, self.log = token, log
        self.started: list[tuple[AgentClient, str]] = []

    def client(self, node: Node) -> AgentClient:
        return AgentClient(node.host, node.port, self.token, name=node.name)

    def launch(self, node: Node, engine: str, args: dict[str, Any]) -> tuple[AgentClient, dict[str, Any]]:
        """Start one worker on `node` through its agent; remembered for stop_all()."""
        client = self.client(node)
        w = client.launch(engine, args)
        self.started.append((client, w["id"]))
        return client, w

    def stop_all(self) -> None:
        for client, wid in self.started:
            client.stop(wid)
