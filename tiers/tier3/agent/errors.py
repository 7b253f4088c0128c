"""What the agent refuses, as exceptions whose str() is one line that names the fix."""
from __future__ import annotations


class AgentError(Exception):
    """The agent cannot start (or a token cannot be used); str() is one line that names the fix."""


class PortInUse(AgentError):
    """Another process already listens on the requested address and port."""


class LaunchError(Exception):
    """A launch request the agent refuses (HTTP 400); str() is one line."""
