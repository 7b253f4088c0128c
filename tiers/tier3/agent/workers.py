"""The agent's workers: engine processes started for an authenticated head, watched, restarted, stopped.

    POST /v1/workers {"engine", "args", "restart"}
      -> Supervisor.launch: known engine? args a JSON object? -> the engine's worker_command(args) -> argv
      -> Worker.spawn: Popen(argv) in its own session, no shell; its output kept (last 200 lines)
      -> when it dies: restarted (after a back-off if it died young), until DELETE stops it

Only engines listed in tiers/tier3/engines.py, with arguments each engine
checks into an argv: the agent never runs a free-form command.
"""
from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inventory.protocol import TOKEN_ENV
from tiers.tier3 import net
from tiers.tier3.agent.errors import LaunchError
from tiers.tier3.engine import EngineError
from tiers.tier3.engines import ENGINES

REPO = Path(__file__).resolve().parents[3]
MAX_WORKERS = 8


def worker_argv(engine: str, args: Any) -> list[str]:
    """Ask the engine's module for the worker argv; every refusal is a LaunchError (one line)."""
    if engine not in ENGINES:
        raise LaunchError(f"unknown engine {engine!r}: this agent launches {', '.join(ENGINES)}")
    if not isinstance(args, dict):
        raise LaunchError("args must be a JSON object")
    try:
        mod = ENGINES[engine].load()
    except ImportError as exc:
        raise LaunchError(f"the {engine} engine is not available on this node ({exc}): update tierkit here") from None
    try:
        argv = mod.worker_command(dict(args))
    except EngineError as exc:
        raise LaunchError(f"{engine}: {exc}") from None
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise LaunchError(f"the {engine} engine returned no command to run")
    return argv


class Worker:
    """One supervised worker process: restarted when it dies, until stopped."""

    def __init__(self, wid: str, engine: str, args: dict[str, Any], argv: list[str], restart: bool,
                 log: Callable[[str], None]) -> None:
        self.id, self.engine, self.args, self.argv, self.restart = wid, engine, args, argv, restart
        self.listens = ENGINES[engine].listens
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
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop(TOKEN_ENV, None)  # workers have no business with the agent's secret
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
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
        if alive and not self.ready and self.listens:
            # Ready = the port accepts; probed only until it first does (a connection to an RPC
            # server waits in its accept queue, so do not keep knocking).
            self.ready = net.refused(self.args["host"], self.args["port"], timeout=0.5) is None
        state = "stopped" if self.stopped else ("running" if alive else ("restarting" if self.restart else "exited"))
        return {"id": self.id, "engine": self.engine, "args": self.args, "state": state,
                "pid": proc.pid if alive else None, "starts": self.starts, "restarts": max(self.starts - 1, 0),
                "ready": (self.ready and alive) if self.listens else None,
                "exit_code": self.exit_code, "argv": self.argv, "log": list(self.lines)[-lines:] if lines else []}

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self.stopped = True
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue


def _request(body: Any) -> tuple[str, dict[str, Any], bool]:
    """(engine, args, restart) of a launch request's body; LaunchError naming what is wrong."""
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
    return engine, dict(args), restart


class Supervisor:
    """The agent's workers: launch (validated), look up, stop. `host` is where the agent is bound."""

    def __init__(self, host: str, log: Callable[[str], None]) -> None:
        self.host, self.log = host, log
        self.workers: dict[str, Worker] = {}
        self._lock = threading.Lock()

    def _bind_where_asked(self, engine: str, args: dict[str, Any]) -> None:
        """A worker serving an unauthenticated protocol listens where the agent is bound, unless told a more
        specific address; port 0 (or none) gets a free one."""
        if engine not in ENGINES or not ENGINES[engine].listens:
            return
        args.setdefault("host", "127.0.0.1" if self.host == "0.0.0.0" else self.host)
        if args.get("port") in (None, 0):
            try:
                args["port"] = net.free_port(str(args["host"]))
            except OSError as exc:
                raise LaunchError(f"{engine}: cannot bind {args['host']!r} on this node "
                                  f"({exc.strerror or exc}): pass one of its addresses") from None

    def launch(self, body: Any) -> Worker:
        engine, args, restart = _request(body)
        self._bind_where_asked(engine, args)
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
            w = Worker(wid, engine, args, argv, restart, self.log)
            w.spawn()
            self.workers[wid] = w
        self.log(f"launched worker {wid}: {engine} {json.dumps(args, sort_keys=True)}")
        return w

    def list(self) -> list[Worker]:
        with self._lock:
            return list(self.workers.values())

    def get(self, wid: str) -> Worker | None:
        with self._lock:
            return self.workers.get(wid)

    def stop(self, wid: str) -> Worker | None:
        w = self.get(wid)
        if w is not None:
            w.stop()
            self.log(f"stopped worker {wid}")
        return w

    def stop_all(self) -> None:
        for w in self.list():
            w.stop()
