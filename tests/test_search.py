"""Search at scale: exact streaming top-k, distributed merge, int8 / PQ compression with re-ranking."""

from __future__ import annotations

import json
import os
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch

from tracestar import files, testing
from tracestar.errors import IndexStoreError
from tracestar.index import store as st
from tracestar.index import writer
from tracestar.index.canonical import brute_force, exact_scores
from tracestar.index.compress import compress, dequantize_int8, quantize_int8
from tracestar.index.exact import topk, topk_distributed
from tracestar.index.int8 import _int8_chunk_scores, int8_query, query_parts
from tracestar.index.search import search, search_compressed
from tracestar.index.store import IndexStore
from tracestar.testing import unit, write_index

D = 256


def clustered(n: int, n_q: int, seed: int = 0, clusters: int = 40, noise: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    return testing.clustered(n, D, n_q, seed=seed, clusters=clusters, noise=noise)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(s)) / len(s) for r, s in zip(a, b)]))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return unit(rng.standard_normal((750, D))), unit(rng.standard_normal((6, D)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_topk_equals_brute_force(tmp_path, data, dtype):
    x, q = data
    store = write_index(tmp_path / "idx", x, dtype, shard_docs=200)
    bf = brute_force(store, q)
    decoded = st.as_float32(st.encode_dtype(x, dtype), dtype).astype(np.float64)
    np.testing.assert_allclose(bf, q.astype(np.float64) @ decoded.T, rtol=1e-6, atol=1e-9)  # exact dot products
    order = np.argsort(-bf, axis=1, kind="stable")
    for chunk in (None, 7, 64, 1000):
        r = topk(store, q, 10, chunk_rows=chunk)
        assert r.prop_rows.dtype == np.int64 and r.prop_scores.dtype == np.float32
        np.testing.assert_array_equal(r.prop_rows, order[:, :10])
        np.testing.assert_array_equal(r.prop_scores, np.take_along_axis(bf, order[:, :10], 1))  # the same bits
        np.testing.assert_array_equal(r.opp_rows, order[:, ::-1][:, :10])
        np.testing.assert_array_equal(r.opp_scores, np.take_along_axis(bf, order[:, ::-1][:, :10], 1))
        assert (np.diff(r.prop_scores, axis=1) <= 0).all() and (np.diff(r.opp_scores, axis=1) >= 0).all()


def test_stored_dtype_close_to_float32(tmp_path, data):
    x, q = data
    exact = q @ x.T
    for dtype in ("float16", "bfloat16"):
        store = write_index(tmp_path / dtype, x, dtype, shard_docs=300)
        r = topk(store, q, 5)
        np.testing.assert_allclose(r.prop_scores, np.take_along_axis(exact, r.prop_rows, 1), atol=1e-3)


def test_k_larger_than_rows_returns_all(tmp_path):
    x, q = clustered(37, 3)
    store = write_index(tmp_path / "idx", x, "bfloat16", shard_docs=10)
    r = topk(store, q, 100)
    assert r.prop_rows.shape == (3, 37) and r.opp_rows.shape == (3, 37)
    for row in r.prop_rows:
        assert sorted(row.tolist()) == list(range(37))
    np.testing.assert_array_equal(r.opp_rows, r.prop_rows[:, ::-1])
    assert topk(store, q, 0).prop_rows.shape == (3, 0)


def test_corrupted_shard_raises(tmp_path, data):
    x, q = data
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=200)
    path = writer.shard_path(store.path, "vectors", 2)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexStoreError, match="checksum"):
        topk(IndexStore(store.path), q, 5)


def test_exact_scores_gathers_rows(tmp_path, data):
    x, q = data
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=200)
    rows = np.array([[0, 749, 5, -1, 0]] * len(q))
    s = exact_scores(store, q, rows)
    bf = brute_force(store, q)
    np.testing.assert_array_equal(s[:, [0, 1, 2, 4]], bf[:, [0, 749, 5, 0]])  # canonical: the same bits
    assert np.isneginf(s[:, 3]).all()
    with pytest.raises(ValueError, match="< 750"):
        exact_scores(store, q, np.array([[750]] * len(q)))


