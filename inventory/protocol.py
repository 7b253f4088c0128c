"""The node agent's protocol: what a peer and an agent agree on, in one place.

    peer (probe, head)                                   agent (`tierkit agent`, tiers/tier3/agent)
      mDNS PTR SERVICE_TYPE  ───────────────────────►    answers: instance, SRV port, A addresses
      GET  PING, PROFILE, BANDWIDTH?bytes=N ─────────►   open to anyone on the network
      POST/GET/DELETE WORKERS[/ID] ──────────────────►   only with "Authorization: Bearer TOKEN"
                                                         (the token file, or $TOKEN_ENV)

Discovery (inventory/detect/peers.py) finds and measures agents with these
names; the agent serves them. Neither imports the other: both import this, so
a route renamed on one side cannot be forgotten on the other.
"""
from __future__ import annotations

SERVICE_TYPE = "_tierkit._tcp.local."
DEFAULT_PORT = 8477

PING = "/v1/ping"            # {"ok": true, "name", "version"}: the round trip a peer times
PROFILE = "/v1/profile"      # {"profile", "summary"}: what placement needs to know of the node
BANDWIDTH = "/v1/bandwidth"  # GET ?bytes=N streams N bytes; POST swallows a body: the link, both ways
WORKERS = "/v1/workers"      # the engines' worker processes this node runs for an authenticated head

# Largest transfer either way: enough to time a 10 Gbit/s link, small enough
# that a typo cannot make the agent stream for minutes.
MAX_TRANSFER = 256 << 20

TOKEN_ENV = "TIERKIT_AGENT_TOKEN"
TOKEN_FILE = "agent.token"   # next to the profile ($TIERKIT_HOME, else ~/.config/tierkit)
