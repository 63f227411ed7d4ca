"""Search at scale: exact scan throughput vs memory bandwidth, and compressed forms vs exact.

    python bench/search.py                      # synthetic: ~1.5 GB index per dtype + compressed table
    python bench/search.py --index DIR --queries Q.jsonl   # compressed table on a real index
    python bench/search.py --pq-scan --skip-scan --skip-compressed   # PQ forms' scan cost per row at 2^16 dims
    python bench/search.py --pq-real-docs 6064 --skip-scan --skip-compressed   # binary PQ recall on real 2^16 vectors

Prints ratios (scan GB/s ÷ memory bandwidth measured in the same run; latency ÷ exact latency),
not bare wall times: the machine is shared and absolute times move with its load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tracestar.index import exact as srch
from tracestar.index.compress import compress
from tracestar.index.exact import topk
from tracestar.index.search import search_compressed
from tracestar.index.store import IndexStore
from tracestar.index.topk import to_result
from tracestar.testing import clustered, random_unit_blocks, write_index


def best_time(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_times(fns: dict, repeats: int = 3) -> dict:
    """Best-of-`repeats` wall time of each fn, run round-robin so every one sees the same load."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


class Bandwidth:
    """Memory bandwidth probes on a 1 GB float32 array (far beyond the caches).

    read: `a.sum()` — reads every byte once, writes nothing (the fair ceiling for a scan, which
    only reads). copy: `b.copy_(a)` counted as read + write bytes (2 × size).
    """

    def __init__(self, gb: float = 1.0):
        self.a = torch.ones(int(gb * 1e9 / 4))
        self.b = torch.empty_like(self.a)
        self.nbytes = self.a.numel() * 4

    def fns(self) -> dict:
        return {"read": lambda: self.a.sum(), "copy": lambda: self.b.copy_(self.a)}

    def gbps(self, best: dict) -> dict:
        return {"read_GBps": self.nbytes / best["read"] / 1e9, "copy_rw_GBps": 2 * self.nbytes / best["copy"] / 1e9}


def bandwidth(gb: float = 1.0) -> dict:
    bw = Bandwidth(gb)
    out = bw.gbps(best_times(bw.fns()))
    out["copy_GBps"] = out["copy_rw_GBps"] / 2
    return out


def matmul_only(store: IndexStore, q: np.ndarray, chunk: int | None) -> None:
    """The scan's stored-dtype matmuls alone over the same mmapped shards (no top-k, no re-score)."""
    stored = store.stored_dtype("vectors")
    q_low = torch.from_numpy(q).to(torch.bfloat16 if stored == "bfloat16" else torch.float16)
    rows = chunk or srch.default_chunk_rows(store.dim, 2)
    for shard_no in range(len(store.shards)):
        block = store.load_shard("vectors", shard_no, verify=False)
        for lo in range(0, block.shape[0], rows):
            srch.chunk_scores(q_low, srch.as_tensor(block[lo : lo + rows], stored))


