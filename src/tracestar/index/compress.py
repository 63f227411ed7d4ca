"""Compressed forms of an index's vectors, and search through them with exact re-ranking.

Two forms, stored beside the exact shards and listed in the manifest under `"compressed"`:

- **int8**: per row and projection block, a symmetric scale = max|x| / 127 and codes =
  round(x / scale) in [-127, 127]. `compressed/int8/shard-NNNNN.npy` (int8 [rows, D]) +
  `compressed/int8/scales-NNNNN.npy` (float32 [rows, G], G blocks listed in the manifest entry
  as `groups`: [offset, size] column ranges). D + 4·G bytes per document: half of fp16. One scale
  per block, not per row, because blocks differ in magnitude (a GPT-2 embedding block can be ~10×
  smaller than its layer blocks) and a row-wide scale would leave the small block few levels.
  Scored with exact int8 × int8 → int32 matmuls against a two-term int8 query (below).
- **pq**: FAISS product quantization trained on the index's own vectors, inner-product metric
  (the vectors are unit-normalised): `IndexPQ`, or `IndexIVFPQ` for large corpora.
  `compressed/pq.faiss`; FAISS ids are the index rows.

`search_compressed` takes the top `rerank` candidates (and the `rerank` most negative ones) from
the compressed form and, when the exact `vectors/` shards are present, re-scores them exactly, so
the returned scores are exact and the order among candidates is the exact order. With
`drop_exact=True` the `vectors/` shards are deleted and scores are the compressed approximation.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from tracestar.errors import IndexStoreError, UserError, check_int
from tracestar.index.search import (
    SearchResult,
    _as_tensor,
    _check_queries,
    _default_chunk_rows,
    _merge_above_threshold,
    _RunningTopK,
    exact_scores,
    stored_dtype_of,
    topk_distributed,
)
from tracestar.index.store import (
    IndexStore,
    as_float32,
    read_manifest,
    sha256_file,
    shard_path,
    write_array,
    write_manifest,
)

COMPRESSED_DIR = "compressed"
INT8_DIR = f"{COMPRESSED_DIR}/int8"
PQ_FILE = f"{COMPRESSED_DIR}/pq.faiss"
IVF_MIN_ROWS = 50_000  # above this many rows PQ uses an inverted file (IVF-PQ)
FORMS = ("int8", "pq")


# --- int8 ----------------------------------------------------------------------------------------


Groups = list[tuple[int, int]]  # [offset, size] column ranges sharing a scale within a row


def whole_row(dim: int) -> Groups:
    return [(0, dim)]


def block_groups(store: IndexStore) -> Groups:
    """The index's projection blocks as column ranges (one range when the manifest has none)."""
    blocks = (store.manifest.get("projection") or {}).get("blocks") or []
    groups = [(int(b["offset"]), int(b["k"]) ** 2) for b in blocks]
    if not groups or sum(n for _, n in groups) != store.dim:
        return whole_row(store.dim)
    return groups


