"""Command line: a thin argparse layer over `tracestar.api` and friends.

Each subcommand has one `_add_<name>(sub)` that declares its arguments and one `_run_<name>(args)`
that calls the library. Errors that are the user's fault (`tracestar.errors.UserError`) print one
line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from tracestar.errors import UserError


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracestar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


# --- subcommands (each block: _add_X declares, _run_X calls the library) ---------------------------

# === world / train (tracestar.world) ===

# === index / query / refit (tracestar.api) ===

# === eval / demo (tracestar.evaluate) ===

# === compress (tracestar.index.compress) ===

# === explain / report (tracestar.explain, tracestar.report) ===


_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"tracestar: error: {exc}", file=sys.stderr)
        return 2
