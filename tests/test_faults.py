"""Faults other than a kill: a full disk at every write, corrupted files, escaping paths, reading mid-build.

Each case is a loop: every write of a build fails in turn; every file of an index is truncated
and bit-flipped in turn; every field that names a file is pointed outside the index in turn. What
is promised (the README's "Guarantees"): a one-line error naming the file, nothing half-written
taken as complete, and a rerun that ends in the uninterrupted build's bytes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from test_kill import (
    differences,
    half_written,
    index_argv,
    query_outcome,
    run_cli,
    snapshot,
    spawn_cli,
    temporaries,
)

from tracestar import files
from tracestar.cli import main as cli_main
from tracestar.index import writer

#: Two shards of five documents: every kind of file, and few writes to fail in turn.
SHARDS = ("--shard-docs", "5")


def one_line(err: str) -> str:
    """The single line a refused command printed (asserting it is one)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def build(world, out: Path, capsys, *extra: str) -> tuple[int, str]:
    """`tracestar index` in this process: (exit code, stderr)."""
    rc = cli_main(index_argv(world, out, *SHARDS, *extra))
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """A finished index built in this process, its snapshot, the files it writes in order, its answers."""
    out = tmp_path_factory.mktemp("reference") / "index"
    writes: list[Path] = []
    saved = files.before_replace
    files.before_replace = lambda tmp, target: writes.append(Path(target))
    try:
        assert cli_main(index_argv(world, out, *SHARDS)) == 0
    finally:
        files.before_replace = saved
    from tracestar.corpus import read_queries

    answers = query_outcome(out, read_queries(world["queries"]))
    assert isinstance(answers, list)
    return {"dir": out, "snapshot": snapshot(out), "writes": [w.relative_to(out) for w in writes], "answers": answers}


# --- a full disk -----------------------------------------------------------------------------------


def _full_at(n: int):
    """A `before_replace` that fails the `n`-th write (1-based) as a full disk does: ENOSPC, no file named."""
    count = [0]

    def hook(tmp: Path, target: Path) -> None:
        count[0] += 1
        if count[0] == n:
            raise OSError(errno.ENOSPC, "No space left on device")

    return hook


def test_a_full_disk_at_every_write_of_a_build(world, reference, queries, tmp_path, monkeypatch, capsys):
    writes = reference["writes"]
    assert len(writes) == 15 and writes[0] == Path(writer.BUILD_FILE) and writes[-1] == Path(writer.MANIFEST)
    for n, rel in enumerate(writes, start=1):
        out = tmp_path / f"full{n}" / "index"
        monkeypatch.setattr(files, "before_replace", _full_at(n))
        rc, err = build(world, out, capsys)
        assert rc == 2
        assert one_line(err) == f"tracestar: error: {out / rel}: No space left on device", n
        state = snapshot(out)
        assert temporaries(state) == [] and half_written(state, {}, reference["snapshot"]) == [], n
        assert writer.MANIFEST not in state
        assert str(query_outcome(out, queries)).startswith("refused: "), n
        monkeypatch.setattr(files, "before_replace", files._no_fault)
        rc, err = build(world, out, capsys)
        assert rc == 0, err
        assert differences(snapshot(out), reference["snapshot"]) == [], n
        shutil.rmtree(out.parent)


def test_a_full_disk_at_every_write_of_compress(reference, tmp_path, monkeypatch, capsys):
    from tracestar.index.compress import compress

    done = tmp_path / "done"
    shutil.copytree(reference["dir"], done)
    writes: list[Path] = []
    monkeypatch.setattr(files, "before_replace", lambda tmp, target: writes.append(Path(target)))
    compress(done, "int8")
    finished = snapshot(done)
    assert len(writes) == 5  # codes and scales of two shards, then the manifest
    for n, target in enumerate(writes, start=1):
        work = tmp_path / f"full{n}"
        shutil.copytree(reference["dir"], work)
        monkeypatch.setattr(files, "before_replace", _full_at(n))
        assert cli_main(["compress", "--index", str(work), "--kind", "int8"]) == 2
        assert one_line(capsys.readouterr().err) == f"tracestar: error: {work / target.relative_to(done)}: No space left on device"
        state = snapshot(work)
        assert temporaries(state) == [] and half_written(state, reference["snapshot"], finished) == []
        assert state[writer.MANIFEST] == reference["snapshot"][writer.MANIFEST]  # still the uncompressed index
        monkeypatch.setattr(files, "before_replace", files._no_fault)
        assert cli_main(["compress", "--index", str(work), "--kind", "int8"]) == 0
        capsys.readouterr()
        assert differences(snapshot(work), finished) == []


# --- corrupted files -------------------------------------------------------------------------------

