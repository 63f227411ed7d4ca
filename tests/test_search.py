"""Search at scale: exact streaming top-k, distributed merge, int8 / PQ compression with re-ranking."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tracestar.errors import IndexStoreError
from tracestar.index import store as st
from tracestar.index.compress import (
    _int8_chunk_scores,
    compress,
    dequantize_int8,
    int8_query_terms,
    quantize_int8,
    search,
    search_compressed,
)
from tracestar.index.search import brute_force, exact_scores, topk, topk_distributed
from tracestar.index.store import IndexStore

D = 256


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_index(path: Path, x: np.ndarray, dtype: str = "float16", shard_docs: int = 100) -> IndexStore:
    path.mkdir(parents=True, exist_ok=True)
    n, d = x.shape
    shards = []
    for s, lo in enumerate(range(0, n, shard_docs)):
        blk = x[lo : lo + shard_docs]
        sha = st.write_shard(path, "vectors", s, st.encode_dtype(blk, dtype))
        shards.append({"name": st.shard_name(s), "start": lo, "rows": len(blk), "raw_sha256": None, "vectors_sha256": sha})
    with open(path / st.DOCS, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"row": i, "doc_id": f"doc{i}", "n_tokens": 5, "truncated": False}) + "\n")
    st.write_manifest(path, {"dim": d, "dtype": dtype, "unit_norm": True, "n_docs": n, "shard_docs": shard_docs, "shards": shards})
    return IndexStore(path)


def clustered(n: int, n_q: int, seed: int = 0, clusters: int = 40, noise: float = 0.7):
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((clusters, D))
    x = unit(cent[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, D)))
    q = unit(x[rng.integers(0, n, n_q)] + 0.5 * rng.standard_normal((n_q, D)))
    return x, q


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(s)) / len(s) for r, s in zip(a, b)]))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return unit(rng.standard_normal((750, D))), unit(rng.standard_normal((6, D)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_topk_equals_brute_force(tmp_path, data, dtype):
    x, q = data
    store = make_index(tmp_path / "idx", x, dtype, shard_docs=200)
    bf = brute_force(store, q)
    order = np.argsort(-bf, axis=1, kind="stable")
    for chunk in (None, 7, 64, 1000):
        r = topk(store, q, 10, chunk_rows=chunk)
        assert r.prop_rows.dtype == np.int64 and r.prop_scores.dtype == np.float32
        np.testing.assert_array_equal(r.prop_rows, order[:, :10])
        np.testing.assert_allclose(r.prop_scores, np.take_along_axis(bf, order[:, :10], 1), atol=1e-5)
        np.testing.assert_array_equal(r.opp_rows, order[:, ::-1][:, :10])
        np.testing.assert_allclose(r.opp_scores, np.take_along_axis(bf, order[:, ::-1][:, :10], 1), atol=1e-5)
        assert (np.diff(r.prop_scores, axis=1) <= 0).all() and (np.diff(r.opp_scores, axis=1) >= 0).all()


def test_stored_dtype_close_to_float32(tmp_path, data):
    x, q = data
    exact = q @ x.T
    for dtype in ("float16", "bfloat16"):
        store = make_index(tmp_path / dtype, x, dtype, shard_docs=300)
        r = topk(store, q, 5)
        np.testing.assert_allclose(r.prop_scores, np.take_along_axis(exact, r.prop_rows, 1), atol=1e-3)


def test_k_larger_than_rows_returns_all(tmp_path):
    x, q = clustered(37, 3)
    store = make_index(tmp_path / "idx", x, "bfloat16", shard_docs=10)
    r = topk(store, q, 100)
    assert r.prop_rows.shape == (3, 37) and r.opp_rows.shape == (3, 37)
    for row in r.prop_rows:
        assert sorted(row.tolist()) == list(range(37))
    np.testing.assert_array_equal(r.opp_rows, r.prop_rows[:, ::-1])
    assert topk(store, q, 0).prop_rows.shape == (3, 0)


def test_corrupted_shard_raises(tmp_path, data):
    x, q = data
    store = make_index(tmp_path / "idx", x, "float16", shard_docs=200)
    path = st.shard_path(store.path, "vectors", 2)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexStoreError, match="checksum"):
        topk(IndexStore(store.path), q, 5)


def test_exact_scores_gathers_rows(tmp_path, data):
    x, q = data
    store = make_index(tmp_path / "idx", x, "float16", shard_docs=200)
    rows = np.array([[0, 749, 5, -1]] * len(q))
    s = exact_scores(store, q, rows)
    bf = brute_force(store, q)
    np.testing.assert_allclose(s[:, :3], bf[:, [0, 749, 5]], atol=1e-5)
    assert np.isneginf(s[:, 3]).all()


def test_int8_round_trip():
    x, _ = clustered(200, 1)
    codes, scales = quantize_int8(x)
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (200, 1)
    err = np.abs(dequantize_int8(codes, scales) - x)
    assert (err <= scales / 2 + 1e-7).all()
    assert np.abs(codes).max() == 127
    c0, s0 = quantize_int8(np.zeros((2, 8), np.float32))
    assert (c0 == 0).all() and (s0 == 0).all()


def test_int8_groups_give_a_small_block_its_own_scale():
    """A block 10× smaller than the rest keeps its precision with a scale of its own."""
    x, _ = clustered(200, 1)
    x[:, :16] *= 0.1
    groups = [(0, 16), (16, D - 16)]
    codes, scales = quantize_int8(x, groups)
    assert scales.shape == (200, 2)
    err = np.abs(dequantize_int8(codes, scales, groups) - x)
    assert (err[:, :16] <= scales[:, :1] / 2 + 1e-7).all() and (err[:, 16:] <= scales[:, 1:] / 2 + 1e-7).all()
    row_wide = np.abs(dequantize_int8(*quantize_int8(x)) - x)[:, :16]
    assert err[:, :16].mean() < 0.3 * row_wide.mean()


def test_int8_scores_match_float_math():
    """Integer matmul scores = dequantized codes · (two-term query), to float rounding."""
    x, q = clustered(300, 6)
    groups = [(0, 20), (20, D - 20)]
    codes, scales = quantize_int8(x, groups)
    q_codes, q_scales = int8_query_terms(q)
    n = len(q)
    q_back = (q_codes[:n].double() * q_scales[:n, None].double() + q_codes[n:].double() * q_scales[n:, None].double())
    assert (q_back - torch.from_numpy(q).double()).abs().max() < 1e-4 * np.abs(q).max()
    got = _int8_chunk_scores(torch.from_numpy(codes), torch.from_numpy(scales), q_codes.T, q_scales, groups)
    want = q_back.numpy() @ dequantize_int8(codes, scales, groups).astype(np.float64).T
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    import tracestar.index.compress as comp  # a torch build without an int8 gemm: same numbers

    saved, comp._HAS_INT_MM = comp._HAS_INT_MM, False
    try:
        fallback = _int8_chunk_scores(torch.from_numpy(codes), torch.from_numpy(scales), q_codes.T, q_scales, groups)
    finally:
        comp._HAS_INT_MM = saved
    torch.testing.assert_close(fallback, got, rtol=1e-6, atol=1e-7)


def test_int8_compress_search_and_rerank(tmp_path):
    x, q = clustered(1200, 8)
    store = make_index(tmp_path / "idx", x, "float16", shard_docs=500)
    ex = topk(store, q, 10)
    entry = compress(store.path, "int8")
    man = json.loads((store.path / "manifest.json").read_text())
    assert man["compressed"]["default"] == "int8" and man["compressed"]["exact_dropped"] is False
    assert entry["bytes_per_doc"] == D + 4 * len(entry["groups"]) and len(entry["shards"]) == 3
    assert (store.path / "compressed/int8/shard-00000.npy").exists()
    store = IndexStore(store.path)
    approx = search_compressed(store, q, 10, rerank=0)
    assert overlap(approx.prop_rows, ex.prop_rows) >= 0.9
    r = search(store, q, 10)  # compressed + exact re-rank
    np.testing.assert_array_equal(r.prop_rows, ex.prop_rows)
    np.testing.assert_allclose(r.prop_scores, ex.prop_scores, atol=1e-6)
    np.testing.assert_array_equal(r.opp_rows, ex.opp_rows)
    r2 = search(store, q, 10, exact=True)
    np.testing.assert_array_equal(r2.prop_rows, ex.prop_rows)


def test_int8_breaks_ties_between_duplicates_like_exact_search(tmp_path):
    """Duplicate documents tie in both searches; both keep the lowest rows, as a stable sort does."""
    x, _ = clustered(400, 1, seed=5)
    x[100:] = np.repeat(x[:10], 30, axis=0)  # 31 identical copies of each of rows 0..9
    q = x[:10].copy()  # each query's best score is shared by 31 rows, more than k
    store = make_index(tmp_path / "idx", x, "float16", shard_docs=150)
    ex = topk(store, q, 10)
    for i in range(10):
        assert sorted(ex.prop_rows[i].tolist()) == [i] + list(range(100 + 30 * i, 109 + 30 * i))
    compress(store.path, "int8")
    approx = search_compressed(IndexStore(store.path), q, 10, rerank=0)
    np.testing.assert_array_equal(np.sort(approx.prop_rows, 1), np.sort(ex.prop_rows, 1))
    compress(store.path, "pq", m=16, niter=2)
    for form, n in (("int8", 60), ("pq", 400)):  # re-ranked: exact scores tie, whatever order the codes gave
        reranked = search_compressed(IndexStore(store.path), q, 10, rerank=n, form=form)
        np.testing.assert_array_equal(reranked.prop_rows, ex.prop_rows)
        np.testing.assert_array_equal(reranked.opp_rows, ex.opp_rows)


def test_int8_groups_follow_projection_blocks_and_old_entries_still_load(tmp_path):
    x, q = clustered(300, 4)
    store = make_index(tmp_path / "idx", x, "float16", shard_docs=300)
    man = json.loads((store.path / "manifest.json").read_text())
    man["projection"] = {"blocks": [{"name": f"b{i}", "k": 8, "params": [], "offset": 64 * i} for i in range(4)]}
    st.write_manifest(store.path, man)
    entry = compress(store.path, "int8")
    assert entry["groups"] == [[0, 64], [64, 64], [128, 64], [192, 64]] and entry["bytes_per_doc"] == D + 16
    store = IndexStore(store.path)
    new = search_compressed(store, q, 5, rerank=0)
    # an entry written before groups existed: one row-wide scale, 1-D scales file
    man = json.loads((store.path / "manifest.json").read_text())
    e = man["compressed"]["int8"]
    del e["groups"]
    codes, scales = quantize_int8(x)
    e["shards"][0]["codes_sha256"] = st.write_array(store.path / "compressed/int8/shard-00000.npy", codes)
    e["shards"][0]["scales_sha256"] = st.write_array(store.path / "compressed/int8/scales-00000.npy", scales[:, 0])
    st.write_manifest(store.path, man)
    old = search_compressed(IndexStore(store.path), q, 5, rerank=0)
    assert overlap(old.prop_rows, new.prop_rows) >= 0.8
    np.testing.assert_allclose(old.prop_scores, new.prop_scores, atol=0.02)


def test_pq_recall_and_rerank(tmp_path):
    x, q = clustered(2000, 8, seed=3)
    store = make_index(tmp_path / "idx", x, "float16", shard_docs=1000)
    ex = topk(store, q, 10)
    entry = compress(store.path, "pq", niter=6)
    assert entry["m"] == D // 4 and entry["code_bytes_per_doc"] <= 2 * D // 4  # ≤ ¼ of fp16 bytes
    store = IndexStore(store.path)
    raw = search_compressed(store, q, 10, rerank=0, form="pq")
    assert overlap(raw.prop_rows, ex.prop_rows) >= 0.4
    rr = search_compressed(store, q, 10, form="pq")
    assert overlap(rr.prop_rows, ex.prop_rows) >= 0.95
    assert overlap(rr.opp_rows, ex.opp_rows) >= 0.95
    # re-ranking puts candidates in exact order with exact scores
    bf = brute_force(store, q)
    np.testing.assert_allclose(rr.prop_scores, np.take_along_axis(bf, rr.prop_rows, 1), atol=1e-5)
    assert (np.diff(rr.prop_scores, axis=1) <= 0).all() and (np.diff(rr.opp_scores, axis=1) >= 0).all()


def test_pq_corrupted_raises(tmp_path):
    x, q = clustered(600, 2)
    store = make_index(tmp_path / "idx", x, "float16", shard_docs=600)
    compress(store.path, "pq", m=32, niter=2)
    path = store.path / "compressed/pq.faiss"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexStoreError, match="checksum"):
        search(IndexStore(store.path), q, 3)


def test_drop_exact(tmp_path):
    x, q = clustered(400, 4)
    store = make_index(tmp_path / "idx", x, "bfloat16", shard_docs=150)
    ex = topk(store, q, 5)
    compress(store.path, "int8", drop_exact=True)
    store = IndexStore(store.path)
    assert not (store.path / "vectors").exists() and not store.has_kind("vectors")
    assert store.manifest["compressed"]["exact_dropped"] is True
    r = search(store, q, 5)
    assert overlap(r.prop_rows, ex.prop_rows) >= 0.9
    np.testing.assert_allclose(r.prop_scores, ex.prop_scores, atol=0.02)
    with pytest.raises(IndexStoreError, match="drop"):
        search(store, q, 5, exact=True)
    with pytest.raises(IndexStoreError):
        compress(store.path, "pq")


def test_cli_compress(tmp_path, capsys):
    from tracestar.cli import main

    x, _ = clustered(300, 1)
    store = make_index(tmp_path / "idx", x, "float16", shard_docs=100)
    assert main(["compress", "--index", str(store.path), "--kind", "int8"]) == 0
    assert "bytes/doc" in capsys.readouterr().out
    assert "int8" in IndexStore(store.path).manifest["compressed"]


# --- distributed: 2 gloo processes, one thread each ---------------------------------------------


def _dist_worker(rank: int, world: int, init_file: str, index_dir: str, q: np.ndarray, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        r = topk_distributed(IndexStore(index_dir), q, 7, chunk_rows=50)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(r, fh)
    finally:
        dist.destroy_process_group()


def test_distributed_equals_single_process(tmp_path, data):
    import torch.multiprocessing as mp

    x, q = data
    store = make_index(tmp_path / "idx", x, "bfloat16", shard_docs=100)  # 8 shards
    single = topk(store, q, 7)
    assert topk_distributed(store, q, 7).prop_rows.tolist() == single.prop_rows.tolist()  # no group: topk
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(store.path), q, str(out)), nprocs=2, join=True)
    for rank in range(2):
        with open(out / f"rank{rank}.pkl", "rb") as fh:
            r = pickle.load(fh)
        np.testing.assert_array_equal(r.prop_rows, single.prop_rows)
        np.testing.assert_array_equal(r.opp_rows, single.opp_rows)
        np.testing.assert_allclose(r.prop_scores, single.prop_scores, atol=1e-6)
        np.testing.assert_allclose(r.opp_scores, single.opp_scores, atol=1e-6)


# --- deferred re-score: ties, certificate fallback, non-unit vectors ------------------------------


def _assert_matches_brute_force(store: IndexStore, q: np.ndarray, k: int, **kw) -> None:
    bf = brute_force(store, q)
    order = np.argsort(-bf, axis=1, kind="stable")
    r = topk(store, q, k, **kw)
    np.testing.assert_array_equal(r.prop_rows, order[:, :k])
    np.testing.assert_allclose(r.prop_scores, np.take_along_axis(bf, order[:, :k], 1), atol=1e-5, rtol=1e-6)
    np.testing.assert_array_equal(r.opp_rows, order[:, ::-1][:, :k])
    np.testing.assert_allclose(r.opp_scores, np.take_along_axis(bf, order[:, ::-1][:, :k], 1), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_duplicate_rows_tie_like_a_stable_sort(tmp_path, data, dtype):
    x, q = data
    rng = np.random.default_rng(5)
    x = np.concatenate([x[:300], x[rng.integers(0, 300, 300)]])  # exact duplicates: equal scores
    store = make_index(tmp_path / "idx", x, dtype, shard_docs=128)
    for chunk in (None, 50):
        _assert_matches_brute_force(store, q, 12, chunk_rows=chunk)


def test_certificate_failure_rescans(tmp_path, data, monkeypatch):
    from tracestar.index import search as srch

    x, q = data
    store = make_index(tmp_path / "idx", x, "bfloat16", shard_docs=200)
    monkeypatch.setitem(srch._MARGIN, "bfloat16", 0)  # lists of exactly k: the band overflows them
    stats: dict = {}
    srch._scan(store, q, 10, list(range(len(store.shards))), kind="vectors", chunk_rows=64, verify=True, stats=stats)
    assert stats["rescanned_queries"] > 0
    _assert_matches_brute_force(store, q, 10, chunk_rows=64)
    monkeypatch.undo()
    stats = {}
    srch._scan(store, q, 10, list(range(len(store.shards))), kind="vectors", chunk_rows=None, verify=True, stats=stats)
    assert stats["rescanned_queries"] == 0 and stats["rescored_rows"] < stats["rows"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_non_unit_vectors_and_fp16_overflow(tmp_path, data, dtype):
    x, q = data
    rng = np.random.default_rng(7)
    scale = rng.uniform(0.5, 400.0, size=(len(x), 1)).astype(np.float32)  # 400² overflows fp16 scores
    store = make_index(tmp_path / "idx", x * scale, dtype, shard_docs=200)
    man = json.loads((store.path / "manifest.json").read_text())
    man["unit_norm"] = False
    st.write_manifest(store.path, man)
    store = IndexStore(store.path)
    for chunk in (None, 64):  # scores up to ~1e5: fp32 agreement is relative there
        _assert_matches_brute_force(store, q * 2000.0, 10, chunk_rows=chunk)
