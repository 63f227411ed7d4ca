"""SIGKILL at seeded random moments: the rerun gives the uninterrupted run's bytes, or refuses in one line.

`index`, `refit`, `compress` and `eval` are each killed at 20 seeded moments (the slow loops; the
default suite kills `index` at 3). After every kill:

- every file left under its final name holds the bytes of the state before the command or of the
  uninterrupted run (a half-written file only ever exists under its temporary name);
- `query` on the half-made index refuses it, or it is complete and answers as the reference does;
- the same command run again finishes, and the directory is byte-for-byte the uninterrupted run's
  (manifest and metrics compared without their clock fields), temporary leftovers included.

Each child is a fork of the test process running `tracestar.cli.main(argv)`, the `tracestar`
command itself, without the seconds a fresh interpreter spends importing torch (at 20 kills per
command those would be most of the loop). A fork is a process of its own: SIGKILL stops it between
any two instructions, with its files as a real kill leaves them. Every run, reference included,
is such a child on one torch thread, so the bytes compared come from the same arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tracestar import files

#: JSON fields that record when or how long, not what: left out of every byte comparison.
CLOCK_FIELDS = {
    "manifest.json": [("created",), ("timings",), ("repaired",), ("compressed", "*", "seconds"),
                      ("compressed", "*", "created"), ("compressed", "*", "train_seconds"),
                      ("compressed", "*", "encode_seconds"),
                      ("compressed", "exact_dropped_at"), ("manifest_sha256",)],  # the digest covers the clock fields too
    "metrics.json": [("_settings", "timings"), ("_settings", "tailpatch", "seconds")],
}
#: report.md states the same durations in words: "Timings (s): …" and "… took 12.3 s."
_DURATION = re.compile(r"Timings \(s\):.*|\b\d+(\.\d+)? s\b")


def _drop(obj, path: tuple[str, ...]) -> None:
    if not isinstance(obj, dict) or not path:
        return
    head, rest = path[0], path[1:]
    keys = list(obj) if head == "*" else [head]
    for k in keys:
        if k in obj:
            if rest:
                _drop(obj[k], rest)
            else:
                del obj[k]


def file_digest(path: Path) -> str:
    """sha256 of a file; for a manifest or metrics.json, of its JSON without the clock fields."""
    if path.name == "report.md":
        return hashlib.sha256(_DURATION.sub("…", path.read_text(errors="replace")).encode()).hexdigest()
    fields = CLOCK_FIELDS.get(path.name)
    if fields is None:
        return files.sha256_file(path)
    try:
        obj = json.loads(path.read_bytes())
    except ValueError:
        return "unreadable:" + files.sha256_file(path)
    for f in fields:
        _drop(obj, f)
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: digest} of every file under `root`, temporary leftovers included."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(snap: dict[str, str]) -> list[str]:
    return [rel for rel in snap if files.TMP_MARK in rel]


def differences(got: dict[str, str], want: dict[str, str]) -> list[str]:
    """What differs between two snapshots, one entry per file (empty when they are equal)."""
    return sorted(f"{rel}: {'missing' if rel not in got else 'extra' if rel not in want else 'other bytes'}"
                  for rel in set(got) | set(want) if got.get(rel) != want.get(rel))


def half_written(after_kill: dict[str, str], before: dict[str, str], finished: dict[str, str]) -> list[str]:
    """Files under their final name whose bytes are neither the old state's nor the finished run's."""
    return sorted(rel for rel, sha in after_kill.items()
                  if files.TMP_MARK not in rel and sha not in (before.get(rel), finished.get(rel)))


@dataclass
class Child:
    rc: int | None  # None: killed
    seconds: float
    log: str

    @property
    def killed(self) -> bool:
        return self.rc is None


def run_cli(argv: list[str], log: Path, kill_after: float | None = None) -> Child:
    """`tracestar ARGV` in a forked child; SIGKILL it `kill_after` seconds after the fork (unless it ended)."""
    t0 = time.monotonic()
    pid = spawn_cli(argv, log)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)  # an already finished child is an unreaped zombie: harmless
    _, status = os.waitpid(pid, 0)
    rc = None if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    # a child killed at once has not opened its log yet
    return Child(rc, time.monotonic() - t0, log.read_text(errors="replace") if log.exists() else "")


def spawn_cli(argv: list[str], log: Path) -> int:
    """Fork a child that runs `tracestar ARGV` on one torch thread, its output to `log`; its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(1, "w", closefd=False)  # noqa: SIM115 - the child ends in os._exit
            import torch

            torch.set_num_threads(1)
            from tracestar.cli import main

            code = main(argv)
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001 - a traceback goes to the log, the parent reads it
            import traceback

            traceback.print_exc()
            sys.stdout.flush()
        os._exit(code)
    return pid


