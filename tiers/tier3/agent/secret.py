"""The launch token: the shared secret a head presents before an agent starts anything.

    $TIERKIT_AGENT_TOKEN            set on both machines, or
    <profile folder>/agent.token    made by the agent on its first run (mode 0600), copied to the head

Anyone holding the token can start the engines' workers on the node, so a token
file that other users can read is refused rather than used.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from inventory.files import atomic_write
from inventory.protocol import TOKEN_ENV, TOKEN_FILE
from tiers.tier3.agent.errors import AgentError


def token_path() -> Path:
    """$TIERKIT_HOME/agent.token, else ~/.config/tierkit/agent.token (next to the profile)."""
    from inventory.profile import default_path

    return default_path().parent / TOKEN_FILE


def load_or_create_token(path: Path | None = None, *, save: bool = True) -> tuple[str, bool]:
    """(token, created): $TIERKIT_AGENT_TOKEN, else the token file, else a new one written 0600.

    A token file others can read is refused: anyone who reads it can start
    processes on this machine.
    """
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        if len(env) < 16:
            raise AgentError(f"${TOKEN_ENV} is too short to be a secret: use at least 16 characters")
        return env, False
    path = Path(path) if path else token_path()
    if path.exists():
        return read_token_file(path), False
    token = secrets.token_urlsafe(32)
    if save:
        save_token(path, token)
    return token, True


def save_token(path: Path, token: str) -> None:
    """Write a new token readable by its owner only."""
    # atomic_write leaves the file as public as the umask allows: narrow it to the owner while it writes.
    umask = os.umask(0o077)
    try:
        atomic_write(path, token + "\n")
    finally:
        os.umask(umask)


def read_token_file(path: Path) -> str:
    """The token in `path`; AgentError (one line) if missing, empty or readable by others."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise AgentError(f"cannot read token file {path} ({exc.strerror or exc}): copy it from the agent's "
                         f"machine or set ${TOKEN_ENV}") from None
    if mode & 0o077:
        raise AgentError(f"token file {path} is readable by other users: chmod 600 {path}")
    if len(text) < 16:
        raise AgentError(f"token file {path} holds no usable token: copy agent.token again from the agent's "
                         f"machine (on that machine: delete it and restart `tierkit agent` for a new one), "
                         f"or set ${TOKEN_ENV}")
    return text
