"""Errors that are the user's doing: bad input files, bad options, mismatched models, corrupted indexes.

The CLI prints them as one line and exits 2; the Python API raises them. Range checks live here so
the library refuses an out-of-range option whether it came from the command line or from Python.
"""

from __future__ import annotations

import math
import numbers


class UserError(Exception):
    """Something the user can fix; its message is one line naming the file, line and field."""


class InputError(UserError):
    """A malformed corpus or query file: `path:line: field 'x': what is wrong`."""

    def __init__(self, path: object, line: int | None, field: str | None, problem: str):
        where = f"{path}:{line}" if line is not None else f"{path}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {problem}")
        self.path, self.line, self.field, self.problem = path, line, field, problem


class OptionError(UserError):
    """An option out of its range: `--option: what is wrong`.

    Options are named as the command line spells them (`--top-k`); the Python keyword is the same
    name with underscores, so one message serves both.
    """

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option}: {problem}")
        self.option, self.problem = option, problem


class IndexStoreError(UserError):
    """An index that is incomplete, corrupted or does not belong to the given model."""


def check_int(option: str, value, *, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False, why: str = "") -> int | None:
    """`value` as an int within [minimum, maximum], else an `OptionError` naming `option`.

    `optional`: None is allowed (it means "the default"). `why` is appended to the message.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(option, f"expected an integer, got {value!r}")
    _check_range(option, int(value), minimum, maximum, why)
    return int(value)


def check_float(option: str, value, *, minimum: float | None = None, maximum: float | None = None,
                above: float | None = None, optional: bool = False, why: str = "") -> float | None:
    """`value` as a finite float within [minimum, maximum] (and > `above`), else an `OptionError`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(option, f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise OptionError(option, f"expected a finite number, got {value!r}")
    if above is not None and not value > above:
        raise OptionError(option, f"must be greater than {above:g}, got {value:g}{why}")
    _check_range(option, value, minimum, maximum, why)
    return float(value)


def _check_range(option: str, value, minimum, maximum, why: str) -> None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise OptionError(option, f"must be between {minimum:g} and {maximum:g}, got {value:g}{why}")
    if minimum is not None and value < minimum:
        raise OptionError(option, f"must be at least {minimum:g}, got {value:g}{why}")
    if maximum is not None and value > maximum:
        raise OptionError(option, f"must be at most {maximum:g}, got {value:g}{why}")
