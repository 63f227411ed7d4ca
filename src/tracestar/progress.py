"""What a long command tells its user while it runs: messages, tqdm bars, wall time per phase.

Only rank 0 speaks, and `--quiet` silences everything, so a distributed build prints one copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tracestar import dist


def say(quiet: bool, msg: str) -> None:
    """Print `msg` on rank 0 unless quiet."""
    if not quiet and dist.rank() == 0:
        print(msg, flush=True)


def bar(total: int, quiet: bool, desc: str, unit: str = "doc") -> tuple[Callable | None, Callable[[], None]]:
    """A tqdm bar (with tokens/s when tokens are reported) on rank 0; returns (callback, close).

    The callback is `update(n_items, n_tokens=0)`, or None when no bar is drawn. Nothing to do
    draws no bar (a "0doc" bar reads like a stall).
    """
    if quiet or dist.rank() != 0 or total <= 0:
        return None, lambda: None
    from tqdm.auto import tqdm

    shown = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    start, tokens = time.perf_counter(), [0]

    def update(n_items: int, n_tokens: int = 0) -> None:
        tokens[0] += n_tokens
        shown.update(n_items)
        if tokens[0]:
            shown.set_postfix_str(f"{tokens[0] / max(time.perf_counter() - start, 1e-9):,.0f} tok/s")

    return update, shown.close


def loop_bars(quiet: bool, unit: str = "block") -> Callable:
    """`progress(items, desc)` as `preconditioner.fit` takes it: one bar per loop on rank 0, none when quiet."""
    if quiet or dist.rank() != 0:
        return lambda items, desc: items
    from tqdm.auto import tqdm

    def wrap(items, desc):
        if not hasattr(items, "__len__"):
            items = list(items)
        # a lazy Sized (results computed as they are consumed) keeps its laziness: the bar moves and
        # shows an ETA as each one arrives
        return tqdm(items, total=len(items), desc=desc, unit=unit, dynamic_ncols=True) if len(items) else items

    return wrap


class PhaseTimer:
    """Wall seconds per build phase, exclusive of phases timed inside it (writes inside final vectors).

    Printed at the end of a build and recorded in the manifest (`timings`), which says where a
    build's time went: the corpus pass, or the fixed costs after it.
    """

    ORDER = ("load", "verify", "V", "corpus pass", "R statistics", "eigendecomposition", "final vectors", "writes")

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, seconds of phases nested inside]
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._stack.append([time.perf_counter(), 0.0])
        try:
            yield
        finally:
            start, inner = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if self._stack:
                self._stack[-1][1] += elapsed

    def snapshot(self) -> dict[str, float]:
        """{phase: seconds} in pipeline order, rounded to 0.01 s, plus the total wall time so far."""
        names = [n for n in self.ORDER if n in self.seconds] + sorted(set(self.seconds) - set(self.ORDER))
        out = {n: round(self.seconds[n], 2) for n in names}
        out["total"] = round(time.perf_counter() - self._start, 2)
        return out

    def line(self) -> str:
        snap = self.snapshot()
        total = snap.pop("total")
        return "time: " + ", ".join(f"{n} {_seconds(v)}" for n, v in snap.items()) + f"; total {_seconds(total)}"


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{int(value // 60)} min {value % 60:02.0f} s"
