"""Third-party log noise stays off the terminal unless asked for.

    main() -> quiet(verbose)          before any framework is imported
        environment  TensorFlow's C++ log, transformers / huggingface_hub verbosity, their tqdm bars
        warnings     raised from library code -> kept in NOISE (the last few), not printed;
                     raised from tierkit's own code -> printed as usual
    --verbose, TIERKIT_VERBOSE=1      nothing is changed: the libraries speak as they like
    an internal error                 main() quotes NOISE's last line: when a library said why, the user sees it

Why: a run's terminal holds tierkit's lines (plan, progress, result). Banners
about oneDNN, "Some weights were not initialized" or a deprecation deep inside
a framework are for whoever debugs it, not for the person reading the result.
Only environment variables and the warnings hook are touched, so `tierkit fit`
and `probe` import nothing more. llama.cpp's own log goes to a ring buffer where
a milestone loads it (tiers/llama_log.py), for the same reason.
"""
from __future__ import annotations

import os
import sys
from collections import deque
from pathlib import Path

NOISE: deque[str] = deque(maxlen=20)

# setdefault: a variable the user set wins.
ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",            # TensorFlow's C++ info/warning lines (oneDNN, CPU features, ...)
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",    # tierkit draws its own download bars (fetch_with_progress)
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",      # else a warning after every fork
}

_OWN = tuple(str(Path(__file__).resolve().parents[2] / d) + os.sep for d in ("tiers", "inventory", "models"))


def wanted(argv: list[str] | None = None) -> bool:
    """True when the user asked to see everything: --verbose / -v anywhere, or TIERKIT_VERBOSE=1."""
    args = sys.argv[1:] if argv is None else argv
    return os.environ.get("TIERKIT_VERBOSE", "") not in ("", "0") or "--verbose" in args or "-v" in args


def quiet(verbose: bool = False) -> None:
    """Keep library noise in NOISE instead of on stderr (unless `verbose`)."""
    if verbose:
        os.environ["TIERKIT_VERBOSE"] = "1"   # child processes (agents, workers, llama.cpp's log) speak too
        return
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    import warnings

    shown = warnings.showwarning

    def keep(message, category, filename, lineno, file=None, line=None):
        if _issuer().startswith(_OWN):      # not `filename`: a library's stacklevel names its caller
            return shown(message, category, filename, lineno, file, line)
        NOISE.append(f"{category.__name__}: {str(message).strip().splitlines()[0] if str(message).strip() else ''}")
        return None

    warnings.showwarning = keep


def _issuer() -> str:
    """The file of the code that called warnings.warn: the first frame outside `warnings` and this module."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.endswith(f"{os.sep}warnings.py")):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


def last() -> str:
    """The last library message kept, for a failure's line; '' when none was."""
    return NOISE[-1] if NOISE else ""
