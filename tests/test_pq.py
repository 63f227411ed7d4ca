"""PQ that scales with the dimension: parameters from (dim, rows), the binary form from 16,384
dims, FAISS PQ below with training on a seeded sample; candidates re-ranked exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tracestar.errors import IndexStoreError, UserError
from tracestar.index import compress as cz
from tracestar.index import pq as pqr
from tracestar.index import writer
from tracestar.index.canonical import brute_force
from tracestar.index.compress import compress, encode_binary, pq_params
from tracestar.index.exact import topk
from tracestar.index.search import search, search_compressed
from tracestar.index.store import IndexStore
from tracestar.testing import clustered, unit, write_index


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(s)) / len(s) for r, s in zip(a, b)]))


@pytest.mark.parametrize(
    "dim, rows, nbits, expected",
    [
        # dim/4 sub-quantizers while that is ≤ 4,096; plain PQ on all rows below 50k rows
        (256, 5_838, None, {"form": "pq", "m": 64, "nlist": 0, "nprobe": None, "train_rows": 5_838, "rerank": 100}),
        (1_000, 20_000, None, {"form": "pq", "m": 250, "nlist": 0, "nprobe": None, "train_rows": 10_240, "rerank": 100}),
        # IVF above 50k rows: the power of two nearest √rows, probed 1/16
        (1_024, 1_000_000, None, {"form": "ivfpq", "m": 256, "nlist": 1_024, "nprobe": 64, "train_rows": 40_960, "rerank": 100}),
        # from 16,384 dims the binary form, whatever the rows: nothing trained, flat, 400 re-ranked
        (16_384, 100_000, None, {"form": "binary", "m": 16_384, "nbits": 1, "nlist": 0, "train_rows": 0, "rerank": 400}),
        (65_536, 1_000_000, None, {"form": "binary", "m": 65_536, "nbits": 1, "nlist": 0, "train_rows": 0, "rerank": 400}),
        (64_980, 5_838, None, {"form": "binary", "m": 64_980, "nbits": 1, "nlist": 0, "train_rows": 0, "rerank": 400}),
        # asking for 8 bits there gives FAISS PQ: past 16,384 dims its sub-vectors grow and the
        # exact re-rank deepens with them
        (65_536, 5_838, 8, {"form": "pq", "m": 4_096, "nlist": 0, "nprobe": None, "train_rows": 5_838, "rerank": 400}),
        (49_152, 1_000, 8, {"form": "pq", "m": 4_096, "nlist": 0, "nprobe": None, "train_rows": 1_000, "rerank": 300}),
        (20_000, 1_000, 8, {"form": "pq", "m": 4_000, "nlist": 0, "nprobe": None, "train_rows": 1_000, "rerank": 100}),
        (16_384, 100_000, 8, {"form": "ivfpq", "m": 4_096, "nlist": 256, "nprobe": 16, "train_rows": 10_240, "rerank": 100}),
        # at 2^16 the 2 GiB float32 sample holds 8,192 rows, so 128 lists of ≥ 40 points each
        (65_536, 1_000_000, 8, {"form": "ivfpq", "m": 4_096, "nlist": 128, "nprobe": 8, "train_rows": 8_192, "rerank": 400}),
    ],
)
def test_pq_params_follow_the_dimension(dim, rows, nbits, expected):
    p = pq_params(dim, rows, nbits)
    assert {k: p[k] for k in expected} == expected
    assert dim % p["m"] == 0 and p["train_rows"] * 4 * dim <= cz.TRAIN_SAMPLE_BYTES
    if p["nlist"]:
        assert p["train_rows"] >= cz.TRAIN_PER_CENTROID * p["nlist"]
    if dim >= cz.BINARY_MIN_DIM:  # any FAISS option asks for FAISS
        assert pq_params(dim, rows, nlist=16)["form"] == "ivfpq" and pq_params(dim, rows, m=dim // 8)["form"] != "binary"


def test_pq_training_sample_is_seeded_and_bounded(tmp_path, monkeypatch):
    """Training reads a seeded sample, never more than the byte cap: the same seed gives the same
    file bytes twice, another seed other codebooks."""
    x, _ = clustered(1500, 128, 1, seed=4, clusters=16)
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=400)
    monkeypatch.setattr(cz, "TRAIN_SAMPLE_BYTES", 600 * 4 * 128)  # room for 600 of the 1,500 rows
    shas = []
    for seed in (7, 7, 8):
        e = compress(store.path, "pq", niter=3, seed=seed)
        assert (e["train_rows"], e["m"], e["nlist"]) == (600, 32, None)
        shas.append(e["sha256"])
    assert shas[0] == shas[1] != shas[2]
    sample = cz._sample_rows(IndexStore(store.path), 600, 7, verify=True)
    again = cz._sample_rows(IndexStore(store.path), 600, 7, verify=True)
    np.testing.assert_array_equal(sample, again)
    # the sample is 600 distinct stored rows, not the first 600
    stored = x.astype(np.float16).astype(np.float32)
    hits = [np.flatnonzero((stored == row).all(axis=1)) for row in sample]
    rows = np.concatenate(hits)
    assert len(np.unique(rows)) == 600 and rows.max() >= 600


@pytest.mark.parametrize("max_m, bound", [(cz.PQ_MAX_M, 0.97), (128, 0.95)])
def test_pq_rerank_overlaps_exact_top10(tmp_path, monkeypatch, max_m, bound):
    """On a clustered 2,048-dim index, PQ candidates re-ranked exactly share ≥ `bound` of the exact
    top 10, with the exact scores. With sub-quantizers capped at 128 (16 dims each, as 2^16 dims
    get at 4,096) the recorded re-rank depth is 400, and it is what keeps the overlap up: measured
    0.99 with it, 0.80–0.88 with 100 candidates (seeds 5–7); at 4 dims per sub-vector 0.99–1.0."""
    monkeypatch.setattr(cz, "PQ_MAX_M", max_m)
    x, q = clustered(2000, 2048, 24, seed=5, clusters=32, noise=0.9)
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=700)
    ex = topk(store, q, 10)
    e = compress(store.path, "pq", niter=4)
    assert (e["m"], e["rerank"]) == (min(512, max_m), 100 * max(1, 2048 // max_m // 4))
    store = IndexStore(store.path)
    rr = search_compressed(store, q, 10, form="pq")
    assert overlap(rr.prop_rows, ex.prop_rows) >= bound
    assert overlap(rr.opp_rows, ex.opp_rows) >= bound
    raw = search_compressed(store, q, 10, form="pq", rerank=0)
    assert overlap(raw.prop_rows, ex.prop_rows) < 0.9  # the codes alone do not order the top 10
    bf = brute_force(store, q)
    np.testing.assert_array_equal(rr.prop_scores, np.take_along_axis(bf, rr.prop_rows, 1))
    if max_m == 128:  # the depth is what does it
        shallow = search_compressed(store, q, 10, form="pq", rerank=100)
        assert overlap(shallow.prop_rows, ex.prop_rows) < overlap(rr.prop_rows, ex.prop_rows)


def _faiss_index(x: np.ndarray, m: int, nlist: int):
    import faiss

    index, _ = cz._trained_pq(faiss, x[:1500], m, 8, nlist, None, niter=3, seed=0)
    return faiss, index


@pytest.mark.parametrize("m, nlist", [(128, 0), (32, 0), (64, 16)])  # 4 and 16 dims per sub-vector; IVF
def test_torch_pq_codes_are_faiss_codes(m, nlist):
    """The codes `compress` hands FAISS are FAISS's own `sa_encode` codes, except where two centroids
    (or coarse centroids) are equally near within float32 rounding; and codes handed over with
    `add_sa_codes` make the same index as FAISS's `add`."""
    x, _ = clustered(3000, 512, 1, seed=3, clusters=16)
    faiss, index = _faiss_index(x, m, nlist)
    pq = index.pq
    cent = faiss.vector_to_array(pq.centroids).reshape(m, 256, 512 // m)
    coarse = index.quantizer.reconstruct_n(0, nlist) if nlist else None
    head = index.coarse_code_size() if nlist else 0
    ref = index.sa_encode(x)
    ours = cz._pq_sa_codes(torch.from_numpy(x), torch.from_numpy(cent), None if coarse is None else torch.from_numpy(coarse), head)
    assert ours.shape == ref.shape == (3000, head + m) and ours.dtype == np.uint8
    assert np.mean(ours == ref) >= 0.999
    rows, cols = np.nonzero(ours[:, head:] != ref[:, head:])
    xs = x.astype(np.float64).reshape(3000, m, -1)
    c64 = cent.astype(np.float64)
    for i, j in zip(rows, cols):  # a differing code is a tie: both centroids at the same distance
        d_ours = np.sum((xs[i, j] - c64[j, ours[i, head + j]]) ** 2)
        d_ref = np.sum((xs[i, j] - c64[j, ref[i, head + j]]) ** 2)
        assert abs(d_ours - d_ref) <= 1e-5 * max(d_ref, 1e-6)
    if nlist:
        l_ours, l_ref = (c[:, :head].astype(np.int64) @ (256 ** np.arange(head)) for c in (ours, ref))
        for i in np.flatnonzero(l_ours != l_ref):
            ip = coarse.astype(np.float64) @ x[i].astype(np.float64)
            assert abs(ip[l_ours[i]] - ip[l_ref[i]]) <= 1e-5
    a, b = faiss.clone_index(index), faiss.clone_index(index)
    a.add(x)
    b.add_sa_codes(ref)
    assert b.ntotal == 3000
    np.testing.assert_array_equal(faiss.serialize_index(a), faiss.serialize_index(b))


def test_torch_encoding_keeps_the_reranked_top10(tmp_path, monkeypatch):
    """`compress` with the torch encoder (128 sub-quantizers of 8 dims) finds the same re-ranked
    top 10 as with FAISS's own `add`, in blocks smaller than a shard (3 rows at a time here), and
    records the encode time."""
    x, q = clustered(1200, 1024, 16, seed=6, clusters=24, noise=0.9)
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=500)
    ex = topk(store, q, 10)

    def faiss_fill(faiss, index, store, verify):
        for shard_no in range(len(store.shards)):
            index.add(store.load_shard("vectors", shard_no, verify=verify).astype(np.float32))

    results, calls, encode_pq = {}, [], cz.encode_pq
    for name in ("faiss", "torch"):
        with monkeypatch.context() as mp:
            if name == "faiss":
                mp.setattr(cz, "_fill_pq", faiss_fill)
            else:
                mp.setattr(cz, "ENCODE_BLOCK_BYTES", 3 * 4 * 1024)
                assert cz._encode_rows(1024) == 3
                mp.setattr(cz, "encode_pq", lambda x, c: calls.append(len(x)) or encode_pq(x, c))
            e = compress(store.path, "pq", m=128, niter=3)
        assert e["encode_seconds"] >= 0 and e["m"] == 128
        results[name] = search_compressed(IndexStore(store.path), q, 10, form="pq")
    assert sum(calls) == 1200 and max(calls) == 3  # the torch path ran, in 3-row blocks
    f, t = results["faiss"], results["torch"]
    assert overlap(t.prop_rows, ex.prop_rows) >= 0.95 and overlap(t.opp_rows, ex.opp_rows) >= 0.95
    assert overlap(t.prop_rows, f.prop_rows) >= 0.99 and overlap(t.opp_rows, f.opp_rows) >= 0.99
    raw_f = search_compressed(IndexStore(store.path), q, 10, form="pq", rerank=0)  # torch codes now
    assert overlap(raw_f.prop_rows, t.prop_rows) < 1.0  # the re-rank is doing work: a real check