def test_gather_reads_given_rows_in_any_order_across_shards(tmp_path, data):
    x, _ = data
    store = write_index(tmp_path / "idx", x, "bfloat16", shard_docs=128)  # 6 shards
    rows = np.array([700, 3, 3, 129, 0, 749, 256, 127, 128])  # unsorted, repeated, on shard edges
    want = st.as_float32(st.encode_dtype(x[rows], "bfloat16"), "bfloat16")
    np.testing.assert_array_equal(st.as_float32(store.gather("vectors", rows), "bfloat16"), want)
    one_shard = st.as_float32(store.gather("vectors", [140, 130]), "bfloat16")
    np.testing.assert_array_equal(one_shard, st.as_float32(st.encode_dtype(x[[140, 130]], "bfloat16"), "bfloat16"))
    assert store.gather("vectors", np.array([], np.int64)).shape == (0, D)
    with pytest.raises(IndexError, match="row 750 is outside"):
        store.gather("vectors", [5, 750])


def test_each_file_is_hashed_once_per_store(tmp_path, data, monkeypatch):
    """Scans, re-scores and the compressed readers share one checksum cache (`IndexStore.verify_file`)."""
    x, q = data
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=200)  # 4 shards
    compress(store.path, "int8")
    store = IndexStore(store.path)
    hashed: list[str] = []
    real = st.sha256_file
    monkeypatch.setattr(st, "sha256_file", lambda path: hashed.append(os.path.basename(path)) or real(path))
    for _ in range(2):
        topk(store, q, 5)
        exact_scores(store, q, np.array([[0, 300, 700]] * len(q)))
        search(store, q, 5)  # int8 candidates, re-scored from vectors/
    assert sorted(hashed) == sorted([f"shard-0000{i}.npy" for i in range(4)] * 2 + [f"scales-0000{i}.npy" for i in range(4)])
    path = writer.shard_path(store.path, "vectors", 1)
    path.write_bytes(path.read_bytes()[:-8] + bytes(8))
    topk(store, q, 5)  # this store checked it already
    with pytest.raises(IndexStoreError, match="shard-00001.npy: checksum mismatch — the shard is corrupted"):
        topk(IndexStore(store.path), q, 5)


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
    """Integer matmul scores = dequantized codes · dequantized query, to float rounding."""
    x, q = clustered(300, 6)
    groups = [(0, 20), (20, D - 20)]
    codes, scales = quantize_int8(x, groups)
    q_codes, q_scales = int8_query(q)
    parts = query_parts(q_codes, groups)
    q_back = q_codes.double() * q_scales[:, None].double()
    assert (q_back - torch.from_numpy(q).double()).abs().max() <= q_scales.double().max() / 2 * 1.001
    got = _int8_chunk_scores(torch.from_numpy(codes), torch.from_numpy(scales), parts, q_scales)
    want = q_back.numpy() @ dequantize_int8(codes, scales, groups).astype(np.float64).T
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    import tracestar.index.int8 as comp  # a torch build without an int8 gemm: the same bits

    saved, comp._HAS_INT_MM = comp._HAS_INT_MM, False
    try:
        fallback = _int8_chunk_scores(torch.from_numpy(codes), torch.from_numpy(scales), parts, q_scales)
    finally:
        comp._HAS_INT_MM = saved
    assert torch.equal(fallback, got)
    # a row's score does not depend on where it sits in the chunk (duplicates tie exactly)
    perm = torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))
    moved = _int8_chunk_scores(torch.from_numpy(codes)[perm], torch.from_numpy(scales)[perm], parts, q_scales)
    assert torch.equal(moved, got[:, perm])


def test_int8_compress_search_and_rerank(tmp_path):
    x, q = clustered(1200, 8)
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=500)
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
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=150)
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
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=300)
    man = json.loads((store.path / "manifest.json").read_text())
    man["projection"] = {"blocks": [{"name": f"b{i}", "k": 8, "params": [], "offset": 64 * i} for i in range(4)]}
    writer.write_manifest(store.path, man)
    entry = compress(store.path, "int8")
    assert entry["groups"] == [[0, 64], [64, 64], [128, 64], [192, 64]] and entry["bytes_per_doc"] == D + 16
    store = IndexStore(store.path)
    new = search_compressed(store, q, 5, rerank=0)
    # an entry written before groups existed: one row-wide scale, 1-D scales file
    man = json.loads((store.path / "manifest.json").read_text())
    e = man["compressed"]["int8"]
    del e["groups"]
    codes, scales = quantize_int8(x)
    e["shards"][0]["codes_sha256"] = files.write_npy(store.path / "compressed/int8/shard-00000.npy", codes)
    e["shards"][0]["scales_sha256"] = files.write_npy(store.path / "compressed/int8/scales-00000.npy", scales[:, 0])
    writer.write_manifest(store.path, man)
    old = search_compressed(IndexStore(store.path), q, 5, rerank=0)
    assert overlap(old.prop_rows, new.prop_rows) >= 0.8
    np.testing.assert_allclose(old.prop_scores, new.prop_scores, atol=0.02)


