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


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report of proponents and opponents")
    p.add_argument("--results", required=True, help="RESULTS.jsonl written by `tracestar query`")
    p.add_argument("--index", required=True, help="index directory (its manifest names the corpus)")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--eval", dest="eval_dir", default=None, help="eval report directory to embed (plots, metrics)")
    p.add_argument("--no-explain", dest="explain", action="store_false",
                   help="skip per-token heat maps (faster; plain document text)")
    p.add_argument("--model", dest="model_dir", default=None, help="model directory for per-token explanations")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from tracestar.report import build_report

    out = build_report(args.results, args.index, args.out, eval_dir=args.eval_dir,
                       explain=args.explain, model_dir=args.model_dir)
    print(out)
    return 0


_COMMANDS: list = [_add_report]


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"tracestar: error: {exc}", file=sys.stderr)
        return 2