# --- the binary form -----------------------------------------------------------------------------


def _binary_reference(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """[Q, n] float64 estimates a·(c·sign(x))·f, computed here independently of `index/pq.py`:
    a = max|q| / 127 and c = round(q / a) in float32 as the int8 form rounds queries, sign +1
    where x ≥ 0, f = ‖x‖² / ‖x‖₁ (0 for a zero row)."""
    q = q.astype(np.float32)
    a = np.abs(q).max(axis=1) / np.float32(127.0)
    c = np.clip(np.rint(q / a[:, None]), -127, 127).astype(np.float64)
    x64 = x.astype(np.float64)
    l1 = np.abs(x64).sum(axis=1)
    f = np.where(l1 > 0, (x64 * x64).sum(axis=1) / np.where(l1 > 0, l1, 1.0), 0.0)
    return (c @ np.where(x64 >= 0, 1.0, -1.0).T) * f[None, :] * a[:, None].astype(np.float64)


def test_binary_codes_and_estimates_match_a_reference(tmp_path, monkeypatch):
    """The binary form's codes are the sign bits and its scan's estimates are a·(c·sign(x))·f for
    every row: a dimension and a query count that are not multiples of 8, shards of 300 rows
    unpacked 7 rows at a time, duplicate rows tying exactly and a zero row scoring 0."""
    d = 1003
    x, q = clustered(700, d, 5, seed=2, clusters=16)
    x[11] = x[10]  # a duplicate document
    x[20] = 0.0  # a non-finite document is stored as zeros
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=300)
    stored = x.astype(np.float16).astype(np.float32)
    e = compress(store.path, "pq", pq_form="binary")
    assert (e["form"], e["m"], e["nbits"], e["code_bytes_per_doc"], e["bytes_per_doc"]) == ("binary", d, 1, 126, 130)
    assert [s["rows"] for s in e["shards"]] == [300, 300, 100] and not (store.path / writer.PQ_FILE).exists()
    codes = np.concatenate([np.load(pqr.binary_paths(store.path, i)[0]) for i in range(3)])
    bits = np.unpackbits(codes, axis=1, bitorder="little")
    np.testing.assert_array_equal(bits[:, :d], stored >= 0)
    assert not bits[:, d:].any()  # padding bits are 0 (−1) and meet zero query coordinates
    factors = np.concatenate([np.load(pqr.binary_paths(store.path, i)[1]) for i in range(3)])
    np.testing.assert_allclose(factors, encode_binary(stored)[1])
    assert factors[20] == 0 and factors[10] == factors[11] > 0

    monkeypatch.setattr(pqr, "_UNPACK_BYTES", 7 * 8 * 126)
    store = IndexStore(store.path)
    props, opps = pqr.binary_candidates(store, q, 700, store.manifest["compressed"]["pq"], verify=True)
    ref = _binary_reference(stored, q)
    est = np.zeros_like(ref)
    np.put_along_axis(est, props.rows.numpy(), props.vals.numpy(), axis=1)
    np.testing.assert_allclose(est, ref, rtol=1e-5, atol=1e-7)
    assert (est[:, 10] == est[:, 11]).all() and (est[:, 20] == 0).all()
    neg = np.zeros_like(ref)
    np.put_along_axis(neg, opps.rows.numpy(), -opps.vals.numpy(), axis=1)
    np.testing.assert_array_equal(neg, est)  # opponents: the same estimates, ranked from the bottom
    # what search returns without re-ranking: the top 20 estimates, with their values
    raw = search_compressed(store, q, 20, rerank=0)
    np.testing.assert_allclose(raw.prop_scores, -np.sort(-ref, axis=1)[:, :20], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(raw.opp_scores, np.sort(ref, axis=1)[:, :20], rtol=1e-5, atol=1e-7)


def test_binary_is_the_default_from_16384_dims_and_reranks_to_the_exact_top10(tmp_path):
    """At 16,384 dims `compress --kind pq` writes the binary form (nothing trained), and its top
    400 candidates re-ranked exactly hold the exact top 10 with the exact scores; the estimates
    alone do not order them, and a shallow re-rank finds fewer."""
    x, q = clustered(1200, 16384, 16, seed=5, clusters=32, noise=0.9)
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=500)
    ex = topk(store, q, 10)
    e = compress(store.path, "pq")
    assert (e["form"], e["rerank"], e["train_rows"], e["bytes_per_doc"]) == ("binary", 400, 0, 16384 // 8 + 4)
    store = IndexStore(store.path)
    assert store.search_form() == ("pq", True)
    rr = search(store, q, 10)
    assert overlap(rr.prop_rows, ex.prop_rows) >= 0.98 and overlap(rr.opp_rows, ex.opp_rows) >= 0.98  # 0.99–1.0 (seeds 5, 6)
    bf = brute_force(store, q)
    np.testing.assert_array_equal(rr.prop_scores, np.take_along_axis(bf, rr.prop_rows, 1))
    np.testing.assert_array_equal(rr.opp_scores, np.take_along_axis(bf, rr.opp_rows, 1))
    raw = search_compressed(store, q, 10, rerank=0)
    assert overlap(raw.prop_rows, ex.prop_rows) < 0.9
    shallow = search_compressed(store, q, 10, rerank=10)
    assert overlap(shallow.prop_rows, ex.prop_rows) < overlap(rr.prop_rows, ex.prop_rows)


def test_pq_forms_replace_each_other_and_older_entries_still_read(tmp_path):
    """Writing one PQ form removes the other's files; an entry written before `form` existed (a
    FAISS one) still searches; a form this version does not know, or a damaged code file, is
    refused in one line naming it."""
    x, q = clustered(600, 512, 4, seed=1, clusters=16)
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=250)
    ex = topk(store, q, 5)
    compress(store.path, "pq", pq_form="binary")
    binary_dir = store.path / pqr.BINARY_DIR
    assert len(list(binary_dir.glob("*.npy"))) == 6
    assert {rel for _, rel, _ in writer.compressed_files(store.path, json.loads((store.path / "manifest.json").read_text()))} == {
        f"{pqr.BINARY_DIR}/{kind}-{i:05d}.npy" for kind in ("codes", "factors") for i in range(3)}
    e = compress(store.path, "pq", m=32, niter=2)
    assert (e["form"], e["faiss"]) == ("pq", "IndexPQ") and not binary_dir.exists() and (store.path / writer.PQ_FILE).exists()
    new = search(IndexStore(store.path), q, 5)
    man = json.loads((store.path / "manifest.json").read_text())
    del man["compressed"]["pq"]["form"]
    writer.write_manifest(store.path, man)
    old = search(IndexStore(store.path), q, 5)
    np.testing.assert_array_equal(old.prop_rows, new.prop_rows)
    assert overlap(old.prop_rows, ex.prop_rows) >= 0.9
    man["compressed"]["pq"]["form"] = "lattice"
    writer.write_manifest(store.path, man)
    with pytest.raises(IndexStoreError, match=r"compressed\.pq\.form 'lattice'") as err:
        search(IndexStore(store.path), q, 5)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown PQ form"):
        compress(store.path, "pq", pq_form="lattice")
    compress(store.path, "pq", pq_form="binary")
    assert not (store.path / writer.PQ_FILE).exists()
    codes = pqr.binary_paths(store.path, 1)[0]
    raw = bytearray(codes.read_bytes())
    raw[-3] ^= 0xFF
    codes.write_bytes(bytes(raw))
    with pytest.raises(IndexStoreError, match="codes-00001.npy.*checksum|checksum.*codes-00001.npy"):
        search(IndexStore(store.path), q, 5)


