"""This machine on the network, as tier 3 needs it: its addresses, a free port, whether a port answers.

    ipv4_addresses()      every IPv4 address of an interface that is up (what an agent advertises)
    route_to(peer)        the address a peer reaches us at (what the head tells its workers)
    free_port(host)       a port nobody listens on yet (a worker's, the head's rendezvous)
    refused(host, port)   None when something accepts TCP there, else one line saying what happened
"""
from __future__ import annotations

import socket


def ipv4_addresses(up_only: bool = True) -> list[str]:
    """IPv4 addresses of this machine's interfaces (loopback included), through psutil; [] without it."""
    found: list[str] = []
    try:
        import psutil

        stats = psutil.net_if_stats()
        for nic, addrs in psutil.net_if_addrs().items():
            if up_only and nic in stats and not stats[nic].isup:
                continue
            found += [a.address for a in addrs if a.family == socket.AF_INET and a.address not in found]
    except Exception:  # psutil missing or unsupported here
        return []
    return found


def route_to(host: str) -> str:
    """This machine's address on the route to `host`; loopback when there is no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the OS's pick); OSError when `host` is not an address of this machine."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def refused(host: str, port: int, timeout: float = 2.0) -> str | None:
    """None if something accepts TCP on host:port, else one line saying what happened."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except ConnectionRefusedError:
        return f"nothing listens on {host}:{port}"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g} s"
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc.strerror or exc})"
