"""Resumable and distributed builds produce the same index as one uninterrupted process; the int8
scan that large indexes are searched with gives pinned results however its rows are blocked."""

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
import torch

from tracestar import testing
from tracestar.index import int8, writer
from tracestar.index.canonical import exact_scores
from tracestar.index.compress import compress, dequantize_int8, quantize_int8
from tracestar.index.exact import topk
from tracestar.index.search import search_compressed
from tracestar.index.store import IndexStore


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


# --- the int8 scan -------------------------------------------------------------------------------

INT8_D = 224
INT8_GROUPS = [(0, 16), (16, 64), (80, 144)]  # projection blocks of k = 4, 8, 12 (k² columns each)


def _int8_index(tmp_path: Path, n: int, n_q: int, shard_docs: int) -> tuple[IndexStore, np.ndarray]:
    """An fp16 index of clustered unit rows whose projection blocks are INT8_GROUPS, int8-compressed."""
    x, q = testing.clustered(n, INT8_D, n_q, seed=4)
    store = testing.write_index(tmp_path / "idx", x, "float16", shard_docs=shard_docs)
    man = json.loads((store.path / "manifest.json").read_text())
    man["projection"] = {"blocks": [{"name": f"b{i}", "k": int(n**0.5), "params": [], "offset": o} for i, (o, n) in enumerate(INT8_GROUPS)]}
    writer.write_manifest(store.path, man)
    entry = compress(store.path, "int8")
    assert entry["groups"] == [list(g) for g in INT8_GROUPS]
    return IndexStore(store.path), q


def test_int8_scores_are_the_dequantized_dot_products_in_every_row_block():
    """Scores = a·c · dequantized codes to float32 rounding, bit-identical wherever a row sits.

    300 queries make the scan score 218 rows at a time, so the 1,000 rows span five blocks; a
    permutation moves every row to another block and position.
    """
    x, q = testing.clustered(1000, INT8_D, 300, seed=2)
    codes, scales = quantize_int8(x, INT8_GROUPS)
    q_codes, q_scales = int8.int8_query(q)
    assert int8._SCORE_BLOCK_BYTES // (4 * len(q)) < len(x) // 4
    parts = int8.query_parts(q_codes, INT8_GROUPS)
    got = int8._int8_chunk_scores(torch.from_numpy(codes), torch.from_numpy(scales), parts, q_scales)  # [Q, n]
    q_hat = q_codes.double().numpy() * q_scales.double().numpy()[:, None]
    want = q_hat @ dequantize_int8(codes, scales, INT8_GROUPS).astype(np.float64).T
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
    # the query's own rounding is at most half its step, so the scores stay close to the float ones
    assert np.abs(q_hat - q).max() <= q_scales.max().item() / 2 * 1.001
    assert np.abs(got.numpy() - q @ x.T).max() < 0.01
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    moved = int8._int8_chunk_scores(torch.from_numpy(codes)[perm], torch.from_numpy(scales)[perm], parts, q_scales)
    assert torch.equal(moved, got[:, perm])


def test_int8_search_is_pinned_to_the_exact_top_k_for_any_chunking(tmp_path):
    """Re-ranked int8 results equal the exact search's rows and scores, whatever the chunk size;
    the approximate lists (no re-rank) do not depend on it either."""
    store, q = _int8_index(tmp_path, 2400, 40, shard_docs=700)
    ex = topk(store, q, 10)
    first = None
    for chunk_rows in (None, 1000, 333, 64):  # 1,000 and 333: scores collected across shard boundaries
        r = search_compressed(store, q, 10, chunk_rows=chunk_rows)
        np.testing.assert_array_equal(r.prop_rows, ex.prop_rows)
        np.testing.assert_array_equal(r.opp_rows, ex.opp_rows)
        np.testing.assert_array_equal(r.prop_scores, ex.prop_scores)
        np.testing.assert_array_equal(r.opp_scores, ex.opp_scores)
        approx = search_compressed(store, q, 10, rerank=0, chunk_rows=chunk_rows)
        if first is None:
            first = approx
            overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.prop_rows, ex.prop_rows)])
            assert overlap >= 0.9
            assert np.abs(approx.prop_scores - ex.prop_scores).max() < 0.01
        np.testing.assert_array_equal(approx.prop_rows, first.prop_rows)
        np.testing.assert_array_equal(approx.prop_scores, first.prop_scores)


def test_a_re_rank_across_many_shards_maps_each_shard_once(tmp_path, monkeypatch):
    """Queries that each gather rows from every one of 130 shards open each shard's map once per
    store: an LRU smaller than the shards a query touches would reopen all of them per query."""
    x, q = testing.clustered(130 * 4, 32, 6, seed=1)
    store = IndexStore(testing.write_index(tmp_path / "idx", x, "float16", shard_docs=4).path)
    opened: list[int] = []
    real = IndexStore.load_shard

    def counting(self, kind, shard_no, **kw):
        opened.append(shard_no)
        return real(self, kind, shard_no, **kw)

    monkeypatch.setattr(IndexStore, "load_shard", counting)
    rows = np.tile(np.arange(0, 130 * 4, 3), (len(q), 1))  # [Q, 174]: rows of every shard, per query
    got = exact_scores(store, q, rows)
    assert set(opened) == set(range(130)) and len(opened) < 2 * 130  # (threads may race to a first open)
    np.testing.assert_allclose(got, np.einsum("qd,qnd->qn", q, x[rows].astype(np.float16).astype(np.float32)), atol=1e-5)
