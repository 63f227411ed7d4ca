"""Command-line options generated from option dataclasses (`tracestar.options`).

A field becomes one argparse option: its name gives the flag (`proj_dim` → `--proj-dim`, or the
field's `flag`), its type the parser (`int | None` → int), its default the default, and its
metadata the help text and any other argparse setting (`choices`, `nargs`, `metavar`). A bool
that defaults to False is a switch; one that defaults to True is turned off by `--no-<name>`
(`unit_norm` → `--no-unit-norm`). Help may name the default as `%(default)s`, so the value is
written only on the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable, Mapping


def field_names(cls: type) -> tuple[str, ...]:
    """All of a dataclass's field names, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls))


def add_fields(p: argparse.ArgumentParser, cls: type, names: Iterable[str] | None = None, *,
               help: Mapping[str, str | None] | None = None, inherit_defaults: bool = True) -> None:
    """Add one option per field of `cls` named in `names` (default: all), in that order.

    `help` replaces a field's text (None keeps it). Without `inherit_defaults` every option
    defaults to None: for a command that falls back to values recorded elsewhere, as `refit` does
    to the source index's.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in field_names(cls) if names is None else names:
        meta = fields[name].metadata
        text = (help or {}).get(name) or meta["help"]
        default = fields[name].default
        flag = meta.get("flag", "--" + name.replace("_", "-"))
        if hints[name] is bool:
            on = bool(default)  # on by default: the flag turns it off
            p.add_argument("--no-" + flag[2:] if on else flag, dest=name, action="store_false" if on else "store_true",
                           help=text)
            continue
        kind = next(t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None))
        extra = {k: v for k, v in meta.items() if k not in ("help", "flag")}
        p.add_argument(flag, dest=name, type=None if kind is str else kind,
                       default=default if inherit_defaults else None, help=text, **extra)


def chosen(args: argparse.Namespace, cls: type, names: Iterable[str] | None = None) -> dict:
    """The parsed values of those fields, as keyword arguments."""
    return {name: getattr(args, name) for name in (field_names(cls) if names is None else names)}
