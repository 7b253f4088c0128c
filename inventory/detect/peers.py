"""Peers: the other machines running `tierkit agent`, and the link to each.

Agents are found over mDNS (`_tierkit._tcp.local.`) or given by hand as
HOST:PORT; the service type and routes are inventory/protocol.py's. For each
one we measure what tier 3 placement needs: the round-trip time (median of a
few tiny requests over one keep-alive connection) and the download bandwidth
(a timed transfer), and we keep the summary its agent reports.

Discovery has to be fast (the whole `tierkit probe --no-bench` should take well
under half a second), so instead of a zeroconf ServiceBrowser we send our own
one-shot query (RFC 6762 section 5.1) from an ephemeral UDP port:

- responders answer a query from a port other than 5353 at once, by unicast
  straight to that port; a browser's ordinary (QM) question is answered after a
  20-120 ms aggregation delay, and zeroconf's browser waits 20-120 ms before its
  first question too;
- a reply to our own port cannot be taken by another mDNS stack on this machine
  (avahi also listens on 5353, where a unicast reply reaches only one socket);
- the DNS messages involved are small enough to build and read with the stdlib,
  which saves the ~70 ms of importing zeroconf on the probe's fast path.

Nothing here raises for network trouble: a peer that cannot be reached is a
Peer with a `problem` that says what to check.
"""
from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inventory.detect import MDNS_WAIT, Found, Unavailable
from inventory.protocol import BANDWIDTH, DEFAULT_PORT, PING, PROFILE, SERVICE_TYPE

if TYPE_CHECKING:  # imported where used: `start()` must be cheap to import and call
    import http.client

    from inventory.profile import Figure, Peer

PINGS = 5

_MDNS_GROUP = ("224.0.0.251", 5353)
_A, _PTR, _SRV = 1, 12, 33
_CLASS_IN = 1
_QU = 0x8000  # "unicast response, please"
_SERVICE_KEY = tuple(SERVICE_TYPE.lower().rstrip(".").split("."))


# ---------------------------------------------------------------- manual peers

def parse_spec(spec: str) -> tuple[str, int]:
    """HOST:PORT (or HOST, meaning the agent's default port; [IPv6]:PORT) -> (host, port).

    Raises ValueError with a one-line reason, so a typo is reported, not dialled.
    """
    s = spec.strip()
    if not s:
        raise ValueError("empty peer: give HOST:PORT, e.g. 192.168.1.20:8477")
    if "://" in s or "/" in s:
        raise ValueError(f"{spec!r} looks like a URL: give HOST:PORT, e.g. 192.168.1.20:8477")
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{spec!r}: write IPv6 peers as [ADDRESS]:PORT")
        port_text = rest[1:] if rest else str(DEFAULT_PORT)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{spec!r}: {host!r} is not an IPv6 address") from None
    elif s.count(":") > 1:
        raise ValueError(f"{spec!r}: write IPv6 peers as [ADDRESS]:PORT")
    else:
        host, _, port_text = s.partition(":") if ":" in s else (s, "", str(DEFAULT_PORT))
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{spec!r}: the host is missing or has spaces; give HOST:PORT")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{spec!r}: the port must be a number 1-65535, as in HOST:PORT")
    return host, int(port_text)


# ---------------------------------------------------------------- measuring one agent

class _NotAgent(Exception):
    """Something answers, but not as a tierkit agent."""


