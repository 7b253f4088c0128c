"""llama.cpp's log, kept off the terminal: the tiers that load a GGUF in this process share it.

    quiet()        route llama.cpp's log lines into LOG (a ring buffer) instead of stderr; once per process
    last_error()   the newest line that reads like an error, for the one-line message when a load fails
    --verbose      (TIERKIT_VERBOSE=1) quiet() does nothing: llama.cpp speaks as it likes

Why: llama.cpp prints its loader, context and sampler state for every model it opens
("llama_context: n_ctx_seq (512) > n_ctx_train ..."); those lines are for whoever debugs
llama.cpp, not for the person reading a run's result. Its last error, though, is often the
only place that says why a file would not load, so it is kept and quoted.
"""
from __future__ import annotations

import ctypes
import os
from collections import deque
from typing import Any

LOG: deque[str] = deque(maxlen=40)
_CALLBACK: Any = None
ERROR_WORDS = ("error", "failed", "invalid", "unknown", "cannot")


def quiet() -> None:
    """Keep llama.cpp's log in LOG from now on (unless the user asked for --verbose)."""
    global _CALLBACK
    if _CALLBACK is not None or os.environ.get("TIERKIT_VERBOSE", "") not in ("", "0"):
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", "replace").strip()
        if line:
            LOG.append(line)

    _CALLBACK = keep  # keep a reference: ctypes does not, and a collected callback crashes
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))


def last_error() -> str:
    """The newest kept line that names a failure ("" when none), cut to 160 characters."""
    for line in reversed(LOG):
        if any(w in line.lower() for w in ERROR_WORDS):
            return line[:160]
    return ""
