"""One agent: bound at once (a busy port fails before anything else), then serving until stopped.

    Agent(host, port, profile, name, token=..., memory_budget=...)   checks, binds the port
      .start()   HTTP in a background thread (routes.py), mDNS alongside (mdns.py)
      .stop()    goodbyes on mDNS, workers stopped (workers.py), connections closed

    serve(...)   what `tierkit agent` runs: the token (secret.py), then an Agent until SIGTERM or Ctrl-C
"""
from __future__ import annotations

import errno
import ipaddress
import re
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from inventory.profile import Profile
from tiers.tier3.agent.errors import AgentError, PortInUse
from tiers.tier3.agent.mdns import Advertiser
from tiers.tier3.agent.routes import Server
from tiers.tier3.agent.secret import load_or_create_token, save_token, token_path
from tiers.tier3.agent.summary import summarize
from tiers.tier3.agent.workers import Supervisor

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


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


def _safe_default(profile_name: str | None) -> str | None:
    """A profile's name used as the agent's, when it is already a valid label; else None (the host name)."""
    return profile_name if profile_name and _NAME_RE.match(profile_name) else None


def _bind(host: str, port: int, agent: Agent) -> Server:
    if not 0 <= port <= 65535:
        raise AgentError(f"--port {port}: must be 1-65535")
    try:
        return Server((host, port), agent)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} on {host} is in use: pass --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise AgentError(f"{host} is not an address of this machine: pass --host with one of its "
                             "addresses, or 0.0.0.0") from None
        if exc.errno == errno.EACCES:
            raise AgentError(f"port {port} on {host} needs privileges: pass --port above 1023") from None
        raise AgentError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def log(line: str) -> None:
    """The agent's voice on stderr: every line it says starts with "tierkit agent:"."""
    print(f"tierkit agent: {line}", file=sys.stderr, flush=True)


class Agent:
    """One agent: bound on construction (so a busy port fails at once), serving after start()."""

    def __init__(self, host: str, port: int, profile: Profile, name: str | None = None, *,
                 verbose: bool = False, advertise: bool = True, token: str | None = None,
                 memory_budget: int | None = None, say: Callable[[str], None] | None = None) -> None:
        self.say = say or log   # where its lines go: stderr, or the log of the run that started it
        self.host = _check_host(host)
        self.name = _check_name(name if name is not None else _safe_default(profile.name))
        self.profile = profile
        self.verbose = verbose
        # No token given: a random one nobody knows, so launching stays closed rather than open.
        self.token = token or secrets.token_urlsafe(32)
        if memory_budget is not None and memory_budget <= 0:
            raise AgentError(f"--memory-budget must be positive, got {memory_budget}")
        self.memory_budget = memory_budget
        self.supervisor = Supervisor(self.host, self.log)
        self._server = _bind(self.host, port, self)
        self.port: int = self._server.server_address[1]
        self.advertiser: Advertiser | None = Advertiser(self) if advertise else None
        self._thread: threading.Thread | None = None

    def log(self, line: str) -> None:
        self.say(line)

    def summary(self) -> dict[str, Any]:
        """What GET /v1/profile and the mDNS TXT record say about this node."""
        return summarize(self.profile, self.name, self.memory_budget)

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


def start_in_thread(host: str = "127.0.0.1", port: int = 0, profile: Profile | None = None,
                    name: str | None = None, *, verbose: bool = False, advertise: bool = True,
                    token: str | None = None, memory_budget: int | None = None,
                    say: Callable[[str], None] | None = None) -> Agent:
    """An agent serving in background threads (for tests, notebooks and B17); call .stop() when done.

    Port 0 picks a free port; read it from `.port`.
    """
    return Agent(host, port, profile or Profile(name=name), name, verbose=verbose, advertise=advertise,
                 token=token, memory_budget=memory_budget, say=say).start()


def serve(host: str, port: int, profile: Profile, name: str | None = None,
          stop: threading.Event | None = None, *, verbose: bool = False, advertise: bool = True,
          token_file: Path | None = None, memory_budget: int | None = None) -> None:
    """Run the agent until `stop` is set, SIGTERM arrives, or Ctrl-C; then unregister and close.

    Raises AgentError (one line) when it cannot start, e.g. PortInUse.
    """
    stop = stop or threading.Event()
    # A new token is written and shown only once the agent holds its port: an agent that cannot start
    # leaves no token behind that nobody was shown.
    token, created = load_or_create_token(token_file, save=False)
    agent = Agent(host, port, profile, name, verbose=verbose, advertise=advertise, token=token,
                  memory_budget=memory_budget)
    if created:
        where = Path(token_file) if token_file else token_path()
        save_token(where, token)
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