#: Every kind of file in an index. Query reads all but the raw shards (refit and a rerun read those).
CORRUPTIBLE = ["manifest.json", "docs.jsonl", "normalizer.safetensors", "normalizer.json",
               "preconditioner.safetensors", "preconditioner.json", "vectors/shard-00001.npy",
               "vectors/shard-00000.json", "raw/shard-00001.json", "raw/shard-00000.npy"]


def damage(path: Path, how: str, rng: random.Random) -> None:
    """Truncate the file to a random shorter length, or flip one random bit of it."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        del data[rng.randrange(len(data)):]
    else:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _corruption_cases(seeds: int) -> list[tuple[str, str, int]]:
    return [(rel, how, seed) for rel in CORRUPTIBLE for how in ("truncate", "flip") for seed in range(seeds)]


def check_corruption(world, reference, rel: str, how: str, seed: int, tmp_path: Path, capsys) -> str:
    """Damage `rel` of a copy of the reference; query must refuse it naming the file (or, for a raw
    shard no query reads, answer as before); refit must refuse a damaged raw shard; the rerun repairs
    it to the reference bytes. Returns the refusal line."""
    work = tmp_path / "index"
    shutil.copytree(reference["dir"], work)
    damage(work / rel, how, random.Random(f"{rel}/{how}/{seed}"))
    res = tmp_path / "results.jsonl"
    rc = cli_main(["query", "--index", str(work), "--queries", str(world["queries"]), "--out", str(res)])
    err = capsys.readouterr().err
    if rel.startswith("raw/") and rel.endswith(".npy"):
        assert rc == 0 and query_outcome(work, queries_of(world)) == reference["answers"]
        rc = cli_main(["refit", "--index", str(work), "--out", str(tmp_path / "refit"), "--quiet"])
        err = capsys.readouterr().err
    if rc == 0 and rel == writer.MANIFEST:  # a flip that JSON reads as the same content ("1e-05" → "1E-05")
        assert json.loads((work / rel).read_bytes()) == json.loads((reference["dir"] / rel).read_bytes())
        shutil.rmtree(tmp_path)
        return "accepted: the same content"
    assert rc == 2, (rel, how, seed, err)
    line = one_line(err)
    assert line.startswith(f"tracestar: error: {work / rel}: "), (rel, how, seed, line)
    assert rel.startswith("raw/") or not res.exists()  # a refused query writes no results
    rc, err = build(world, work, capsys)
    assert rc == 0, err
    assert differences(snapshot(work), reference["snapshot"]) == [], (rel, how, seed)
    shutil.rmtree(tmp_path)
    return line


def queries_of(world):
    from tracestar.corpus import read_queries

    return read_queries(world["queries"])


@pytest.mark.parametrize("rel", CORRUPTIBLE)
def test_a_truncated_or_flipped_file_is_refused_naming_it_and_repaired(world, reference, rel, tmp_path, capsys):
    for how in ("truncate", "flip"):
        check_corruption(world, reference, rel, how, 0, tmp_path / how, capsys)


@pytest.mark.slow
def test_corruptions_at_many_seeded_places(world, reference, tmp_path, capsys):
    cases = _corruption_cases(seeds=10)
    refused = {"query": 0, "refit": 0, "same content": 0}
    for i, (rel, how, seed) in enumerate(cases):
        line = check_corruption(world, reference, rel, how, seed, tmp_path / f"c{i}", capsys)
        refused["same content" if line.startswith("accepted") else "refit" if rel.startswith("raw/") and
                rel.endswith(".npy") else "query"] += 1
    assert refused["query"] >= 170 and refused["refit"] == 20
    print(f"corruptions: {len(cases)}; refused naming the file by query {refused['query']}, by refit "
          f"{refused['refit']} (raw shards, which no query reads); a manifest flip JSON reads as the same "
          f"content {refused['same content']}; every one repaired by the rerun to the reference bytes")


# --- escaping paths --------------------------------------------------------------------------------


def _escapes(outside: Path) -> list[tuple[str, object]]:
    """(what the manifest field is set to, how) for each field that names a file."""
    def shard_name(m):
        m["shards"][0]["name"] = "../../outside"

    def checksum_up(m):
        m["checksums"]["../outside.json"] = files.sha256_file(outside)

    def checksum_abs(m):
        m["checksums"][str(outside)] = files.sha256_file(outside)

    def docs_abs(m):
        m["files"]["docs"] = str(outside)

    def pq_abs(m):
        m["compressed"] = {"pq": {"path": str(outside), "sha256": files.sha256_file(outside)}, "default": "pq"}

    def int8_up(m):
        m["compressed"] = {"int8": {"path": "compressed/../../int8", "shards": []}, "default": "int8"}

    return [("shards[0].name", shard_name), ("checksums", checksum_up), ("checksums", checksum_abs),
            ("files.docs", docs_abs), ("compressed.pq.path", pq_abs), ("compressed.int8.path", int8_up)]


def test_a_manifest_naming_a_file_outside_the_index_is_refused(world, reference, tmp_path, capsys):
    outside = tmp_path / "outside.json"
    outside.write_text('{"keep": true}\n')
    for i, (field, edit) in enumerate(_escapes(outside)):
        work = tmp_path / f"e{i}" / "index"
        shutil.copytree(reference["dir"], work)
        manifest = json.loads((work / writer.MANIFEST).read_text())
        edit(manifest)
        writer.write_manifest(work, manifest)  # a well-formed manifest, digest and all
        rc = cli_main(["query", "--index", str(work), "--queries", str(world["queries"]), "--out", str(tmp_path / "r.jsonl")])
        line = one_line(capsys.readouterr().err)
        assert rc == 2 and line.startswith(f"tracestar: error: {work / writer.MANIFEST}: {field} names "), line
        assert line.endswith("outside the index directory; refusing it")
        rc, err = build(world, work, capsys)  # the rerun rewrites the manifest and touches nothing outside
        assert rc == 0, err
        assert differences(snapshot(work), reference["snapshot"]) == [], field
        assert outside.read_text() == '{"keep": true}\n'


# --- reading while a build runs --------------------------------------------------------------------


def _query_while(child_argv: list[str], index: Path, queries, log: Path, allowed: list) -> dict[str, int]:
    """Query `index` over and over while a forked `tracestar` child writes it; every answer must be
    one of `allowed` or a refusal. Returns how often each happened."""
    from tracestar.api import open_index
    from tracestar.errors import UserError

    seen = {"refused": 0, "answered": 0}
    pid = spawn_cli(child_argv, log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        pid_done, status = os.waitpid(pid, os.WNOHANG)
        try:
            got = [[(p["doc_id"], round(p["score"], 6)) for p in r["proponents"] + r["opponents"]]
                   for r in open_index(index).query(queries, top_k=5)]
        except (UserError, OSError):
            seen["refused"] += 1
        else:
            assert got in allowed, "a query read a half-made index"
            seen["answered"] += 1
        time.sleep(0.01)  # a refusal is instant: leave the builder the CPU
        if pid_done == pid:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, log.read_text()
            return seen
    os.kill(pid, 9)
    raise AssertionError("the build did not finish")


def test_query_during_a_resumed_build_reads_complete_shards_or_refuses(world, queries, tmp_path):
    # Every build here is a forked child (one torch thread), so resumed shards match the first build's.
    first = tmp_path / "first"
    assert run_cli(index_argv(world, first, *SHARDS), tmp_path / "first.log").rc == 0
    other = tmp_path / "other"  # the same corpus under another projection seed: other answers
    assert run_cli(index_argv(world, other, *SHARDS, "--seed", "7"), tmp_path / "other.log").rc == 0
    reference = {"dir": first, "snapshot": snapshot(first)}
    allowed = [query_outcome(first, queries), query_outcome(other, queries)]
    tally = {"refused": 0, "answered": 0}
    for round_ in range(3):
        work = tmp_path / f"w{round_}"
        shutil.copytree(reference["dir"], work)
        # an interrupted build: the manifest and the last shard's files not yet written
        for rel in (writer.MANIFEST, "raw/shard-00001.npy", "raw/shard-00001.json", "vectors/shard-00001.npy",
                    "vectors/shard-00001.json"):
            (work / rel).unlink()
        seen = _query_while(index_argv(world, work, *SHARDS), work, queries, tmp_path / f"resume{round_}.log", allowed)
        tally = {k: tally[k] + seen[k] for k in tally}
        assert differences(snapshot(work), reference["snapshot"]) == []
        # and a finished index rebuilt in place with other options (--overwrite) while it is read
        seen = _query_while(index_argv(world, work, *SHARDS, "--seed", "7", "--overwrite"), work, queries,
                            tmp_path / f"overwrite{round_}.log", allowed)
        tally = {k: tally[k] + seen[k] for k in tally}
    assert tally["refused"] >= 3 and tally["answered"] >= 3, tally
    print(f"reading during builds: {tally['answered']} queries answered from complete indexes, {tally['refused']} refused")


def test_a_build_killed_while_writing_its_first_file_starts_afresh(world, reference, tmp_path, capsys):
    out = tmp_path / "index"
    out.mkdir()
    (out / f"{writer.BUILD_FILE}{files.TMP_MARK}99999").write_text('{"seed": ')  # all a kill left
    rc, err = build(world, out, capsys)
    assert rc == 0, err
    assert differences(snapshot(out), reference["snapshot"]) == []