def test_binary_scan_ranks_the_source_row_first_on_isotropic_vectors(tmp_path):
    """On random unit vectors (no clusters: every exact score but the source's near 0, like
    whitened gradients) a query made from a row plus noise of the same norm finds that row first
    from the estimates alone, and the re-ranked top 10 is the exact one."""
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((800, 4096), dtype=np.float32))
    src = rng.choice(800, 12, replace=False)
    q = unit(x[src] + rng.standard_normal((12, 4096), dtype=np.float32) / np.float32(64.0))
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=800)
    ex = topk(store, q, 10)
    compress(store.path, "pq", pq_form="binary")
    raw = search_compressed(IndexStore(store.path), q, 1, rerank=0)
    np.testing.assert_array_equal(raw.prop_rows[:, 0], src)
    rr = search(IndexStore(store.path), q, 10)
    assert overlap(rr.prop_rows, ex.prop_rows) >= 0.95


def test_screened_rerank_equals_the_full_rerank(tmp_path, monkeypatch):
    """The PQ re-rank re-scores exactly only the candidates whose error interval reaches the k-th
    (here well under a quarter of them), and returns what re-scoring every candidate returns: the
    same rows in the same order, ties between duplicate documents included, with the same scores."""
    from tracestar.index import search as srch

    x, q = clustered(900, 1003, 6, seed=4, clusters=8, noise=0.5)
    x[300:330] = x[5]  # 31 copies of row 5, the best of the queries made from it
    q[0] = x[5]
    store = write_index(tmp_path / "idx", x, "float16", shard_docs=400)
    compress(store.path, "pq", pq_form="binary")
    store = IndexStore(store.path)
    asked, exact_scores = [], srch.exact_scores

    def counting(store, q, rows, **kw):
        asked.append((int((rows >= 0).sum()), rows.size))
        return exact_scores(store, q, rows, **kw)

    monkeypatch.setattr(srch, "exact_scores", counting)
    screened = search_compressed(store, q, 10, rerank=400)
    monkeypatch.setattr(srch, "_screened", lambda store, q, p, o, k, verify: (p, o))
    full = search_compressed(store, q, 10, rerank=400)
    (n_screened, n_cand), (n_full, _) = asked
    assert n_full == n_cand == 6 * 800 and n_screened < n_cand / 4
    for a, b in zip(screened.__dict__.values(), full.__dict__.values()):
        np.testing.assert_array_equal(a, b)
    assert sorted(screened.prop_rows[0].tolist()) == [5] + list(range(300, 309))  # the first 10 copies, by row