def refusal(child: Child) -> str | None:
    """The one-line error a child refused with, or None when it did not refuse cleanly."""
    lines = [ln for ln in child.log.splitlines() if ln.strip()]
    if child.rc == 2 and lines and lines[-1].startswith("tracestar: error: ") and "Traceback" not in child.log:
        return lines[-1]
    return None


def query_outcome(index_dir: Path, queries) -> list | str:
    """What `query` makes of a directory: its results (doc ids and scores), or the refusal's text."""
    from tracestar.api import open_index
    from tracestar.errors import UserError

    try:
        results = open_index(index_dir).query(queries, top_k=5)
    except UserError as exc:
        assert "\n" not in str(exc)
        return f"refused: {exc}"
    return [[(p["doc_id"], round(p["score"], 6)) for p in r["proponents"] + r["opponents"]] for r in results]


def moments(seed: int, n: int, span: float) -> list[float]:
    """`n` seeded kill times, uniform over the uninterrupted run's `span` seconds (and a little past)."""
    rng = random.Random(seed)
    return [rng.uniform(0.0, 1.1 * span) for _ in range(n)]


@dataclass
class Tally:
    """What the kills hit: the summary each loop prints (and the README quotes)."""

    kills: int = 0
    finished_first: int = 0
    left_temporaries: int = 0
    refused_by_query: int = 0
    accepted_by_query: int = 0
    rerun_refused: int = 0
    refusals: list[str] = field(default_factory=list)

    def line(self, what: str) -> str:
        queried = (f"query refused {self.refused_by_query} half-made states and answered {self.accepted_by_query} "
                   f"finished ones as the reference did; ") if self.refused_by_query + self.accepted_by_query else ""
        return (f"{what}: {self.kills} kills ({self.finished_first} after the run had ended), "
                f"{self.left_temporaries} left temporary files; {queried}"
                f"{self.rerun_refused} reruns refused, the rest ended in the reference bytes"
                + "".join(f"\n  refused: {r}" for r in self.refusals))


def kill_loop(tmp: Path, argv_for, *, seed: int, n: int, prepare=None, queries=None, name: str) -> Tally:
    """Kill `tracestar argv_for(dir)` at `n` seeded moments and check each kill and its rerun.

    `prepare(dir)` sets up the state before the command (an index to compress); `queries`:
    check what `query` makes of the directory after each kill (None for `eval`).
    """
    def fresh(d: Path) -> Path:
        shutil.rmtree(d, ignore_errors=True)
        if prepare is not None:
            prepare(d)
        return d

    ref = fresh(tmp / "reference")
    before = snapshot(ref)
    first = run_cli(argv_for(ref), tmp / "logs" / "reference.log")
    assert first.rc == 0, first.log
    finished = snapshot(ref)
    assert not temporaries(finished)
    reference_answers = query_outcome(ref, queries) if queries is not None else None
    if queries is not None:
        assert isinstance(reference_answers, list)
    # An uninterrupted second run in a fresh directory gives the same bytes: the comparison is fair.
    # Its duration (this process has now imported what the first run's child had to) is the span
    # the kills are drawn from.
    again = fresh(tmp / "again")
    warm = run_cli(argv_for(again), tmp / "logs" / "again.log")
    assert warm.rc == 0
    assert differences(snapshot(again), finished) == []

    tally = Tally()
    for i, t in enumerate(moments(seed, n, warm.seconds)):
        work = fresh(tmp / f"kill{i}")
        child = run_cli(argv_for(work), tmp / "logs" / f"kill{i}.log", kill_after=t)
        tally.kills += 1
        tally.finished_first += not child.killed
        state = snapshot(work)
        tally.left_temporaries += bool(temporaries(state))
        assert half_written(state, before, finished) == [], f"kill {i} at {t:.3f}s"
        if queries is not None:
            seen = query_outcome(work, queries)
            if isinstance(seen, str):
                tally.refused_by_query += 1
            else:
                assert seen == reference_answers, f"kill {i} at {t:.3f}s: query accepted a different index"
                tally.accepted_by_query += 1
        rerun = run_cli(argv_for(work), tmp / "logs" / f"rerun{i}.log")
        if rerun.rc != 0:
            assert refusal(rerun), f"kill {i} at {t:.3f}s: rerun failed without a one-line refusal:\n{rerun.log}"
            tally.rerun_refused += 1
            tally.refusals.append(refusal(rerun))
        else:
            assert differences(snapshot(work), finished) == [], f"kill {i} at {t:.3f}s"
        shutil.rmtree(work)
    print(tally.line(name))
    return tally


