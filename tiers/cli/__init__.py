"""The `tierkit` command: thin glue over plain functions, one module per command group.

Heavy frameworks are imported inside the commands that need them, so `probe`
and `fit` start fast on the base install.
"""
from __future__ import annotations

import os
import sys

# Each module registers its commands; `tierkit --help` lists them in this order.
# isort: off
from tiers.cli import probe, fit, run, kws, data, nodes  # noqa: F401
# isort: on
from tiers.cli.common import Fail, app

__all__ = ["app", "main"]


def main() -> None:
    from tiers.cli import quiet

    quiet.quiet(quiet.wanted())
    try:
        app()
    except Fail as exc:
        print(f"tierkit: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    except KeyboardInterrupt:
        print("tierkit: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # last resort: one line, not a traceback
        if os.environ.get("TIERKIT_DEBUG"):
            raise
        said = f" (the library said: {quiet.last()})" if quiet.last() else ""
        print(f"tierkit: internal error: {type(exc).__name__}: {exc}{said} (set TIERKIT_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)
