"""The agent on mDNS: `<name>._tierkit._tcp.local.` with its port, addresses and a TXT glance at the node.

    Advertiser(agent).start()   registers in a background thread (zeroconf probes for name
                                conflicts and announces three times: ~1.7 s)
    .stop()                     sends goodbyes, so peers forget the node at once

zeroconf is imported only when advertising starts. Discovery, the other side,
is inventory/detect/peers.py, which needs no zeroconf at all.
"""
from __future__ import annotations

import socket
import threading
from typing import Any

from inventory.protocol import SERVICE_TYPE
from tiers.tier3 import net
from tiers.tier3.agent.summary import txt_properties

# Stopping waits at most this long for a registration still under way.
_REGISTER_GRACE = 3.0


def advertised_addresses(host: str) -> list[str]:
    """The IPv4 addresses peers should use: the bound one, or every non-loopback one for 0.0.0.0."""
    if host != "0.0.0.0":
        return [host]
    found = [a for a in net.ipv4_addresses() if not a.startswith("127.")]
    if not found:  # no psutil: what the host name resolves to
        try:
            found = [a for a in socket.gethostbyname_ex(socket.gethostname())[2] if not a.startswith("127.")]
        except OSError:
            found = []
    return found or ["127.0.0.1"]  # a lone machine: at least same-host peers find it


class Advertiser:
    """Registers the agent over mDNS in a background thread and unregisters on stop.

    `agent` gives its name, host, port, summary() and log.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent
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

            addresses = advertised_addresses(agent.host)
            # A specific address: answer only on that interface (the one peers can reach).
            self._zc = Zeroconf(interfaces=[agent.host]) if agent.host != "0.0.0.0" else Zeroconf()
            info = ServiceInfo(
                SERVICE_TYPE, self.instance, port=agent.port,
                addresses=[socket.inet_aton(a) for a in addresses],
                properties=txt_properties(agent.summary()),
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