def quantize_int8(x: np.ndarray, groups: Groups | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, D] → (int8 codes [n, D], float32 scales [n, G]); x ≈ codes · scale of its group."""
    x = np.asarray(x, dtype=np.float32)
    groups = groups or whole_row(x.shape[1])
    codes = np.empty(x.shape, dtype=np.int8)
    scales = np.zeros((x.shape[0], len(groups)), dtype=np.float32)
    for g, (o, n) in enumerate(groups):
        part = x[:, o : o + n]
        amax = np.abs(part).max(axis=1) if part.size else np.zeros(x.shape[0], np.float32)
        scales[:, g] = amax / 127.0
        safe = np.where(scales[:, g] > 0, scales[:, g], 1.0).astype(np.float32)
        codes[:, o : o + n] = np.clip(np.rint(part / safe[:, None]), -127, 127)
    return codes, scales


def dequantize_int8(codes: np.ndarray, scales: np.ndarray, groups: Groups | None = None) -> np.ndarray:
    out = np.asarray(codes, dtype=np.float32).copy()
    scales = np.asarray(scales, dtype=np.float32).reshape(out.shape[0], -1)
    for g, (o, n) in enumerate(groups or whole_row(out.shape[1])):
        out[:, o : o + n] *= scales[:, g : g + 1]
    return out


def entry_groups(entry: dict, dim: int) -> Groups:
    """The groups of an int8 manifest entry (entries written before groups existed: one per row)."""
    return [(int(o), int(n)) for o, n in entry.get("groups") or whole_row(dim)]


def int8_paths(index_dir: str | Path, shard_no: int) -> tuple[Path, Path]:
    d = Path(index_dir) / INT8_DIR
    return d / f"shard-{shard_no:05d}.npy", d / f"scales-{shard_no:05d}.npy"


def _compress_int8(store: IndexStore, *, verify: bool, block_rows: int = 4096) -> dict:
    stored = stored_dtype_of(store, "vectors")
    groups = block_groups(store)
    shards = []
    for shard_no, info in enumerate(store.shards):
        block = store.load_shard("vectors", shard_no, verify=verify)
        codes = np.empty(block.shape, dtype=np.int8)
        scales = np.empty((block.shape[0], len(groups)), dtype=np.float32)
        for lo in range(0, block.shape[0], block_rows):
            c, s = quantize_int8(as_float32(np.asarray(block[lo : lo + block_rows]), stored), groups)
            codes[lo : lo + len(s)], scales[lo : lo + len(s)] = c, s
        cpath, spath = int8_paths(store.path, shard_no)
        shards.append(
            {
                "name": info["name"],
                "start": int(info["start"]),
                "rows": int(info["rows"]),
                "codes_sha256": write_array(cpath, codes),
                "scales_sha256": write_array(spath, scales),
            }
        )
    return {
        "path": INT8_DIR,
        "scheme": "symmetric per row and group: scale = max|x| / 127, codes = round(x / scale)",
        "groups": [[o, n] for o, n in groups],
        "dim": store.dim,
        "bytes_per_doc": store.dim + 4 * len(groups),
        "shards": shards,
    }


def _load_int8(store: IndexStore, shard_no: int, entry: dict, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    cpath, spath = int8_paths(store.path, shard_no)
    info = entry["shards"][shard_no]
    key = ("compressed/int8", shard_no)
    if verify and key not in store._verified:
        for path, want in ((cpath, info["codes_sha256"]), (spath, info["scales_sha256"])):
            if not path.exists():
                raise IndexStoreError(f"{path}: missing compressed shard listed in the manifest")
            if sha256_file(path) != want:
                raise IndexStoreError(f"{path}: checksum mismatch — compressed shard corrupted; rerun `tracestar compress`")
        store._verified.add(key)
    codes = np.load(cpath, mmap_mode="r", allow_pickle=False)
    scales = np.load(spath, allow_pickle=False)
    n_groups = len(entry_groups(entry, store.dim))
    if codes.shape != (info["rows"], store.dim) or scales.reshape(len(scales), -1).shape != (info["rows"], n_groups):
        raise IndexStoreError(f"{cpath}: shape {codes.shape}, scales {scales.shape}; manifest says "
                              f"({info['rows']}, {store.dim}) with {n_groups} scale(s) per row")
    scales = scales.reshape(info["rows"], n_groups)
    return codes, scales


# int8 × int8 products summed over at most this many columns fit an int32 accumulator exactly
# (2^16 · 127² < 2^31).
_INT32_SAFE_COLUMNS = 1 << 16


def int8_query_terms(q: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Q, D] ≈ a·c₁ + b·c₂ with int8 c₁, c₂: returns (codes [2Q, D] int8, scales [2Q] float32).

    c₂ quantizes the residual of c₁, so the query error is ~1/127 of one int8 step (well below
    bf16 rounding); the documents' own int8 error then dominates, and both terms go through one
    exact integer matmul.
    """
    q32 = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    terms, scales, rest = [], [], q32
    for _ in range(2):
        sc = rest.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # [Q]
        c = torch.round(rest / sc[:, None]).clamp_(-127, 127)
        rest = rest - c * sc[:, None]
        terms.append(c.to(torch.int8))
        scales.append(sc)
    return torch.cat(terms), torch.cat(scales)