# --- the commands ---------------------------------------------------------------------------------


def index_argv(world, out: Path, *extra: str) -> list[str]:
    return ["index", "--model", str(world["model"]), "--corpus", str(world["corpus"]), "--out", str(out),
            "--optimizer-state", str(world["optimizer"]), "--proj-dim", "256", "--shard-docs", "2", "--quiet", *extra]


def eval_queries(world, path: Path) -> Path:
    """The world's queries with ground truth: query i asks for fact i, which document d<i> states."""
    with open(world["queries"]) as src, open(path, "w") as dst:
        for i, line in enumerate(src):
            rec = json.loads(line)
            dst.write(json.dumps({**rec, "relevant": [f"d{i}"], "bucket": "1"}) + "\n")
    return path


@pytest.fixture(scope="module")
def base_index(world, tmp_path_factory):
    """A finished index (built by a forked child, as every run here is) for refit, compress and eval."""
    out = tmp_path_factory.mktemp("base") / "index"
    child = run_cli(index_argv(world, out), out.parent / "build.log")
    assert child.rc == 0, child.log
    return out


def test_a_killed_index_build_resumes_to_the_same_bytes(world, queries, tmp_path):
    tally = kill_loop(tmp_path, lambda d: index_argv(world, d), seed=14, n=3, queries=queries, name="index")
    assert tally.kills == 3 and tally.rerun_refused == 0


@pytest.mark.slow
def test_index_killed_at_20_moments(world, queries, tmp_path):
    tally = kill_loop(tmp_path, lambda d: index_argv(world, d), seed=1401, n=20, queries=queries, name="index")
    assert tally.rerun_refused == 0 and tally.refused_by_query + tally.accepted_by_query == 20


@pytest.mark.slow
def test_refit_killed_at_20_moments(world, queries, base_index, tmp_path):
    argv = lambda d: ["refit", "--index", str(base_index), "--out", str(d), "--eval-queries", str(world["queries"]),
                      "--preconditioner", "mixed", "--quiet"]
    tally = kill_loop(tmp_path, argv, seed=1402, n=20, queries=queries, name="refit")
    assert tally.rerun_refused == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "pq"])
def test_compress_killed_at_20_moments(kind, queries, base_index, tmp_path):
    def prepare(d: Path) -> None:
        shutil.copytree(base_index, d)

    argv = lambda d: ["compress", "--index", str(d), "--kind", kind]
    tally = kill_loop(tmp_path, argv, seed=1403, n=20, prepare=prepare, queries=queries, name=f"compress {kind}")
    assert tally.rerun_refused == 0


@pytest.mark.slow
def test_eval_killed_at_20_moments(world, base_index, tmp_path):
    qpath = eval_queries(world, tmp_path / "eval_queries.jsonl")
    argv = lambda d: ["eval", "--index", str(base_index), "--queries", str(qpath), "--out", str(d),
                      "--bm25", "--tail-patch", "--k", "1,3", "--max-queries", "2"]
    tally = kill_loop(tmp_path, argv, seed=1404, n=20, name="eval")
    assert tally.rerun_refused == 0