def test_pq_recall_and_rerank(tmp_path):
    x, q = clustered(2000, 8, seed=3)
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=1000)
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


def test_ivf_pq_trains_writes_and_searches(tmp_path):
    """An inverted file (`nlist`, the default above IVF_MIN_ROWS rows) over the PQ codes: written,
    read back with its nprobe, and its re-ranked candidates carry exact scores."""
    x, q = clustered(2000, 8, seed=3)
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=1000)
    ex = topk(store, q, 10)
    entry = compress(store.path, "pq", m=32, nlist=8, niter=4)
    assert (entry["faiss"], entry["nlist"], entry["nprobe"]) == ("IndexIVFPQ", 8, 1)
    assert entry["bytes_per_doc"] == 32 + 8  # codes + the inverted list's int64 id
    store = IndexStore(store.path)
    rr = search(store, q, 10)
    # one probed list of 8 holds a few of the exact top 10 (0.28–0.51 over seeds 0–3; chance: 0.005)
    assert (rr.prop_rows >= 0).all() and overlap(rr.prop_rows, ex.prop_rows) >= 0.2
    bf = brute_force(store, q)
    np.testing.assert_array_equal(rr.prop_scores, np.take_along_axis(bf, rr.prop_rows, 1))


def test_pq_corrupted_raises(tmp_path):
    x, q = clustered(600, 2)
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=600)
    compress(store.path, "pq", m=32, niter=2)
    path = store.path / "compressed/pq.faiss"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexStoreError, match="checksum"):
        search(IndexStore(store.path), q, 3)


def test_drop_exact(tmp_path):
    x, q = clustered(400, 4)
    store = write_index(tmp_path / "idx", x, "bfloat16", shard_docs=150)
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
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=100)
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
    store = write_index(tmp_path / "idx", x, "bfloat16", shard_docs=100)  # 8 shards
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
    store = write_index(tmp_path / "idx", x, dtype, shard_docs=128)
    for chunk in (None, 50):
        _assert_matches_brute_force(store, q, 12, chunk_rows=chunk)


def test_certificate_failure_rescans(tmp_path, data, monkeypatch):
    from tracestar.index import exact as srch

    x, q = data
    store = write_index(tmp_path / "idx", x, "bfloat16", shard_docs=200)
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
    store = write_index(tmp_path / "idx", x * scale, dtype, shard_docs=200)
    man = json.loads((store.path / "manifest.json").read_text())
    man["unit_norm"] = False
    writer.write_manifest(store.path, man)
    store = IndexStore(store.path)
    for chunk in (None, 64):  # scores up to ~1e5: fp32 agreement is relative there
        _assert_matches_brute_force(store, q * 2000.0, 10, chunk_rows=chunk)


# --- canonical scores: duplicates tie wherever they sit, on any BLAS ------------------------------


def _f32_nearest(v: Fraction) -> np.float32:
    """The float32 nearest to an exact rational (ties to even), by comparing the neighbours exactly."""
    c = np.float32(float(v))
    near = [np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))]
    return min(near, key=lambda z: (abs(Fraction(float(z)) - v), int(np.array(z).view(np.uint32)) & 1))