_HAS_INT_MM = True  # cleared the first time torch._int_mm turns out to be missing for the device


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 [m, n] = a [m, k] · b [k, n] for int8 operands: torch's int8 gemm (VNNI on x86),
    or, where this torch build has none for the device, a float64 matmul of the same integers.

    Both are exact integer sums (|sum| < 2^31, far below float64's 2^53; a float32 matmul would
    round sums above 2^24 in an order that depends on the kernel's tiling), so duplicate rows get
    identical approximate scores and tie, in either path, before the same single rounding."""
    global _HAS_INT_MM
    if _HAS_INT_MM:
        try:
            return torch._int_mm(a, b).float()
        except (RuntimeError, NotImplementedError, AttributeError):
            _HAS_INT_MM = False
    return (a.double() @ b.double()).float()


def _int8_chunk_scores(codes: torch.Tensor, scales: torch.Tensor, q_codes_t: torch.Tensor, q_scales: torch.Tensor,
                       groups: Groups) -> torch.Tensor:
    """[Q, C] approximate scores of a chunk: Σ_groups scale_g · (codes_g · (a c₁ + b c₂)_g).

    codes [C, D] int8, scales [C, G], q_codes_t [D, 2Q] int8, q_scales [2Q]. Each group's
    integer matmul is exact; the int32 → float32 conversion and the scaling round once. Only
    single-operation elementwise kernels follow (no fused multiply-add, whose vector body and
    scalar tail may round differently), so a row's score does not depend on where it sits in the
    chunk: duplicate documents tie exactly.
    """
    n_q = q_scales.shape[0] // 2
    out = torch.zeros(codes.shape[0], n_q)
    for g, (o, n) in enumerate(groups):
        dots = torch.zeros(codes.shape[0], 2 * n_q)  # [C, 2Q]
        for lo in range(o, o + n, _INT32_SAFE_COLUMNS):
            hi = min(o + n, lo + _INT32_SAFE_COLUMNS)
            dots += _int8_matmul(codes[:, lo:hi], q_codes_t[lo:hi])
        dots *= q_scales
        out += (dots[:, :n_q] + dots[:, n_q:]) * scales[:, g : g + 1]
    return out.T


def _int8_candidates(store: IndexStore, q: np.ndarray, n_cand: int, entry: dict, verify: bool, chunk_rows: int | None):
    """Stream the int8 shards: running top-n_cand of the approximate scores (and of their negation).

    Equal scores are ordered by row as in the exact search: duplicate documents have identical
    codes, so they tie here exactly as they tie there, and the same one is listed first.
    """
    n_q = q.shape[0]
    props, opps = _RunningTopK(n_q, n_cand, "asc"), _RunningTopK(n_q, n_cand, "desc")
    groups = entry_groups(entry, store.dim)
    q_codes, q_scales = int8_query_terms(q)
    q_codes_t = q_codes.T  # [D, 2Q], the layout oneDNN's s8 gemm reads fastest here
    rows_per_chunk = chunk_rows or _default_chunk_rows(store.dim, 1)
    for shard_no, info in enumerate(entry["shards"]):
        codes, scales = _load_int8(store, shard_no, entry, verify)
        start = int(info["start"])
        for lo in range(0, codes.shape[0], rows_per_chunk):
            hi = min(codes.shape[0], lo + rows_per_chunk)
            s = _int8_chunk_scores(_as_tensor(codes[lo:hi], "int8"), torch.from_numpy(scales[lo:hi]),
                                   q_codes_t, q_scales, groups)
            _merge_above_threshold(props, s, start + lo)
            _merge_above_threshold(opps, -s, start + lo)
    return props, opps


# --- PQ ------------------------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover
        raise UserError("PQ compression needs faiss: pip install faiss-cpu") from exc
    return faiss


def default_pq_m(dim: int, nbits: int = 8) -> int:
    """Sub-quantizers for 4 dims per sub-vector: with 8 bits, codes take 1/8 of the fp16 bytes."""
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return m


def _sample_rows(store: IndexStore, n: int, seed: int, verify: bool) -> np.ndarray:
    stored = stored_dtype_of(store, "vectors")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(store.n_rows, size=min(n, store.n_rows), replace=False))
    out = np.empty((pick.size, store.dim), dtype=np.float32)
    starts = np.array([int(s["start"]) for s in store.shards])
    shard_of = np.searchsorted(starts, pick, side="right") - 1
    for shard_no in np.unique(shard_of):
        sel = shard_of == shard_no
        block = store.load_shard("vectors", int(shard_no), verify=verify)
        out[sel] = as_float32(np.asarray(block[pick[sel] - starts[shard_no]]), stored)
    return out


def train_pq_codebooks(
    x: np.ndarray, m: int, nbits: int | None, *, niter: int = 10, seed: int = 0, ksub: int | None = None
) -> np.ndarray:
    """L2 k-means per sub-space, batched: x [n, D] → centroids [m, ksub, D/m] float32 (ksub = 2^nbits)."""
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n, d = x.shape
    ksub = ksub or (1 << int(nbits))
    dsub = d // m
    xs = x.reshape(n, m, dsub).transpose(0, 1).contiguous()  # [m, n, dsub]
    g = torch.Generator().manual_seed(seed)
    init = torch.randperm(n, generator=g)[: min(ksub, n)]
    if init.numel() < ksub:  # fewer points than centroids: repeat with jitter
        init = init[torch.arange(ksub) % init.numel()]
    cent = xs[:, init, :].clone()
    cent += 1e-6 * torch.randn(cent.shape, generator=g)
    group = max(1, (1 << 25) // max(1, n * ksub))  # distance block ≤ 128 MiB
    for _ in range(niter):
        for lo in range(0, m, group):
            hi = min(m, lo + group)
            xg, cg = xs[lo:hi], cent[lo:hi]
            dist = torch.baddbmm((cg * cg).sum(-1).unsqueeze(1), xg, cg.transpose(1, 2), alpha=-2.0)  # [G, n, ksub]
            assign = dist.argmin(dim=2)  # [G, n]
            sums = torch.zeros_like(cg).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, dsub), xg)
            counts = torch.zeros(hi - lo, ksub).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
            filled = counts > 0
            new = sums / counts.clamp_min(1).unsqueeze(-1)
            cent[lo:hi] = torch.where(filled.unsqueeze(-1), new, cg)
    return cent.numpy()


def _compress_pq(
    store: IndexStore,
    *,
    m: int | None,
    nbits: int,
    nlist: int | None,
    train_rows: int | None,
    niter: int,
    seed: int,
    verify: bool,
) -> dict:
    faiss = _faiss()
    d = store.dim
    m = m or default_pq_m(d, nbits)
    if d % m:
        raise UserError(f"--m {m} must divide the index dimension {d}")
    if nlist is None:
        nlist = int(4 * np.sqrt(store.n_rows)) if store.n_rows > IVF_MIN_ROWS else 0
    # FAISS wants ≥ 39 points per centroid; cap the training sample for time.
    train_rows = train_rows or min(store.n_rows, max(16 * (1 << nbits), 40 * max(nlist, 1)))
    train = _sample_rows(store, train_rows, seed, verify)
    # k-means in torch, all sub-spaces batched (FAISS trains sub-quantizers one by one, which took
    # ~0.2 s each here: minutes for the thousands of sub-quantizers a 16k–65k-dim index needs).
    pq_cent = train_pq_codebooks(train, m, nbits, niter=niter, seed=seed)
    if nlist:
        coarse = train_pq_codebooks(train, 1, None, niter=niter, seed=seed + 1, ksub=nlist)[0]
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(np.ascontiguousarray(coarse))
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.by_residual = False  # codebooks are trained on the vectors themselves
        nprobe = max(1, min(nlist, nlist // 8))
        index.nprobe = nprobe
        index.own_fields = False
        index._quantizer_ref = quantizer  # keep it alive while `index` lives
    else:
        index = faiss.IndexPQ(d, m, nbits, faiss.METRIC_INNER_PRODUCT)
        nprobe = None
    faiss.copy_array_to_vector(np.ascontiguousarray(pq_cent.ravel()), index.pq.centroids)
    index.is_trained = True
    del train
    stored = stored_dtype_of(store, "vectors")
    for shard_no, _info in enumerate(store.shards):
        block = store.load_shard("vectors", shard_no, verify=verify)
        for lo in range(0, block.shape[0], 8192):
            index.add(np.ascontiguousarray(as_float32(np.asarray(block[lo : lo + 8192]), stored)))
    path = Path(store.path) / PQ_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    code_bytes = (m * nbits + 7) // 8
    return {
        "path": PQ_FILE,
        "faiss": "IndexIVFPQ" if nlist else "IndexPQ",
        "metric": "inner_product",
        "m": m,
        "nbits": nbits,
        "nlist": nlist or None,
        "nprobe": nprobe,
        "train_rows": int(train_rows),
        "niter": niter,
        "seed": seed,
        "bytes_per_doc": code_bytes + (8 if nlist else 0),  # IVF lists also store an int64 id
        "code_bytes_per_doc": code_bytes,
        "file_bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _load_pq(store: IndexStore, entry: dict, verify: bool):
    faiss = _faiss()
    path = Path(store.path) / entry["path"]
    if not path.exists():
        raise IndexStoreError(f"{path}: missing compressed index listed in the manifest")
    key = ("compressed/pq", 0)
    if verify and key not in store._verified:
        if sha256_file(path) != entry["sha256"]:
            raise IndexStoreError(f"{path}: checksum mismatch — compressed index corrupted; rerun `tracestar compress`")
        store._verified.add(key)
    cache = getattr(store, "_pq_cache", None)
    if cache is not None and cache[0] == entry["sha256"]:
        return cache[1]
    index = faiss.read_index(str(path))
    if entry.get("nprobe"):
        faiss.extract_index_ivf(index).nprobe = int(entry["nprobe"])
    store._pq_cache = (entry["sha256"], index)
    return index


# --- public --------------------------------------------------------------------------------------


def compress(
    index_dir: str | Path,
    kind: str,
    *,
    m: int | None = None,
    nbits: int = 8,
    nlist: int | None = None,
    train_rows: int | None = None,
    niter: int = 10,
    seed: int = 0,
    drop_exact: bool = False,
    verify: bool = True,
) -> dict:
    """Write the compressed form `kind` ("int8" | "pq") beside the exact shards; returns its manifest entry.

    The manifest's `"compressed"` gains `kind` (paths, checksums, bytes/doc) and `"default"` (the form
    `search` uses). `drop_exact=True` then deletes the `vectors/` shards (the manifest is updated
    first, so an interruption never leaves it pointing at deleted files); `raw/` stays.
    """
    if kind not in FORMS:
        raise UserError(f"unknown compressed form {kind!r}; choose one of {', '.join(FORMS)}")
    check_int("--m", m, minimum=1, optional=True)
    check_int("--nbits", nbits, minimum=1, maximum=16)
    check_int("--nlist", nlist, minimum=0, optional=True)
    store = IndexStore(index_dir)
    if not store.has_kind("vectors"):
        raise IndexStoreError(f"{index_dir}: no vectors/ shards to compress (already dropped?)")
    t0 = time.perf_counter()
    if kind == "int8":
        entry = _compress_int8(store, verify=verify)
    else:
        entry = _compress_pq(store, m=m, nbits=nbits, nlist=nlist, train_rows=train_rows, niter=niter, seed=seed, verify=verify)
    entry["source_dtype"] = stored_dtype_of(store, "vectors")
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    entry["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    manifest = read_manifest(index_dir)
    comp = dict(manifest.get("compressed") or {})
    comp[kind] = entry
    comp["default"] = kind
    comp.setdefault("exact_dropped", False)
    manifest["compressed"] = comp
    write_manifest(index_dir, manifest)

    if drop_exact:
        drop_exact_vectors(index_dir)
    return entry


def drop_exact_vectors(index_dir: str | Path) -> None:
    """Delete `vectors/` shards of a compressed index; the manifest records it (search becomes approximate)."""
    manifest = read_manifest(index_dir)
    comp = manifest.get("compressed") or {}
    if not any(f in comp for f in FORMS):
        raise IndexStoreError(f"{index_dir}: refusing to drop the exact vectors of an index with no compressed form")
    shards = []
    for info in manifest["shards"]:
        info = dict(info)
        if info.get("vectors_sha256"):
            info["vectors_sha256_dropped"] = info["vectors_sha256"]
        info["vectors_sha256"] = None
        shards.append(info)
    manifest["shards"] = shards
    comp = dict(comp)
    comp["exact_dropped"] = True
    comp["exact_dropped_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest["compressed"] = comp
    write_manifest(index_dir, manifest)
    for shard_no in range(len(shards)):
        shard_path(index_dir, "vectors", shard_no).unlink(missing_ok=True)
    try:
        (Path(index_dir) / "vectors").rmdir()
    except OSError:
        pass


def compressed_forms(store: IndexStore) -> list[str]:
    comp = store.manifest.get("compressed") or {}
    return [f for f in FORMS if f in comp]


def search_compressed(
    store: IndexStore,
    queries: np.ndarray,
    k: int,
    *,
    rerank: int | None = None,
    form: str | None = None,
    verify: bool = True,
    chunk_rows: int | None = None,
) -> SearchResult:
    """Candidates from the compressed form, re-ranked exactly from `vectors/` when present.

    rerank: how many candidates per query (and per direction) to re-score; default max(10k, 100).
    0 disables re-ranking (compressed scores). Opponents come from the most negative candidates.
    """
    comp = store.manifest.get("compressed") or {}
    forms = compressed_forms(store)
    if not forms:
        raise IndexStoreError(f"{store.path}: no compressed form; run `tracestar compress`")
    form = form or (comp.get("default") if comp.get("default") in forms else forms[0])
    if form not in forms:
        raise IndexStoreError(f"{store.path}: no compressed form {form!r} (have {', '.join(forms)})")
    entry = comp[form]
    q = _check_queries(store, queries)
    k_out = max(0, min(int(k), store.n_rows))
    if rerank is None:
        rerank = max(10 * k_out, 100)
    n_cand = max(k_out, min(int(rerank), store.n_rows)) if k_out else 0
    empty = SearchResult(*(np.zeros((q.shape[0], 0), dt) for dt in (np.int64, np.float32, np.int64, np.float32)))
    if k_out == 0:
        return empty

    if form == "int8":
        props, opps = _int8_candidates(store, q, n_cand, entry, verify, chunk_rows)
        p_rows, p_sc = props.rows.numpy(), props.vals.numpy()
        o_rows, o_sc = opps.rows.numpy(), -opps.vals.numpy()
    else:
        index = _load_pq(store, entry, verify)
        p_sc, p_rows = index.search(q, n_cand)
        o_neg, o_rows = index.search(-q, n_cand)
        o_sc = -o_neg
    p_rows, o_rows = np.asarray(p_rows, np.int64), np.asarray(o_rows, np.int64)

    if rerank and store.has_kind("vectors"):
        both = np.concatenate([p_rows, o_rows], axis=1)
        ex = exact_scores(store, q, both, verify=verify)
        p_sc, o_sc = ex[:, : p_rows.shape[1]], ex[:, p_rows.shape[1] :]
        o_sc = np.where(o_rows >= 0, o_sc, np.inf)
    else:
        p_sc = np.where(p_rows >= 0, p_sc, -np.inf)
        o_sc = np.where(o_rows >= 0, o_sc, np.inf)
    # equal scores (duplicate documents) in the order the exact search gives them: proponents by
    # ascending row, opponents by descending row; then a stable sort by score
    p_rows, p_sc = _by_row(p_rows, p_sc, descending=False)
    o_rows, o_sc = _by_row(o_rows, o_sc, descending=True)
    pi = np.argsort(-p_sc, axis=1, kind="stable")[:, :k_out]
    oi = np.argsort(o_sc, axis=1, kind="stable")[:, :k_out]
    return SearchResult(
        prop_rows=np.take_along_axis(p_rows, pi, 1),
        prop_scores=np.take_along_axis(p_sc, pi, 1).astype(np.float32),
        opp_rows=np.take_along_axis(o_rows, oi, 1),
        opp_scores=np.take_along_axis(o_sc, oi, 1).astype(np.float32),
    )


def _by_row(rows: np.ndarray, scores: np.ndarray, *, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each query's candidates [Q, c] reordered by row."""
    o = np.argsort(-rows if descending else rows, axis=1, kind="stable")
    return np.take_along_axis(rows, o, 1), np.take_along_axis(scores, o, 1)


def search(
    store: IndexStore,
    queries: np.ndarray,
    k: int,
    *,
    exact: bool = False,
    rerank: int | None = None,
    kind: str = "vectors",
    chunk_rows: int | None = None,
    verify: bool = True,
) -> SearchResult:
    """What `tracestar query` calls: the compressed form (+ exact re-rank) when present, unless
    `exact=True`; otherwise the exact streaming scan (sharded over ranks under torch.distributed)."""
    if not exact and kind == "vectors" and compressed_forms(store):
        return search_compressed(store, queries, k, rerank=rerank, verify=verify, chunk_rows=chunk_rows)
    return topk_distributed(store, queries, k, kind=kind, chunk_rows=chunk_rows, verify=verify)
