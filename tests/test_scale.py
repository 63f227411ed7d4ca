"""Resumable and distributed builds produce the same index as one uninterrupted process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tiny


def _npy_bytes(index: Path) -> dict[str, bytes]:
    return {str(p.relative_to(index)): p.read_bytes() for p in sorted(index.rglob("*.npy"))}


@pytest.fixture(scope="module")
def big_corpus(world, tmp_path_factory):
    """The world's texts repeated into 120 documents, so a build has many shards to interrupt."""
    texts = [f"{t} {i % 7}" for i, t in enumerate((tiny.FACTS + tiny.FILLER) * 12)]
    return tiny.write_corpus(tmp_path_factory.mktemp("big") / "corpus.jsonl", texts)


def _index_cmd(world, corpus, out, *extra) -> list[str]:
    return ["-m", "tracestar", "index", "--model", str(world["model"]), "--corpus", str(corpus), "--out", str(out),
            "--optimizer-state", str(world["optimizer"]), "--proj-dim", "1024", "--shard-docs", "2",
            "--eval-queries", str(world["queries"]), "--quiet", *extra]


def _env(threads: int = 1) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def test_killed_build_resumes_to_the_same_bytes(world, big_corpus, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, *_index_cmd(world, big_corpus, reference)], check=True, env=_env())
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, *_index_cmd(world, big_corpus, out)], env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "raw").glob("*.json"))) < 3 if (out / "raw").exists() else time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    done_before = len(list((out / "raw").glob("*.json")))
    assert 0 < done_before < 60
    rerun = subprocess.run([sys.executable, *_index_cmd(world, big_corpus, out)], env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _npy_bytes(out) == _npy_bytes(reference)
    assert (out / "docs.jsonl").read_text() == (reference / "docs.jsonl").read_text()
    assert not list(out.rglob("*.tmp-*"))


def test_rerun_with_other_arguments_is_refused(world, big_corpus, tmp_path):
    out = tmp_path / "index"
    out.mkdir()
    (out / "build.json").write_text(json.dumps({"seed": 123}))
    proc = subprocess.run([sys.executable, *_index_cmd(world, big_corpus, out)], env=_env(), capture_output=True, text=True)
    assert proc.returncode != 0 and "different arguments" in proc.stderr and proc.stderr.count("\n") == 1
    proc = subprocess.run([sys.executable, *_index_cmd(world, big_corpus, out, "--overwrite")], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # --overwrite replaced the planted build: this run's options, every document indexed
    assert json.loads((out / "build.json").read_text())["seed"] == 0
    assert json.loads((out / "manifest.json").read_text())["n_docs"] == 120


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_torchrun_build_equals_one_process(world, big_corpus, tmp_path):
    # float32 vectors: the all-reduced R sums differ from the one-process sums in the last bits, which
    # could flip an fp16 rounding; the raw shards are compared byte for byte.
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *_index_cmd(world, big_corpus, one, "--dtype", "float32")], check=True, env=_env())
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", *_index_cmd(world, big_corpus, two, "--dtype", "float32")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert (one / "docs.jsonl").read_text() == (two / "docs.jsonl").read_text()
    assert {k: v for k, v in _npy_bytes(one).items() if k.startswith("raw")} == {
        k: v for k, v in _npy_bytes(two).items() if k.startswith("raw")
    }
    vectors = sorted((one / "vectors").glob("*.npy"))
    assert len(vectors) == 60
    for a in vectors:
        np.testing.assert_allclose(np.load(a), np.load(two / "vectors" / a.name), atol=1e-5)
    assert m1["preconditioner"]["lambda"] == pytest.approx(m2["preconditioner"]["lambda"], rel=1e-6)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_torchrun_query_equals_one_process(world, big_corpus, tmp_path):
    index = tmp_path / "index"
    subprocess.run([sys.executable, *_index_cmd(world, big_corpus, index)], check=True, env=_env())
    args = ["-m", "tracestar", "query", "--index", str(index), "--queries", str(world["queries"]), "--top-k", "5"]
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.jsonl")], check=True, env=_env())
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", *args, "--out", str(tmp_path / "two.jsonl")],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [[p["doc_id"] for p in r["proponents"]] for r in one] == [[p["doc_id"] for p in r["proponents"]] for r in two]
    assert [[p["doc_id"] for p in r["opponents"]] for r in one] == [[p["doc_id"] for p in r["opponents"]] for r in two]
    for r1, r2 in zip(one, two):
        np.testing.assert_allclose([p["score"] for p in r1["proponents"]], [p["score"] for p in r2["proponents"]], atol=1e-6)