def _problem(exc: BaseException, host: str, port: int, timeout: float) -> str:
    """One line: what went wrong talking to a peer, and what to check."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host!r}: check the name, or give the peer's IP address"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing listens on {where} (connection refused): start `tierkit agent` there, or check the port"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return (f"no answer from {where} within {timeout:g} s: check the address, that `tierkit agent` runs "
                f"there, and that its firewall lets TCP port {port} in")
    if isinstance(exc, _NotAgent):
        return f"{where} answers, but not as a tierkit agent ({exc}): check the port"
    import http.client

    if isinstance(exc, (http.client.HTTPException, ValueError)):
        return f"{where} answers, but not as a tierkit agent ({type(exc).__name__}): check the port"
    if isinstance(exc, OSError):
        return f"cannot reach {where} ({exc.strerror or exc}): check the address and the network"
    return f"{where}: {type(exc).__name__}: {exc}"


class _Link:
    """One keep-alive HTTP connection whose every step respects one deadline."""

    def __init__(self, host: str, port: int, deadline: float) -> None:
        import http.client  # here, not at the top: 15 ms that the mDNS query should not wait for

        self.deadline = deadline
        self.conn = http.client.HTTPConnection(host, port, timeout=self._left())
        self.sock: socket.socket | None = None  # kept: http.client drops conn.sock on "Connection: close"

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def get(self, path: str) -> "http.client.HTTPResponse":
        left = self._left()
        self.conn.timeout = left
        if self.conn.sock is not None:
            self.conn.sock.settimeout(left)
        self.conn.request("GET", path)
        self.sock = self.conn.sock
        return self.conn.getresponse()

    def get_json(self, path: str) -> dict[str, Any]:
        resp = self.get(path)
        body = resp.read()
        if resp.status != 200:
            raise _NotAgent(f"GET {path} gave HTTP {resp.status}")
        try:
            data = json.loads(body)
        except ValueError:
            raise _NotAgent(f"GET {path} did not return JSON") from None
        if not isinstance(data, dict):
            raise _NotAgent(f"GET {path} did not return a JSON object")
        return data

    def close(self) -> None:
        self.conn.close()


def _rtt(link: _Link) -> tuple[dict[str, Any], Figure]:
    """Median of PINGS round trips; a first, untimed ping opens the connection."""
    from inventory.profile import Figure

    hello = link.get_json(PING)
    if hello.get("ok") is not True:
        raise _NotAgent(f"GET {PING} did not say ok")
    times = []
    for _ in range(PINGS):
        t0 = time.perf_counter()
        link.get_json(PING)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return hello, Figure(value=round(ms, 4), unit="ms", source="measured",
                         method=f"median of {PINGS} GET {PING} round trips over one keep-alive HTTP connection")


def _bandwidth(link: _Link, nbytes: int) -> Figure | None:
    """Download nbytes and time them from the response headers to the last byte.

    A slow link that cannot finish before the deadline still gets a figure,
    from the bytes that did arrive, and the method says so.
    """
    from inventory.profile import Figure

    resp = link.get(f"{BANDWIDTH}?bytes={nbytes}")
    if resp.status != 200:
        resp.read()
        raise _NotAgent(f"GET {BANDWIDTH} gave HTTP {resp.status}")
    buf = memoryview(bytearray(1 << 18))
    got = 0
    t0 = time.perf_counter()
    try:
        while got < nbytes:
            assert link.sock is not None
            link.sock.settimeout(max(1e-3, link.deadline - time.monotonic()))
            k = resp.readinto(buf)
            if not k:
                break
            got += k
    except TimeoutError:
        pass
    seconds = time.perf_counter() - t0
    if got < min(nbytes, 64 << 10) or seconds <= 0:
        return None
    how = f"download of {nbytes} bytes (GET {BANDWIDTH}, peer to this host), timed from headers to last byte"
    if got < nbytes:
        how = (f"partial download: {got} of {nbytes} bytes arrived before the timeout "
               f"(GET {BANDWIDTH}, peer to this host)")
    return Figure(value=round(got * 8 / seconds / 1e6, 2), unit="Mbit/s", source="measured", method=how)


def measure(host: str, port: int, found_by: str, *, name: str | None = None,
            addresses: Iterable[str] = (), measure_bytes: int = 8 << 20, timeout: float = 5.0) -> Peer:
    """Talk to one agent: RTT, its summary, bandwidth. Never raises; trouble goes in `problem`.

    `addresses` are alternatives to try in order when the first does not answer
    (an agent on 0.0.0.0 advertises every address it has).
    """
    from inventory.profile import Peer

    deadline = time.monotonic() + timeout
    candidates = [host, *[a for a in addresses if a != host]]
    problem = None
    for address in candidates:
        link = None
        try:
            link = _Link(address, port, deadline)
            hello, rtt = _rtt(link)
        except Exception as exc:
            problem = problem or _problem(exc, address, port, timeout)
            if link:
                link.close()
            continue
        peer = Peer(name=name, address=address, port=port, found_by=found_by, rtt_ms=rtt)
        try:
            _describe(peer, link, hello, measure_bytes)
        except Exception as exc:  # RTT worked: keep it, say what failed after
            peer.problem = _problem(exc, address, port, timeout)
        finally:
            link.close()
        return peer
    return Peer(name=name, address=host, port=port, found_by=found_by, problem=problem)


def _describe(peer: Peer, link: _Link, hello: dict[str, Any], measure_bytes: int) -> None:
    summary = link.get_json(PROFILE).get("summary")
    if isinstance(summary, dict):
        peer.summary = summary
    peer.name = str(peer.summary.get("name") or hello.get("name") or peer.name or "") or None
    if measure_bytes > 0:
        peer.bandwidth_mbps = _bandwidth(link, measure_bytes)


# ---------------------------------------------------------------- mDNS, by hand

def _encode_name(name: str | tuple[str, ...]) -> bytes:
    """A DNS name on the wire; a tuple keeps labels that contain dots (instance names may) whole."""
    labels = name if isinstance(name, tuple) else tuple(name.rstrip(".").split("."))
    out = b""
    for label in labels:
        raw = label.encode()
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def _query(questions: list[tuple[str | tuple[str, ...], int]]) -> bytes:
    """A one-shot mDNS query; the QU bit asks for a unicast answer."""
    qid = int.from_bytes(os.urandom(2), "big")
    msg = struct.pack("!HHHHHH", qid, 0, len(questions), 0, 0, 0)
    for name, qtype in questions:
        msg += _encode_name(name) + struct.pack("!HH", qtype, _CLASS_IN | _QU)
    return msg


def _read_name(data: bytes, off: int) -> tuple[tuple[str, ...], int]:
    """Labels of a (possibly compressed) name, and the offset just past it."""
    labels: list[str] = []
    end = None
    for _ in range(128):  # bounds pointer loops in hostile packets
        n = data[off]
        if n == 0:
            return tuple(labels), (end if end is not None else off + 1)
        if n & 0xC0 == 0xC0:
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | data[off + 1]
            continue
        if n & 0xC0:
            raise ValueError("bad label")
        if off + 1 + n > len(data):
            raise ValueError("truncated label")
        labels.append(data[off + 1: off + 1 + n].decode("utf-8", "replace"))
        off += 1 + n
    raise ValueError("name too long")


def _records(data: bytes) -> list[tuple[tuple[str, ...], int, Any]]:
    """(name labels, type, value) for the A, PTR, SRV and TXT records of a response."""
    _id, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    if not flags & 0x8000:  # a query from someone else, not an answer
        return []
    off = 12
    for _ in range(qd):
        off = _read_name(data, off)[1] + 4
    out = []
    for _ in range(an + ns + ar):
        name, off = _read_name(data, off)
        rtype, _cls, ttl, rdlen = struct.unpack_from("!HHIH", data, off)
        off += 10
        rdata = off
        off += rdlen
        if off > len(data):
            raise ValueError("truncated record")
        if ttl == 0:  # a goodbye: that record is going away
            continue
        if rtype == _PTR:
            out.append((name, rtype, _read_name(data, rdata)[0]))
        elif rtype == _SRV:
            port = struct.unpack_from("!H", data, rdata + 4)[0]
            out.append((name, rtype, (port, _read_name(data, rdata + 6)[0])))
        elif rtype == _A and rdlen == 4:
            out.append((name, rtype, socket.inet_ntoa(data[rdata: rdata + 4])))
    return out


def _key(labels: Iterable[str]) -> tuple[str, ...]:
    return tuple(label.lower() for label in labels)


@dataclass
class _Seen:
    """What the answers so far say about each advertised agent."""

    instances: dict[tuple[str, ...], str] = field(default_factory=dict)  # key -> instance label
    srv: dict[tuple[str, ...], tuple[int, tuple[str, ...]]] = field(default_factory=dict)
    addresses: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    reply_from: dict[tuple[str, ...], str] = field(default_factory=dict)
    started: set[tuple[str, ...]] = field(default_factory=set)
    asked: set[tuple[str, ...]] = field(default_factory=set)

    def add(self, data: bytes, source: str) -> None:
        for name, rtype, value in _records(data):
            key = _key(name)
            if rtype == _PTR and key == _SERVICE_KEY and len(value) == len(_SERVICE_KEY) + 1 \
                    and _key(value[1:]) == _SERVICE_KEY:
                self.instances.setdefault(_key(value), value[0])
                self.reply_from.setdefault(_key(value), source)
            elif rtype == _SRV:
                self.srv[key] = value[0], _key(value[1])
            elif rtype == _A:
                known = self.addresses.setdefault(key, [])
                if value not in known:
                    known.append(value)

    def resolved(self) -> list[tuple[str, list[str], int]]:
        """Agents newly complete (name, addresses, port); the address that replied goes first."""
        ready = []
        for key, label in self.instances.items():
            if key in self.started or key not in self.srv:
                continue
            port, target = self.srv[key]
            addrs = self.addresses.get(target)
            if not addrs:
                continue
            self.started.add(key)
            src = self.reply_from.get(key)
            ready.append((label, sorted(addrs, key=lambda a: a != src), port))
        return ready

    def follow_ups(self) -> list[tuple[tuple[str, ...], int]]:
        """Questions for what a reply left out (SRV of an instance, A of a host), each asked once."""
        questions = []
        for key in self.instances:
            if key in self.started:
                continue
            want = (key, _SRV) if key not in self.srv else (self.srv[key][1], _A)
            if want[0] in self.asked or (want[1] == _A and self.addresses.get(want[0])):
                continue
            self.asked.add(want[0])
            questions.append(want)
        return questions

    def unresolved(self) -> list[str]:
        return [label for key, label in self.instances.items() if key not in self.started]


def _interfaces() -> list[str]:
    """IPv4 addresses of the interfaces that are up, loopback included (agents on this host)."""
    if hasattr(socket, "if_nameindex"):
        try:
            return _interfaces_ioctl()
        except OSError:
            pass
    import psutil  # portable, but 20 ms to import: the fallback, off Linux

    stats = psutil.net_if_stats()
    found = []
    for nic, addrs in psutil.net_if_addrs().items():
        if nic in stats and not stats[nic].isup:
            continue
        found += [a.address for a in addrs if a.family == socket.AF_INET and a.address not in found]
    return found


def _interfaces_ioctl() -> list[str]:
    """Linux: SIOCGIFFLAGS / SIOCGIFADDR per interface, stdlib only (microseconds)."""
    import fcntl

    siocgifflags, siocgifaddr, iff_up = 0x8913, 0x8915, 0x1
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, nic in socket.if_nameindex():
            req = struct.pack("256s", nic.encode()[:15])
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(s.fileno(), siocgifflags, req), 16)[0]
                if not flags & iff_up:
                    continue
                address = socket.inet_ntoa(fcntl.ioctl(s.fileno(), siocgifaddr, req)[20:24])
            except OSError:  # no IPv4 address on this interface
                continue
            if address not in found:
                found.append(address)
    return found


def _send(sock: socket.socket, packet: bytes, interfaces: list[str]) -> int:
    """Multicast the packet out of every interface; how many took it."""
    sent = 0
    for address in interfaces:
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
            sock.sendto(packet, _MDNS_GROUP)
            sent += 1
        except OSError:
            continue
    return sent


def browse(wait: float, on_found: Callable[[str, list[str], int], None]) -> tuple[list[str], str | None]:
    """Ask for `_tierkit._tcp.local.` agents for `wait` seconds; call on_found as each resolves.

    The query is repeated at 0.25, 0.75, 1.75 s... within the window, so an
    agent that is still registering (its name probe takes ~1.7 s) is not missed.
    Returns the instances found but not resolved in time, and a note when
    mDNS could not be used at all.
    """
    interfaces = _interfaces()
    if not interfaces:
        return [], "no IPv4 interface is up to ask over mDNS"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("0.0.0.0", 0))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        ptr_query = _query([(SERVICE_TYPE, _PTR)])
        start = time.monotonic()
        end = start + wait
        if not _send(sock, ptr_query, interfaces):
            return [], f"could not send an mDNS query on any interface ({', '.join(interfaces)})"
        seen = _Seen()
        gap, next_query = 0.25, start + 0.25
        while (now := time.monotonic()) < end:
            if now >= next_query:
                _send(sock, ptr_query, interfaces)
                gap *= 2
                next_query = now + gap
            ready, _, _ = select.select([sock], [], [], min(end, next_query) - now)
            if not ready:
                continue
            try:
                data, (source, _port) = sock.recvfrom(9000)
                seen.add(data, source)
            except (OSError, ValueError, IndexError, struct.error):
                continue  # a malformed or foreign packet: ignore it
            for label, addrs, port in seen.resolved():
                on_found(label, addrs, port)
            questions = seen.follow_ups()
            if questions:
                _send(sock, _query(questions), interfaces)
        return seen.unresolved(), None
    except OSError as exc:
        return [], f"mDNS query failed ({exc.strerror or exc})"
    finally:
        sock.close()


# ---------------------------------------------------------------- the detector

class _Job:
    """One peer measured in a daemon thread, so a hung DNS lookup cannot hold up the probe."""

    def __init__(self, key: tuple[str, int], fallback: Peer, work: Callable[[], Peer], timeout: float) -> None:
        self.key = key
        self.fallback = fallback
        self.result: Peer | None = None
        self.give_up = time.monotonic() + timeout + 0.5
        self.thread = threading.Thread(target=self._run, args=(work,), name=f"tierkit-peer-{key[0]}", daemon=True)
        self.thread.start()

    def _run(self, work: Callable[[], Peer]) -> None:
        try:
            self.result = work()
        except Exception as exc:  # measure() should not raise; belt and braces
            self.fallback.problem = f"{type(exc).__name__}: {exc}"

    def peer(self) -> Peer:
        self.thread.join(max(0.0, self.give_up - time.monotonic()))
        return self.result or self.fallback


def detect(manual: Iterable[str] = (), mdns_wait: float = MDNS_WAIT, measure_bytes: int = 8 << 20,
           timeout: float = 5.0) -> Found:
    """Find agents (mDNS for `mdns_wait` seconds, plus `manual` HOST:PORT specs) and measure each.

    Peers are measured concurrently, each within `timeout` seconds, starting as
    soon as each is known (manual ones at once, mDNS ones as they answer).
    `mdns_wait <= 0` turns discovery off. Returns Found(list[Peer], note).
    """
    if isinstance(manual, str):  # one spec passed bare: not a list of one-letter hosts
        manual = [manual]
    notes: list[str] = []
    jobs: dict[tuple[str, int], _Job] = {}
    lock = threading.Lock()

    def start(host: str, port: int, found_by: str, name: str | None = None, addresses: Iterable[str] = ()) -> None:
        from inventory.profile import Peer  # not before the mDNS query is out: it costs ~100 ms

        with lock:
            if (host, port) in jobs:
                return
            fallback = Peer(name=name, address=host, port=port, found_by=found_by,
                            problem=f"no answer from {host}:{port} within {timeout:g} s")
            jobs[(host, port)] = _Job((host, port), fallback,
                                      lambda: measure(host, port, found_by, name=name, addresses=addresses,
                                                      measure_bytes=measure_bytes, timeout=timeout), timeout)

    for spec in manual:
        try:
            host, port = parse_spec(spec)
        except ValueError as exc:
            notes.append(f"ignored peer {exc}")
            continue
        start(host, port, "manual")
    n_manual = len(jobs)
    heard: list[str] = []

    def found(label: str, addrs: list[str], port: int) -> None:
        heard.append(label)
        start(addrs[0], port, "mdns", label, addrs)

    if mdns_wait > 0:
        try:
            unresolved, trouble = browse(mdns_wait, found)
        except Exception as exc:  # e.g. psutil cannot list interfaces here
            unresolved, trouble = [], f"mDNS unavailable ({type(exc).__name__}: {exc})"
        if trouble and not jobs and not notes:
            raise Unavailable(f"{trouble}; pass peers by hand with --peer HOST:PORT")
        if trouble:
            notes.append(f"{trouble}; pass peers by hand with --peer HOST:PORT")
        if unresolved:
            notes.append(f"heard of {', '.join(unresolved)} over mDNS but got no address in time; "
                         "raise --mdns-wait")
        n_mdns = len(heard)
        if not n_mdns and not trouble:
            notes.insert(0, f"no tierkit agent answered over mDNS within {mdns_wait:g} s: start `tierkit agent` "
                            "on the other machines (same network), or pass --peer HOST:PORT")
        else:
            notes.insert(0, f"{n_mdns} agent(s) found over mDNS in {mdns_wait:g} s")

    else:
        notes.insert(0, "mDNS discovery off")
    peers = [job.peer() for job in jobs.values()]
    if n_manual:
        notes.append(f"{n_manual} given by hand")
    troubled = sum(1 for p in peers if p.problem)
    if troubled:
        notes.append(f"{troubled} with a problem (see each peer)")
    return Found(peers, "; ".join(notes) or None)


def start(manual: Iterable[str] = (), mdns_wait: float = MDNS_WAIT, measure_bytes: int = 8 << 20,
          timeout: float = 5.0) -> Callable[[], Found]:
    """Begin `detect` in a daemon thread now; the returned function waits for its answer.

    `tierkit probe` calls this before it imports anything heavy, so the mDNS
    window runs while the rest of the program loads instead of after it.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["found"] = detect(manual, mdns_wait, measure_bytes, timeout)
        except BaseException as exc:  # handed to whoever asks for the result
            box["error"] = exc

    thread = threading.Thread(target=work, name="tierkit-peers", daemon=True)
    thread.start()

    def result() -> Found:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["found"]

    return result