class ComputeRoof:
    """The stored-dtype matmul on one cache-resident chunk (8 MB, re-used): the kernel's speed with
    memory out of the way. At Q queries a scan does 2·Q flops per 2-byte element, so when this
    roof (in GB/s of chunk) sits below the bandwidth, the scan is compute-bound and no scan in
    that dtype can beat it."""

    def __init__(self, q: np.ndarray, dtype: str):
        tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float16
        rows = max(16, (8 << 20) // (2 * q.shape[1]))
        self.x = torch.randn(rows, q.shape[1]).to(tdt)
        self.q = torch.from_numpy(q).to(tdt)
        self.nbytes = self.x.numel() * 2
        self.reps = 16

    def __call__(self) -> None:
        for _ in range(self.reps):
            srch.chunk_scores(self.q, self.x)

    def gbps(self, seconds: float) -> float:
        return self.reps * self.nbytes / seconds / 1e9


def scan_table(args, bw: Bandwidth, tmp: Path) -> None:
    d = args.dim
    n = int(args.gb * 1e9 / (2 * d))
    rng = np.random.default_rng(1)
    q = rng.standard_normal((args.n_queries, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    flop_per_byte = 2 * args.n_queries / 2  # 2·Q flops per stored element of 2 bytes
    print(f"\n## exact scan: {n} rows × D={d} ({n * d * 2 / 1e9:.2f} GB), {args.n_queries} queries, k=10, "
          f"threads={torch.get_num_threads()}")
    print("Bandwidth probes, the scans and the bare matmuls run round-robin (best of "
          f"{args.repeats}), so each ratio compares runs under the same load. read bw = sum over 1 GB "
          "(read only); copy bw counts read + write bytes. 'matmul only' = the stored-dtype matmuls "
          "of the scan alone (its ceiling); 'inline' = the previous scan (exact re-score per chunk); "
          "'compute roof' = the same matmul on one cache-resident chunk (no memory traffic).")
    print("| stored | chunk rows | method | GB/s | ÷ read bw | ÷ copy bw (r+w) | GFLOPS | re-scored rows | rescanned queries |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        path = tmp / f"scan-{dtype}"
        store = write_index(path, random_unit_blocks(n, d, max(1, (256 << 20) // (2 * d))), dtype)
        store.verify()
        for chunk in args.chunks:
            stats: dict = {}
            fns = dict(bw.fns())
            fns["scan"] = lambda: srch.topk(store, q, 10, chunk_rows=chunk, verify=False)
            fns["matmul only"] = lambda: matmul_only(store, q, chunk)
            roof = ComputeRoof(q, dtype)
            fns["roof"] = roof
            if args.inline:
                qq = store.check_queries(q)
                fns["inline"] = lambda: to_result(*srch._scan_inline(
                    store, qq, 10, list(range(len(store.shards))), srch.Bounds.of(store, "vectors", qq),
                    kind="vectors", chunk_rows=chunk, verify=False), 10)
            best = best_times(fns, args.repeats)
            g = bw.gbps(best)
            srch._scan(store, store.check_queries(q), 10, list(range(len(store.shards))),
                       kind="vectors", chunk_rows=chunk, verify=False, stats=stats)
            for name in [m for m in ("scan", "inline", "matmul only") if m in best]:
                gbs = n * d * 2 / best[name] / 1e9
                extra = (f"{stats['rescored_rows'] / stats['rows']:.3%} | {stats['rescanned_queries']}"
                         if name == "scan" else "— | —")
                print(f"| {dtype} | {chunk or 'auto'} | {name} | {gbs:.2f} | {gbs / g['read_GBps']:.2f} | "
                      f"{gbs / g['copy_rw_GBps']:.2f} | {gbs * flop_per_byte:.0f} | {extra} |", flush=True)
            print(f"| {dtype} | {chunk or 'auto'} | (bandwidth this round) | read {g['read_GBps']:.1f} | "
                  f"copy r+w {g['copy_rw_GBps']:.1f} | | | | |", flush=True)
            r_gbs = roof.gbps(best["roof"])
            scan_gbs = n * d * 2 / best["scan"] / 1e9
            print(f"| {dtype} | {chunk or 'auto'} | compute roof (in-cache matmul) | {r_gbs:.2f} | "
                  f"{r_gbs / g['read_GBps']:.2f} | {r_gbs / g['copy_rw_GBps']:.2f} | {r_gbs * flop_per_byte:.0f} | | |")
            print(f"scan ÷ min(copy bw r+w, compute roof) = {scan_gbs / min(g['copy_rw_GBps'], r_gbs):.2f} "
                  f"({dtype}, {args.n_queries} queries)", flush=True)
        if dtype == "float16":  # the int8 form of the same index: exact int8 matmuls, half the bytes
            compress(path, "int8", verify=False)
            store = IndexStore(path)
            fns = dict(bw.fns())
            fns["int8"] = lambda: search_compressed(store, q, 10, rerank=0, form="int8", verify=False)
            fns["scan"] = lambda: srch.topk(store, q, 10, verify=False)
            best = best_times(fns, args.repeats)
            g = bw.gbps(best)
            codes_gbs = n * d / best["int8"] / 1e9
            print(f"| int8 codes | auto | int8 search (approximate) | {codes_gbs:.2f} | {codes_gbs / g['read_GBps']:.2f} | "
                  f"{codes_gbs / g['copy_rw_GBps']:.2f} | {codes_gbs * 2 * 2 * args.n_queries:.0f} GOPS | | |")
            print(f"int8 search latency ÷ fp16 exact scan = {best['int8'] / best['scan']:.2f}", flush=True)
        shutil.rmtree(path)


def mrr_at_10(rows: np.ndarray, relevant: list[set[int]]) -> float:
    """Mean reciprocal rank of the first relevant row within each query's top 10 (0 if none)."""
    recip = [next((1.0 / (i + 1) for i, r in enumerate(row[:10]) if int(r) in rel), 0.0) for row, rel in zip(rows, relevant)]
    return float(np.mean(recip))


def compressed_table(store: IndexStore, q: np.ndarray, args, label: str, relevant: list[set[int]] | None = None) -> None:
    dtype_bytes = 2 if store.manifest.get("dtype") in ("float16", "bfloat16") else 4
    fp_bytes = store.dim * dtype_bytes
    exact_t = best_time(lambda: topk(store, q, 10, verify=False), args.repeats)
    ex = topk(store, q, 10, verify=False)

    def ov(a, b):
        return float(np.mean([len(set(r) & set(s)) / len(s) for r, s in zip(a, b)]))

    print(f"\n## compressed forms ({label}: {store.n_rows} rows × D={store.dim}, {len(q)} queries, k=10)")
    print(f"exact scan latency: 1.00 (reference); stored {store.manifest.get('dtype')} = {fp_bytes} bytes/doc")
    if relevant is not None:
        print(f"exact MRR@10 against the queries' relevant documents: {mrr_at_10(ex.prop_rows, relevant):.4f}")
    print("| form | bytes/doc | ÷ stored bytes | top-10 overlap (prop) | (opp) | ΔMRR@10 | latency ÷ exact | build s |")
    print("|---|---|---|---|---|---|---|---|")
    forms = [("int8", {}), ("pq", {"m": args.pq_m, "niter": args.pq_niter})]
    for form, kw in forms:
        t0 = time.perf_counter()
        entry = compress(store.path, form, **kw)
        build = time.perf_counter() - t0
        store = IndexStore(store.path)
        bpd = entry.get("code_bytes_per_doc", entry["bytes_per_doc"])
        for rerank in (0, None):
            r = search_compressed(store, q, 10, rerank=rerank, form=form, verify=False)
            t = best_time(lambda: search_compressed(store, q, 10, rerank=rerank, form=form, verify=False), args.repeats)
            name = f"{form}{'' if rerank == 0 else ' + rerank ' + str(max(100, 10 * 10))}"
            mstr = f" (m={entry['m']})" if form == "pq" else ""
            dmrr = "–" if relevant is None else f"{mrr_at_10(r.prop_rows, relevant) - mrr_at_10(ex.prop_rows, relevant):+.4f}"
            print(f"| {name}{mstr} | {bpd} | {bpd / fp_bytes:.3f} | {ov(r.prop_rows, ex.prop_rows):.3f} | "
                  f"{ov(r.opp_rows, ex.opp_rows):.3f} | {dmrr} | {t / exact_t:.2f} | {build:.1f} |", flush=True)


# --- PQ at high dimension: scan cost per row, and recall on real vectors --------------------------


def _faiss_timing_index(faiss, d: int, m: int, nbits: int, n: int, fastscan: bool):
    """A FAISS PQ index of `n` random codes under random codebooks: a scan's time does not depend
    on what the codes mean, and training a real one at 2^16 dims takes minutes."""
    rng = np.random.default_rng(0)
    index = faiss.IndexPQ(d, m, nbits, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(rng.standard_normal(m * (1 << nbits) * (d // m), dtype=np.float32), index.pq.centroids)
    index.is_trained = True
    index.add_sa_codes(rng.integers(0, 256, (n, index.sa_code_size()), dtype=np.uint8))
    return faiss.IndexPQFastScan(index) if fastscan else index


def pq_scan_table(args, tmp: Path) -> None:
    """Per row and query, side by side: the exact fp16 scan, the binary PQ scan (alone and with its
    re-rank), FAISS 8-bit PQ (m = D/16, the FAISS default at 2^16) and FAISS 4-bit fast scan
    (m = D/8), on random unit rows; each FAISS form searched for q and −q, as the others rank both
    sides. Also the binary form's encode time and bytes per row."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    d, n, n_q = args.pq_dim, args.pq_rows, args.n_queries
    rng = np.random.default_rng(2)
    q = rng.standard_normal((n_q, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    store = write_index(tmp / "pqscan", random_unit_blocks(n, d, 1024), "float16", shard_docs=4096)
    entry = compress(store.path, "pq", pq_form="binary", verify=False)
    store = IndexStore(store.path)
    pq8 = _faiss_timing_index(faiss, d, d // 16, 8, n, fastscan=False)
    fs4 = _faiss_timing_index(faiss, d, d // 8, 4, n, fastscan=True)
    depth = entry["rerank"]
    fns = {
        "exact fp16 scan": lambda: topk(store, q, 10, verify=False),
        "binary: scan only": lambda: search_compressed(store, q, 10, rerank=0, verify=False),
        f"binary: scan + re-rank {depth}": lambda: search_compressed(store, q, 10, verify=False),
        f"FAISS 8-bit PQ m={d // 16}": lambda: (pq8.search(q, depth), pq8.search(-q, depth)),
        f"FAISS 4-bit fast scan m={d // 8}": lambda: (fs4.search(q, depth), fs4.search(-q, depth)),
    }
    best = best_times(fns, args.repeats)
    per = {name: t / n / n_q * 1e6 for name, t in best.items()}  # µs per row and query
    rerank_s = (best[f"binary: scan + re-rank {depth}"] - best["binary: scan only"]) / n_q
    print(f"\n## PQ scan at D={d}: {n} random unit rows (fp16), {n_q} queries, threads={torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("Run round-robin, best of each. 'at 1M rows' = µs per row and query × 10^6 (an in-memory scan; "
          "the exact one would stream 2·D bytes per row from disk there).")
    print("| form | bytes/row | µs per row and query | ÷ exact | s per query at 1M rows |")
    print("|---|---:|---:|---:|---:|")
    size = {"exact fp16 scan": 2 * d, "binary": entry["bytes_per_doc"], "FAISS 8-bit": d // 16, "FAISS 4-bit": d // 16}
    for name, us in per.items():
        b = next(v for k, v in size.items() if name.startswith(k))
        print(f"| {name} | {b:,} | {us:.3f} | {us / per['exact fp16 scan']:.3f} | {us:.2f} |")
    print(f"binary re-rank of {depth} + {depth} candidates: {rerank_s * 1e3:.1f} ms per query (from memory; it "
          f"does not grow with the rows); binary encode: {entry['encode_seconds'] / n * 1e3:.3f} ms per row, "
          "nothing trained", flush=True)


def _wide_model(path: Path) -> None:
    """bench/scale.py's tiny GPT-2 at width 192: wide enough that a 2^16 projection gets 64,980
    dims (the tests' width-32 model gets 38,280)."""
    from scale import save_tiny_model

    save_tiny_model(path, width=192)


def real_vectors(args, tmp: Path) -> np.ndarray:
    """float16 rows of a real 2^16 index: `--pq-real-index`, or one built here from `--pq-real-docs`
    random-word documents (bench/scale.py's corpus) through `_wide_model`."""
    from tracestar.index.store import as_float32

    path = args.pq_real_index
    if path is None:
        from scale import write_corpus

        from tracestar.build import build_index

        _wide_model(tmp / "model")
        write_corpus(tmp / "corpus.jsonl", args.pq_real_docs, seed=3)
        t = time.perf_counter()
        build_index(tmp / "model", tmp / "corpus.jsonl", tmp / "real", proj_dim=1 << 16, preconditioner="train",
                    shard_docs=2048, quiet=True)
        print(f"built {args.pq_real_docs} documents at 2^16 in {time.perf_counter() - t:.0f} s", flush=True)
        path = tmp / "real"
    store = IndexStore(path)
    stored = store.stored_dtype("vectors")
    return np.concatenate([as_float32(store.load_shard("vectors", s, verify=False), stored).astype(np.float16)
                           for s in range(len(store.shards))])


def _dots(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[Q, n] float32 q·xᵀ for float16 rows x, a block of rows at a time (float32 matmuls)."""
    qt = torch.from_numpy(q)
    return torch.cat([qt @ torch.from_numpy(x[lo : lo + 2048]).float().T for lo in range(0, len(x), 2048)], dim=1).numpy()


def pq_real_table(args, tmp: Path) -> None:
    """Binary PQ on real whitened vectors: the last `--n-queries` rows are the queries (held out),
    the rest the index; also queries made of a stored row plus noise of its norm (that row must come
    first). Top-10 overlap with the exact search after re-ranking 100–800 candidates, and where the
    exact top 10 sit among the estimates."""
    allx = real_vectors(args, tmp)
    n_q = args.n_queries
    x, held = allx[:-n_q], allx[-n_q:].astype(np.float32)
    rng = np.random.default_rng(0)
    src = rng.choice(len(x), n_q, replace=False)
    noisy = x[src].astype(np.float32) + rng.standard_normal(held.shape, dtype=np.float32) / np.float32(np.sqrt(x.shape[1]))
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    store = write_index(tmp / "db", x, "float16", shard_docs=4096)
    t = time.perf_counter()
    entry = compress(store.path, "pq", verify=False)
    build = time.perf_counter() - t
    store = IndexStore(store.path)
    print(f"\n## binary PQ on real vectors: {len(x)} rows × D={x.shape[1]}, {n_q} queries, form {entry['form']}, "
          f"{entry['bytes_per_doc']} bytes/row ({entry['bytes_per_doc'] / (2 * x.shape[1]):.4f} of fp16), "
          f"build {build / len(x) * 1e3:.3f} ms/row, load average {os.getloadavg()[0]:.1f}")
    print("| queries | re-rank depth | top-10 overlap (prop) | (opp) | source row in top 10 |")
    print("|---|---:|---:|---:|---:|")
    for name, q in (("held-out rows", held), ("row + noise", noisy)):
        ex = topk(store, q, 10, verify=False)
        for depth in (100, 200, 400, 800):
            r = search_compressed(store, q, 10, rerank=depth, verify=False)
            src_hit = f"{np.mean([s in row for s, row in zip(src, r.prop_rows)]):.3f}" if name == "row + noise" else "–"
            print(f"| {name} | {depth} | {_overlap(r.prop_rows, ex.prop_rows):.3f} | {_overlap(r.opp_rows, ex.opp_rows):.3f} "
                  f"| {src_hit} |", flush=True)
        est = search_compressed(store, q, len(x), rerank=0, verify=False)  # every row, by estimate
        rank = np.argsort(est.prop_rows, axis=1)  # rank[i, row]: the row's place among the estimates
        r10 = np.take_along_axis(rank, ex.prop_rows, 1)
        print(f"{name}: the exact top 10 among the estimates: median place {np.median(r10):.0f}, 90% {np.quantile(r10, 0.9):.0f}, "
              f"last {r10.max()} of {len(x)}; estimate–exact correlation "
              f"{np.corrcoef(_dots(q, x).ravel(), _estimates(est, len(x)).ravel())[0, 1]:.3f}", flush=True)
    if args.pq_real_faiss:
        faiss_4bit_rows(x, held, noisy, src, store)


def faiss_4bit_rows(x: np.ndarray, held: np.ndarray, noisy: np.ndarray, src: np.ndarray, store: IndexStore) -> None:
    """FAISS 4-bit PQ on the same rows, ≈8 dims per sub-quantizer, codebooks trained here (torch
    k-means, 4,096 rows): the same codes searched with float tables (`IndexPQ`) and with the fast
    scan's 8-bit tables summed in 16 bits (`IndexPQFastScan`), 400 candidates re-ranked exactly."""
    import faiss

    from tracestar.index.compress import train_pq_codebooks

    d = x.shape[1]
    m = max(k for k in range(1, d // 8 + 1) if d % k == 0)
    sample = x[np.sort(np.random.default_rng(1).choice(len(x), min(len(x), 4096), replace=False))].astype(np.float32)
    flat = faiss.IndexPQ(d, m, 4, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(np.ascontiguousarray(train_pq_codebooks(sample, m, 4, niter=10).ravel()), flat.pq.centroids)
    flat.is_trained = True
    for lo in range(0, len(x), 2048):
        flat.add(x[lo : lo + 2048].astype(np.float32))
    fast = faiss.IndexPQFastScan(flat)
    print(f"FAISS 4-bit PQ, m={m} ({d // m} dims each), {m // 2} bytes/row, 400 candidates re-ranked exactly:")
    print("| queries | tables | top-10 overlap (prop) | source row in top 10 |")
    print("|---|---|---:|---:|")
    for name, q in (("held-out rows", held), ("row + noise", noisy)):
        ex = topk(store, q, 10, verify=False)
        exact = _dots(q, x)
        for label, index in (("float (IndexPQ)", flat), ("fast scan (IndexPQFastScan)", fast)):
            _, cand = index.search(q, 400)
            top = np.take_along_axis(cand, np.argsort(-np.take_along_axis(exact, cand, 1), axis=1), 1)[:, :10]
            hit = f"{np.mean([s in row for s, row in zip(src, top)]):.3f}" if name == "row + noise" else "–"
            print(f"| {name} | {label} | {_overlap(top, ex.prop_rows):.3f} | {hit} |", flush=True)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(s)) / len(s) for r, s in zip(a, b)]))


def _estimates(res, n: int) -> np.ndarray:
    """[Q, n] the estimates of a rerank=0 search over every row, back in row order."""
    out = np.empty(res.prop_rows.shape, dtype=np.float32)
    np.put_along_axis(out, res.prop_rows, res.prop_scores, axis=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=16384)
    ap.add_argument("--gb", type=float, default=1.5, help="size of each synthetic scan index")
    ap.add_argument("--n-queries", type=int, default=32)
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--chunks", nargs="+", type=int, default=[0], help="chunk rows to try (0 = auto)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inline", action="store_true", help="also time the previous inline re-score scan")
    ap.add_argument("--comp-rows", type=int, default=20000)
    ap.add_argument("--comp-dim", type=int, default=1024)
    ap.add_argument("--pq-m", type=int, default=None)
    ap.add_argument("--pq-niter", type=int, default=10)
    ap.add_argument("--skip-scan", action="store_true")
    ap.add_argument("--skip-compressed", action="store_true")
    ap.add_argument("--index", help="a real index directory (compressed table only; it is modified: compressed/ added)")
    ap.add_argument("--queries", help="query JSONL for --index")
    ap.add_argument("--pq-scan", action="store_true", help="PQ forms' scan cost per row at --pq-dim")
    ap.add_argument("--pq-dim", type=int, default=1 << 16)
    ap.add_argument("--pq-rows", type=int, default=4096)
    ap.add_argument("--pq-real-docs", type=int, default=0, help="build a real 2^16 index of this many documents")
    ap.add_argument("--pq-real-index", default=None, help="an existing real index instead of --pq-real-docs")
    ap.add_argument("--pq-real-faiss", action="store_true", help="also FAISS 4-bit PQ (float and fast-scan tables)")
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    args.chunks = [c or None for c in args.chunks]

    bw = Bandwidth()
    g = bw.gbps(best_times(bw.fns()))
    print(f"memory bandwidth: read (sum) {g['read_GBps']:.1f} GB/s, copy {g['copy_rw_GBps'] / 2:.1f} GB/s "
          f"({g['copy_rw_GBps']:.1f} GB/s read+write)")
    tmp = Path(tempfile.mkdtemp(dir=args.tmp, prefix="tracestar-bench-"))
    try:
        if args.index:
            from tracestar.api import open_index
            from tracestar.corpus import read_queries

            idx = open_index(args.index)
            queries = read_queries(args.queries)
            q = np.asarray(idx.query_vectors(queries), dtype=np.float32)
            row_of = {d: i for i, d in enumerate(idx.doc_ids)}
            relevant = [{row_of[d] for d in qu.extra.get("relevant", []) if d in row_of} for qu in queries]
            compressed_table(IndexStore(args.index), q, args, f"index {args.index}",
                             relevant if any(relevant) else None)
            return
        if args.pq_scan:
            pq_scan_table(args, tmp)
        if args.pq_real_docs or args.pq_real_index:
            pq_real_table(args, tmp)
        if not args.skip_scan:
            scan_table(args, bw, tmp)
        if args.skip_compressed:
            return
        x, q = clustered(args.comp_rows, args.comp_dim, args.n_queries)
        path = tmp / "comp"
        store = write_index(path, x, "float16", shard_docs=8192)
        compressed_table(store, q, args, "synthetic clustered")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