def _exact_oracle(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[Q, n] float32 roundings of the exact rational dot products (slow; small inputs)."""
    return np.array([[_f32_nearest(sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(qi, xj)))
                      for xj in x] for qi in q], dtype=np.float32)


def _midpoint_rows(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries and float32 rows whose exact dot products sit on, or 2^-60 beside, a float32 midpoint:
    the float64 dot product then lands on the midpoint and its float32 rounding is a coin toss."""
    q = np.zeros((2, d), np.float32)
    q[0, :3], q[1, :3] = [1, 1, 1], [1, 1, 3]
    x = np.zeros((5, d), np.float32)
    x[0, :2] = [1, 2**-24]  # 1 + 2^-24: exactly between 1 and 1 + 2^-23 → 1 (even)
    x[1, :3] = [1, 2**-24, 2**-60]  # just above → 1 + 2^-23
    x[2, :3] = [1, 2**-24, -(2**-60)]  # just below → 1
    x[3, :2] = [1 + 2**-23, 2**-24]  # between 1 + 2^-23 and 1 + 2^-22 → 1 + 2^-22 (even)
    x[4, :3] = [1, 2**-24, 2**-62]
    return q, x


def _noisy_dots(srch, orig):
    """`_f64_dots` with position-dependent noise as large as its error bound allows (γ_D·‖q‖·‖x‖):
    what a BLAS whose rounding depends on a row's place in a kernel tile may legally return."""

    def dots(q64: np.ndarray, x: np.ndarray) -> np.ndarray:
        f = orig(q64, x)
        bound = srch._gamma(q64.shape[1]) * np.outer(np.linalg.norm(q64, axis=1), np.linalg.norm(x.astype(np.float64), axis=1))
        wobble = (np.arange(f.shape[1]) % 5 - 2) / 2.0  # −1 … 1 by the row's offset
        return f + bound * wobble

    return dots


def test_canonical_scores_round_the_exact_dot_product_once(monkeypatch):
    from tracestar.index import canonical as srch

    q_mid, x_mid = _midpoint_rows(64)
    rng = np.random.default_rng(3)
    q = np.concatenate([q_mid, rng.standard_normal((2, 64)).astype(np.float32)])
    x = np.concatenate([x_mid, rng.standard_normal((40, 64)).astype(np.float32)])
    want = _exact_oracle(q, x)
    assert want[0, 0] == 1 and want[0, 1] == np.float32(1 + 2**-23) and want[0, 3] == np.float32(1 + 2**-22)
    np.testing.assert_array_equal(srch.canonical_scores(q, x), want)
    naive = (q.astype(np.float64) @ x.astype(np.float64).T).astype(np.float32)
    assert (naive != want).any()  # a float64 dot product rounded to float32 is not enough
    # the same bits in any order and under BLAS noise up to the error bound (the noise alone flips
    # the float32 rounding of the midpoint rows, which the exact re-sum then settles)
    monkeypatch.setattr(srch, "_f64_dots", _noisy_dots(srch, srch._f64_dots))
    noisy = (srch._f64_dots(q.astype(np.float64), x[::-1].copy())).astype(np.float32)[:, ::-1]
    assert (noisy[:2, :5] != want[:2, :5]).any()
    for perm in (np.arange(len(x)), np.arange(len(x))[::-1], np.roll(np.arange(len(x)), 3)):
        np.testing.assert_array_equal(srch.canonical_scores(q, x[perm]), want[:, perm])
        np.testing.assert_array_equal(srch.canonical_scores(q, x[perm], x_norm=float(np.linalg.norm(x, axis=1).max())),
                                      want[:, perm])
    # float16 rows (widened exactly) and one query at a time (the scan's re-score path)
    x16 = rng.standard_normal((30, 64)).astype(np.float16)
    np.testing.assert_array_equal(srch.canonical_scores(q[2:3], x16), _exact_oracle(q[2:3], x16.astype(np.float32)))


def twins_layout(n: int, n_q: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows with exact copies at every offset mod 64, so at every place in a kernel tile; and,
    per query, a copy of its k-th proponent and of its k-th opponent elsewhere (before or after
    it, at another offset): each such pair straddles the top-k boundary, where only the tie rule
    decides which copy is returned."""
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, D)))
    q = unit(rng.standard_normal((n_q, D)))
    for r in range(64):
        dst = r + 64 * int(rng.integers(1, n // 64))
        x[dst] = x[(dst + int(rng.integers(1, 64))) % n]
    ranks = np.argsort(-(q.astype(np.float64) @ x.astype(np.float64).T), axis=1, kind="stable")
    busy = set(ranks[:, : 3 * k].ravel().tolist()) | set(ranks[:, -3 * k :].ravel().tolist())
    free = [i for i in range(n) if i not in busy]
    for i in range(n_q):
        for j, a in enumerate((ranks[i, k - 1], ranks[i, -k])):
            side = [f for f in free if (f < a) == ((i + j) % 2 == 0) and (f - a) % 64]  # before / after, another offset
            dst = side[int(rng.integers(0, len(side)))]
            free.remove(dst)
            x[dst] = x[a]
    return x, q


def _split_twins(bf: np.ndarray, k: int) -> int:
    """How many (query, side) lists have the k-th score shared with a row just outside the top k."""
    s = np.sort(bf, axis=1)
    return int((s[:, -k] == s[:, -k - 1]).sum() + (s[:, k - 1] == s[:, k]).sum())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_duplicates_tie_like_a_stable_sort_wherever_they_sit(tmp_path, monkeypatch, dtype):
    """Copies at every offset within chunks (odd and power-of-two chunk sizes) and shards (odd
    size, so shard starts move the offsets too), straddling the top-k boundary of every query."""
    from tracestar.index import exact as srch

    k = 8
    x, q = twins_layout(1100, 6, k, seed=11)
    store = write_index(tmp_path / "idx", x, dtype, shard_docs=333)
    assert _split_twins(brute_force(store, q), k) >= 8  # the boundary cuts through ties
    for chunk in (None, 37, 64, 200):
        _assert_matches_brute_force(store, q, k, chunk_rows=chunk)
    monkeypatch.setitem(srch._MARGIN, dtype, 0)  # lists of exactly k: the inline rescan decides
    stats: dict = {}
    srch._scan(store, q, k, list(range(len(store.shards))), kind="vectors", chunk_rows=37, verify=True, stats=stats)
    assert stats["rescanned_queries"] > 0
    for chunk in (37, 64):
        _assert_matches_brute_force(store, q, k, chunk_rows=chunk)


def test_position_dependent_blas_noise_changes_nothing(tmp_path, monkeypatch):
    """Simulates a CPU whose kernels round by a row's place in a tile: chunk scores move by a few
    float32 ulps and float64 dot products by up to their error bound, both by the row's offset.
    Every result keeps its bits, duplicates still tie like a stable sort, and so do the int8 and
    PQ re-ranks."""
    from tracestar.index import canonical
    from tracestar.index import exact as srch

    k = 8
    x, q = twins_layout(900, 5, k, seed=4)
    stores = {dt: write_index(tmp_path / dt, x, dt, shard_docs=301) for dt in ("float16", "bfloat16", "float32")}
    clean = {dt: brute_force(s, q) for dt, s in stores.items()}
    q_mid, x_mid = _midpoint_rows(D)  # and copies of rows whose float32 rounding is a coin toss
    mid = write_index(tmp_path / "mid", np.concatenate([x_mid, x[:61], x_mid, x[61:120], x_mid[::-1]]), "float32")
    mid_clean = brute_force(mid, q_mid)
    chunk_scores, f64_dots = srch.chunk_scores, canonical._f64_dots

    def noisy_chunk(q_low: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
        s = chunk_scores(q_low, xc)
        return s + s.abs() * ((torch.arange(s.shape[1]) % 7 - 3) * 2.0**-22)

    monkeypatch.setattr(srch, "chunk_scores", noisy_chunk)
    monkeypatch.setattr(canonical, "_f64_dots", _noisy_dots(canonical, f64_dots))
    for dt, store in stores.items():
        np.testing.assert_array_equal(brute_force(store, q), clean[dt])
        for chunk in (None, 37, 64):
            _assert_matches_brute_force(store, q, k, chunk_rows=chunk)
    np.testing.assert_array_equal(brute_force(mid, q_mid), mid_clean)
    _assert_matches_brute_force(mid, q_mid, 6, chunk_rows=16)
    assert _split_twins(mid_clean, 6) > 0
    store = stores["float16"]
    ex = topk(store, q, k)
    compress(store.path, "int8")
    compress(store.path, "pq", m=16, niter=2)
    for form in ("int8", "pq"):  # every row a candidate: the re-rank alone orders the twins
        r = search_compressed(IndexStore(store.path), q, k, rerank=len(x), form=form)
        np.testing.assert_array_equal(r.prop_rows, ex.prop_rows)
        np.testing.assert_array_equal(r.opp_rows, ex.opp_rows)
        np.testing.assert_array_equal(r.prop_scores, ex.prop_scores)
