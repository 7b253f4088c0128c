"""The node agent: `tierkit agent` runs on every machine of a tier-3 cluster.

    `tierkit agent`  ->  node.serve()                       the token (secret.py), then an Agent until stopped
      mDNS: <name>._tierkit._tcp.local.                     mdns.py     peers find the node with no configuration
      GET /v1/profile, /v1/ping, /v1/bandwidth              routes.py   what the node has; the link, measured
      POST/GET/DELETE /v1/workers  (Bearer token)           workers.py  engine workers started, watched, stopped

It does these small things so that a head node can decide where to put which
layers without logging in anywhere:

- advertise itself over mDNS, so peers are found with no configuration;
- serve its hardware profile, so the head knows each node's memory and compute
  (summary.py: the few numbers placement needs, free memory read at that moment);
- serve bytes to download or swallow and a tiny ping, so the head measures the
  link it will actually use, not a datasheet figure;
- start, watch and stop the worker side of a tier-3 engine for a head that
  presents the shared secret (the token is generated on first run, mode 0600,
  or taken from $TIERKIT_AGENT_TOKEN). Only engines it knows, with arguments
  each engine validates into an argv: no shell, no free-form command. Workers
  that die are restarted.

The names both sides agree on (service type, port, routes, the token's
variable) are inventory/protocol.py's; discovery, the other side, is
inventory/detect/peers.py.
"""
from __future__ import annotations

from inventory.protocol import DEFAULT_PORT, MAX_TRANSFER, SERVICE_TYPE, TOKEN_ENV
from tiers.tier3.agent.errors import AgentError, LaunchError, PortInUse
from tiers.tier3.agent.node import Agent, log, serve, start_in_thread
from tiers.tier3.agent.secret import load_or_create_token, read_token_file, token_path
from tiers.tier3.agent.summary import summarize, txt_properties

__all__ = ["DEFAULT_PORT", "MAX_TRANSFER", "SERVICE_TYPE", "TOKEN_ENV", "Agent", "AgentError", "LaunchError",
           "PortInUse", "load_or_create_token", "log", "read_token_file", "serve", "start_in_thread",
           "summarize", "token_path", "txt_properties"]
