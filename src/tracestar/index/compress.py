"""Writing the compressed forms of an index's vectors, beside the exact shards.

Two forms, listed in the manifest under `"compressed"` (their readers: `index/int8.py`,
`index/pq.py`; `index/search.py` picks one):

- **int8**: per row and projection block, a symmetric scale = max|x| / 127 and codes =
  round(x / scale) in [-127, 127]. `compressed/int8/shard-NNNNN.npy` (int8 [rows, D]) +
  `compressed/int8/scales-NNNNN.npy` (float32 [rows, G], G blocks listed in the manifest entry
  as `groups`: [offset, size] column ranges). D + 4·G bytes per document: half of fp16. One scale
  per block, not per row, because blocks differ in magnitude (a GPT-2 embedding block can be ~10×
  smaller than its layer blocks) and a row-wide scale would leave the small block few levels.
- **pq**, two forms, chosen by `pq_params` from the dimension (the manifest entry's `form`):
  - "binary" (from BINARY_MIN_DIM = 16,384 dims): one sign bit per coordinate, packed
    (`compressed/pq-binary/codes-NNNNN.npy`, uint8 [rows, ⌈D/8⌉]) and one float per row
    (`factors-NNNNN.npy`, ‖x‖² / ‖x‖₁), read by `index/pq.py`: q·x ≈ (q·sign(x)) · ‖x‖² / ‖x‖₁,
    the estimator of RaBitQ (Gao & Long, SIGMOD 2024) without its random rotation (whitened
    vectors are already near-isotropic). Product quantization in its limit of one-dimensional
    sub-vectors with two centroids, ±‖x‖²/‖x‖₁: nothing to train, D/8 bytes per row (1/16 of
    fp16), and a query scan that is an int8 matrix product (±1 × the int8 query) rather than table
    lookups. Measured at 2^16 dims (bench/search.py `--pq-scan`): 8-bit PQ's lookups were 4.3×
    slower than the exact fp16 scan; FAISS's 4-bit fast scan was fast but, with thousands of
    sub-quantizers, its 16-bit accumulators force such coarse tables that its top 400 missed most
    of the exact top 10; the binary scan was faster than the exact one and its top 400 re-ranked
    held the exact top 10.
  - "pq" / "ivfpq" (below 16,384 dims, or when `m`, `nbits` or `nlist` is given): FAISS product
    quantization trained on the index's own vectors, inner-product metric (the vectors are
    unit-normalised): `IndexPQ`, or `IndexIVFPQ` for large corpora, in `compressed/pq.faiss`;
    FAISS ids are the index rows. The k-means runs here in torch, all sub-spaces batched, and the
    trained codebooks are handed to FAISS; the rows are encoded in torch the same way
    (`encode_pq`) and their codes added to FAISS as they are.
  Parameters come from the dimension and the row count, so that training, memory and query time
  stay bounded as both grow: see `pq_params` for the rule.

`compress(..., drop_exact=True)` then deletes the `vectors/` shards; searches become approximate.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tracestar import files
from tracestar.errors import IndexStoreError, UserError, check_int
from tracestar.index.int8 import Groups, whole_row
from tracestar.index.pq import BINARY_DIR, binary_paths, faiss_module
from tracestar.index.store import IndexStore, as_float32, read_manifest
from tracestar.index.writer import (
    COMPRESSED_DIR,
    COMPRESSED_FORMS,
    INT8_DIR,
    MANIFEST,
    PQ_FILE,
    VECTORS,
    int8_paths,
    shard_path,
    write_manifest,
)

IVF_MIN_ROWS = 50_000  # above this many rows 8-bit PQ uses an inverted file (IVF-PQ)
BINARY_MIN_DIM = 1 << 14  # from this many dims `compress --kind pq` writes the binary form (`pq_params`)
BINARY_RERANK = 400  # candidates per query and direction re-ranked exactly after the binary scan
BINARY_ENCODE_ROWS = 1024  # rows signed and packed at a time (float32 block of 256 MiB at 2^16 dims)
_NORM_ROWS = 32  # rows widened to float64 at a time for the binary form's norms (16 MiB at 2^16 dims):
# 0.58 ms per row at 2^16 dims, where widening 1,024-row blocks at once took 1.2 (one thread)
PQ_FORMS = ("binary", "faiss")  # what `compress(pq_form=...)` accepts (None: by the dimension)
PQ_MIN_DSUB = 4  # dims per sub-vector at least: 8-bit codes then take ≤ 1/8 of the fp16 bytes
PQ_MAX_M = 4096  # sub-quantizers at most: the scan reads m code bytes per row, whatever the dimension
PQ_RERANK = 100  # candidates re-ranked exactly per query at 4 dims per sub-vector, in proportion above
TRAIN_PER_CENTROID = 40  # k-means training points per centroid (FAISS asks for ≥ 39)
TRAIN_SAMPLE_BYTES = 2 << 30  # the float32 training sample is at most 2 GiB (8,192 rows at 2^16 dims)
IVF_PROBE_SHARE = 16  # an IVF query probes 1/16 of the lists
FORMS = COMPRESSED_FORMS
ENCODE_BLOCK_BYTES = 256 << 20  # float32 rows encoded at a time (PQ codes in torch)
# PQ codes come from torch from this many dims per sub-vector up; below, FAISS's own encoder, which
# computes 4-dim distances in registers, was faster (2^14 dims, 1 and 2 threads, ms per row, torch
# vs FAISS: 1.21 vs 0.85 at 4 dims, 0.68 vs 0.83 at 8, 0.38 vs 1.17 at 16). The codes are the same.
TORCH_ENCODE_MIN_DSUB = 8
_SAMPLE_BATCH = 4096  # rows gathered at a time for the PQ training sample


# --- int8 ----------------------------------------------------------------------------------------


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


def _compress_int8(store: IndexStore, *, verify: bool, block_rows: int = 4096) -> dict:
    """Write the int8 codes and scales of every shard, `block_rows` rows at a time; returns the manifest entry."""
    stored = store.stored_dtype(VECTORS)
    groups = block_groups(store)
    shards = []
    for shard_no, info in enumerate(store.shards):
        block = store.load_shard(VECTORS, shard_no, verify=verify)
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
                "codes_sha256": files.write_npy(cpath, codes),
                "scales_sha256": files.write_npy(spath, scales),
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


# --- PQ ------------------------------------------------------------------------------------------


def default_pq_m(dim: int, nbits: int = 8) -> int:
    """Sub-quantizers: dim / 4 (with 8 bits, 1/8 of the fp16 bytes), at most PQ_MAX_M, dividing dim.

    Past 4·PQ_MAX_M dims the sub-vectors grow instead (2^16 dims: 4,096 sub-quantizers of 16 dims,
    1/32 of the fp16 bytes), so a query's scan costs at most 4,096 lookups per row, its distance
    table 4 MiB, and k-means' distance blocks stay 4,096 × rows × 2^nbits. Wider sub-vectors
    quantize more coarsely; `pq_params` deepens the exact re-rank in proportion (measured on a
    clustered 2^14-dim index: top-10 overlap 0.99 at 4 dims per sub-vector, 0.69 at 16 with 100
    candidates, 0.91 with 400).
    """
    m = max(1, min(PQ_MAX_M, dim // PQ_MIN_DSUB))
    while dim % m:
        m -= 1
    return m


def pq_params(
    dim: int, n_rows: int, nbits: int | None = None, nlist: int | None = None, *, m: int | None = None,
    form: str | None = None,
) -> dict:
    """PQ's parameters for `n_rows` rows of `dim` dims: {form, m, nbits, nlist, nprobe, train_rows, rerank}.

    form "binary" from BINARY_MIN_DIM dims on, unless `m`, `nbits` or `nlist` asks for FAISS (or
    `form` is given): one sign bit per coordinate (m = dim sub-quantizers of 1 bit), nothing to
    train, flat (every row scanned), BINARY_RERANK candidates per query and direction re-ranked.
    No inverted file: on near-isotropic (whitened) vectors an IVF probing 1/16 of its lists found
    0.26–0.30 of the exact top 10 (200k–400k rows), and probing every list cost more than the exact
    scan, while the flat binary scan is itself faster than the exact one.

    Otherwise FAISS, form "pq" (`IndexPQ`) or "ivfpq" (`IndexIVFPQ`), 8 bits unless `nbits`:
    - m: `default_pq_m`; rerank: PQ_RERANK × (dims per sub-vector / 4) (400 at 2^16 dims).
    - nlist: as given; by default 0 up to IVF_MIN_ROWS rows and above, the power of two nearest
      √rows (1M rows: 1,024), at most train_rows / TRAIN_PER_CENTROID so every coarse centroid has
      its points. nprobe = nlist / IVF_PROBE_SHARE: a query scans ~1/16 of the rows' codes.
    - train_rows: a seeded sample of TRAIN_PER_CENTROID points per centroid (2^nbits for the
      sub-quantizers, nlist for the coarse one), capped at TRAIN_SAMPLE_BYTES of float32. Training
      then costs O(train_rows · 2^nbits · dim) per k-means iteration: linear in dim, not in rows.
    """
    if form is None:
        asked = m is not None or nbits is not None or nlist is not None
        form = "binary" if dim >= BINARY_MIN_DIM and not asked else "faiss"
    if form == "binary":
        return {"form": "binary", "m": dim, "nbits": 1, "nlist": 0, "nprobe": None, "train_rows": 0,
                "rerank": BINARY_RERANK}
    nbits = 8 if nbits is None else int(nbits)
    ksub = 1 << nbits
    cap = max(ksub, TRAIN_SAMPLE_BYTES // (4 * dim))
    if nlist is None:
        nlist = 0
        if n_rows > IVF_MIN_ROWS:
            nlist = 1 << round(float(np.log2(np.sqrt(n_rows))))
            while nlist > 1 and TRAIN_PER_CENTROID * nlist > min(cap, n_rows):
                nlist //= 2
    train_rows = min(n_rows, cap, TRAIN_PER_CENTROID * max(ksub, nlist))
    nprobe = max(1, nlist // IVF_PROBE_SHARE) if nlist else None
    m = m or default_pq_m(dim, nbits)
    rerank = PQ_RERANK * max(1, dim // m // PQ_MIN_DSUB)
    return {"form": "ivfpq" if nlist else "pq", "m": m, "nbits": nbits, "nlist": nlist, "nprobe": nprobe,
            "train_rows": int(train_rows), "rerank": rerank}


def _sample_rows(store: IndexStore, n: int, seed: int, verify: bool) -> np.ndarray:
    """float32 [min(n, rows), D]: a seeded random sample of the index's rows, in row order."""
    stored = store.stored_dtype(VECTORS)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(store.n_rows, size=min(n, store.n_rows), replace=False))
    out = np.empty((pick.size, store.dim), dtype=np.float32)
    for lo in range(0, pick.size, _SAMPLE_BATCH):  # the stored copy stays one batch big
        out[lo : lo + _SAMPLE_BATCH] = as_float32(store.gather(VECTORS, pick[lo : lo + _SAMPLE_BATCH], verify=verify), stored)
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
    group, rows = _kmeans_blocks(m, n, ksub)
    assign_all = torch.empty(m, n, dtype=torch.long)
    for _ in range(niter):
        for lo in range(0, m, group):
            hi = min(m, lo + group)
            xg, cg = xs[lo:hi], cent[lo:hi]
            _assign(xg, cg, assign_all[lo:hi], rows)
            assign = assign_all[lo:hi]  # [G, n]
            sums = torch.zeros_like(cg).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, dsub), xg)
            counts = torch.zeros(hi - lo, ksub).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
            filled = counts > 0
            new = sums / counts.clamp_min(1).unsqueeze(-1)
            cent[lo:hi] = torch.where(filled.unsqueeze(-1), new, cg)
    return cent.numpy()


def _assign(xg: torch.Tensor, cg: torch.Tensor, out: torch.Tensor, rows: int) -> None:
    """out[g, i] = argmin_j ||xg[g, i] − cg[g, j]||² for xg [G, n, dsub], cg [G, ksub, dsub], out [G, n].

    ||x||² is the same for every j, so it is left out: ||c||² − 2·x·c, one batched matmul per
    [G, rows, ksub] block (`_kmeans_blocks` sizes it to stay in cache). On one thread, a contiguous
    `ct` made the matmul 1.2–2.4× faster and `min(...).indices` (the first minimum, as `argmin`)
    took 0.66 ns per distance where `argmin` took 1.6.
    """
    norms = (cg * cg).sum(-1).unsqueeze(1)  # [G, 1, ksub]
    ct = cg.transpose(1, 2).contiguous()  # [G, dsub, ksub]
    for r in range(0, xg.shape[1], rows):
        out[:, r : r + rows] = torch.baddbmm(norms, xg[:, r : r + rows], ct, alpha=-2.0).min(dim=2).indices


def _kmeans_blocks(m: int, n: int, ksub: int) -> tuple[int, int]:
    """(sub-spaces, rows) per k-means distance block: ~1M floats (4 MiB), so the block is written
    and read back from cache. Whole [G, n, ksub] blocks of 128 MiB made the assignment step
    memory-bound: 2.2–2.8× slower at 2,048 sub-spaces of 8 dims and 4,096 rows."""
    rows = max(1, min(n, (1 << 20) // ksub))
    return max(1, min(m, (1 << 20) // (rows * ksub))), rows


def _trained_pq(faiss, train: np.ndarray, m: int, nbits: int, nlist: int, nprobe: int | None, *, niter: int, seed: int):
    """(an empty FAISS PQ index with codebooks trained on `train` [n, D], its nprobe or None).

    k-means in torch, all sub-spaces batched (FAISS trains sub-quantizers one by one, which took
    ~0.2 s each here: minutes for the thousands of sub-quantizers a 16k–65k-dim index needs). With
    `nlist`, an inverted file over `nlist` coarse centroids of the same sample (IVF-PQ).
    """
    d = train.shape[1]
    pq_cent = train_pq_codebooks(train, m, nbits, niter=niter, seed=seed)
    if nlist:
        coarse = train_pq_codebooks(train, 1, None, niter=niter, seed=seed + 1, ksub=nlist)[0]
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(np.ascontiguousarray(coarse))
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.by_residual = False  # codebooks are trained on the vectors themselves
        nprobe = min(nlist, nprobe or max(1, nlist // IVF_PROBE_SHARE))
        index.nprobe = nprobe
        # faiss's Python constructor keeps a reference to `quantizer`, so it lives as long as `index`
    else:
        index = faiss.IndexPQ(d, m, nbits, faiss.METRIC_INNER_PRODUCT)
        nprobe = None
    faiss.copy_array_to_vector(np.ascontiguousarray(pq_cent.ravel()), index.pq.centroids)
    index.is_trained = True
    return index, nprobe


def encode_pq(x: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """PQ codes of float32 rows x [n, D] for codebooks cent [m, ksub, D/m] → long [n, m]: per
    sub-space the L2-nearest centroid, what FAISS's `ProductQuantizer.compute_codes` computes.

    FAISS does it one row at a time below 16 dims per sub-vector and one sub-quantizer at a time
    above (9–30 ms per row at 2^16 dims); here it is the k-means assignment (`_assign`), all rows of
    a sub-space group in one batched matmul per cache-sized block. Codes can differ from FAISS's only
    where two centroids are equally near within float32 rounding.
    """
    n = x.shape[0]
    m, ksub, dsub = cent.shape
    xs = x.reshape(n, m, dsub).transpose(0, 1).contiguous()  # [m, n, dsub]
    group, rows = _kmeans_blocks(m, n, ksub)
    codes = torch.empty(m, n, dtype=torch.long)
    for lo in range(0, m, group):
        _assign(xs[lo : lo + group], cent[lo : lo + group], codes[lo : lo + group], rows)
    return codes.T  # [n, m]


def _pq_sa_codes(x: torch.Tensor, cent: torch.Tensor, coarse: torch.Tensor | None, coarse_bytes: int) -> np.ndarray:
    """uint8 [n, coarse_bytes + m]: FAISS's standalone code of each row (`sa_encode`) for 8-bit PQ.

    For IVF-PQ (`coarse` [nlist, D]) the row's list comes first, little-endian in `coarse_bytes`
    bytes: its coarse centroid of largest inner product, as the `IndexFlatIP` quantizer assigns
    (no residual: `by_residual` is off). Then one byte per sub-quantizer.
    """
    pq = encode_pq(x, cent).to(torch.uint8).numpy()  # [n, m]
    if coarse is None:
        return np.ascontiguousarray(pq)
    lists = (x @ coarse.T).argmax(dim=1).numpy().astype("<i8")  # [n]
    head = lists.view(np.uint8).reshape(-1, 8)[:, :coarse_bytes]
    return np.ascontiguousarray(np.concatenate([head, pq], axis=1))


def _encode_rows(dim: int) -> int:
    """Rows encoded at a time: ENCODE_BLOCK_BYTES of float32 (1,024 rows at 2^16 dims), at most 8,192."""
    return max(1, min(8192, ENCODE_BLOCK_BYTES // (4 * dim)))


def _fill_pq(faiss, index, store: IndexStore, verify: bool) -> None:
    """Encode every row of `store` into the trained FAISS `index`, in row order (FAISS ids = rows).

    8-bit codes of sub-vectors of at least TORCH_ENCODE_MIN_DSUB dims are computed in torch
    (`encode_pq`) and handed over with `add_sa_codes`, so the stored index is the one `index.add`
    would write. Narrower sub-vectors, and other code widths (bit-packed), go through FAISS's `add`.
    """
    pq = index.pq
    cent = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub))
    ivf = isinstance(index, faiss.IndexIVF)
    coarse = torch.from_numpy(index.quantizer.reconstruct_n(0, index.nlist)) if ivf else None
    coarse_bytes = index.coarse_code_size() if ivf else 0
    stored, step = store.stored_dtype(VECTORS), _encode_rows(store.dim)
    for shard_no, _info in enumerate(store.shards):
        block = store.load_shard(VECTORS, shard_no, verify=verify)
        for lo in range(0, block.shape[0], step):
            x = np.ascontiguousarray(as_float32(np.asarray(block[lo : lo + step]), stored))
            x = x if x.flags.writeable else x.copy()  # torch.from_numpy wants a writable array
            if pq.nbits != 8 or pq.dsub < TORCH_ENCODE_MIN_DSUB:
                index.add(x)
                continue
            index.add_sa_codes(_pq_sa_codes(torch.from_numpy(x), cent, coarse, coarse_bytes))


def encode_binary(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows x [n, D] → (sign bits uint8 [n, ⌈D/8⌉], factors float32 [n]) of the binary form.

    Bit j of a row (little-endian within each byte) is 1 where x_j ≥ 0 (reads as +1), else 0
    (−1); the padding bits past D are 0 and meet zero query coordinates. factor = ‖x‖² / ‖x‖₁, so
    that (q·sign(x)) · factor estimates q·x (`index/pq.py`); 0 for an all-zero row (a non-finite
    document's), which then scores 0 as it does exactly.
    """
    x = np.asarray(x, dtype=np.float32)
    codes = np.packbits(x >= 0, axis=1, bitorder="little")
    l1, l2 = np.empty(x.shape[0]), np.empty(x.shape[0])
    for lo in range(0, x.shape[0], _NORM_ROWS):
        # float64 rows, summed without casting buffers, so a row's sums do not depend on where it
        # sits and duplicate rows get identical factors
        x64 = x[lo : lo + _NORM_ROWS].astype(np.float64)
        l2[lo : lo + _NORM_ROWS] = np.einsum("ij,ij->i", x64, x64)
        l1[lo : lo + _NORM_ROWS] = np.abs(x64, out=x64).sum(axis=1)
    factors = np.divide(l2, l1, out=np.zeros_like(l1), where=l1 > 0)
    return codes, factors.astype(np.float32)


def _compress_binary(store: IndexStore, *, verify: bool) -> dict:
    """Write the binary form of every shard, BINARY_ENCODE_ROWS rows at a time; returns the manifest entry."""
    stored = store.stored_dtype(VECTORS)
    t0 = time.perf_counter()
    shards = []
    n_bytes = (store.dim + 7) // 8
    for shard_no, info in enumerate(store.shards):
        block = store.load_shard(VECTORS, shard_no, verify=verify)
        codes = np.empty((block.shape[0], n_bytes), dtype=np.uint8)
        factors = np.empty(block.shape[0], dtype=np.float32)
        for lo in range(0, block.shape[0], BINARY_ENCODE_ROWS):
            c, f = encode_binary(as_float32(np.asarray(block[lo : lo + BINARY_ENCODE_ROWS]), stored))
            codes[lo : lo + len(f)], factors[lo : lo + len(f)] = c, f
        cpath, fpath = binary_paths(store.path, shard_no)
        shards.append({"name": info["name"], "start": int(info["start"]), "rows": int(info["rows"]),
                       "codes_sha256": files.write_npy(cpath, codes), "factors_sha256": files.write_npy(fpath, factors)})
    return {
        "path": BINARY_DIR,
        "form": "binary",
        "scheme": "sign bits (1 = x ≥ 0), little-endian per byte; factor = ‖x‖² / ‖x‖₁; q·x ≈ (q·sign(x)) · factor",
        "dim": store.dim,
        "m": store.dim,
        "nbits": 1,
        "rerank": BINARY_RERANK,
        "train_rows": 0,
        "train_seconds": 0.0,  # nothing to train
        "encode_seconds": round(time.perf_counter() - t0, 3),
        "bytes_per_doc": n_bytes + 4,
        "code_bytes_per_doc": n_bytes,
        "shards": shards,
    }


def _compress_pq(
    store: IndexStore,
    *,
    m: int | None,
    nbits: int | None,
    nlist: int | None,
    train_rows: int | None,
    niter: int,
    seed: int,
    verify: bool,
    form: str | None = None,
) -> dict:
    """Write the PQ form `pq_params` picks (or `form`): the binary one, or a trained FAISS index
    in `compressed/pq.faiss`; returns its manifest entry."""
    d = store.dim
    auto = pq_params(d, store.n_rows, nbits, nlist, m=m, form=form)
    if auto["form"] == "binary":
        return _compress_binary(store, verify=verify)
    faiss = faiss_module()
    m, nbits, nlist, nprobe = auto["m"], auto["nbits"], auto["nlist"], auto["nprobe"]
    if d % m:
        raise UserError(f"--m {m} must divide the index dimension {d}")
    train_rows = train_rows or auto["train_rows"]
    t0 = time.perf_counter()
    train = _sample_rows(store, train_rows, seed, verify)
    index, nprobe = _trained_pq(faiss, train, m, nbits, nlist, nprobe, niter=niter, seed=seed)
    train_s = time.perf_counter() - t0
    del train
    t1 = time.perf_counter()
    _fill_pq(faiss, index, store, verify)
    encode_s = time.perf_counter() - t1
    path = Path(store.path) / PQ_FILE
    with files.replacing(path) as tmp:
        faiss.write_index(index, str(tmp))
    code_bytes = (m * nbits + 7) // 8
    return {
        "path": PQ_FILE,
        "form": auto["form"],
        "faiss": "IndexIVFPQ" if nlist else "IndexPQ",
        "metric": "inner_product",
        "m": m,
        "nbits": nbits,
        "nlist": nlist or None,
        "nprobe": nprobe,
        "train_rows": int(min(train_rows, store.n_rows)),
        "rerank": auto["rerank"],  # default re-rank depth (`pq_params`)
        "train_seconds": round(train_s, 3),
        "encode_seconds": round(encode_s, 3),
        "niter": niter,
        "seed": seed,
        "bytes_per_doc": code_bytes + (8 if nlist else 0),  # IVF lists also store an int64 id
        "code_bytes_per_doc": code_bytes,
        "file_bytes": path.stat().st_size,
        "sha256": files.sha256_file(path),
    }


# --- public --------------------------------------------------------------------------------------


def compress(
    index_dir: str | Path,
    kind: str,
    *,
    m: int | None = None,
    nbits: int | None = None,
    nlist: int | None = None,
    train_rows: int | None = None,
    niter: int = 10,
    seed: int = 0,
    drop_exact: bool = False,
    verify: bool = True,
    pq_form: str | None = None,
) -> dict:
    """Write the compressed form `kind` ("int8" | "pq") beside the exact shards; returns its manifest entry.

    The manifest's `"compressed"` gains `kind` (paths, checksums, bytes/doc) and `"default"` (the form
    `search` uses). `drop_exact=True` then deletes the `vectors/` shards (the manifest is updated
    first, so an interruption never leaves it pointing at deleted files); `raw/` stays.
    pq_form: "binary" or "faiss" to override `pq_params`' choice by the dimension (kind "pq").
    Writing one PQ form deletes the other's files once the manifest no longer lists them.
    """
    if kind not in FORMS:
        raise UserError(f"unknown compressed form {kind!r}; choose one of {', '.join(FORMS)}")
    check_int("--m", m, minimum=1, optional=True)
    check_int("--nbits", nbits, minimum=1, maximum=16, optional=True)
    check_int("--nlist", nlist, minimum=0, optional=True)
    if pq_form is not None and pq_form not in PQ_FORMS:
        raise UserError(f"unknown PQ form {pq_form!r}; choose one of {', '.join(PQ_FORMS)}")
    store = IndexStore(index_dir)
    if not store.has_kind(VECTORS):
        raise IndexStoreError(f"{index_dir}: no vectors/ shards to compress (already dropped?)")
    # What a killed compress left: its forms' and the manifest's temporary files.
    files.remove_temporaries(Path(index_dir) / COMPRESSED_DIR)
    files.remove_temporaries(index_dir, MANIFEST)
    t0 = time.perf_counter()
    if kind == "int8":
        entry = _compress_int8(store, verify=verify)
    else:
        entry = _compress_pq(store, m=m, nbits=nbits, nlist=nlist, train_rows=train_rows, niter=niter, seed=seed,
                             verify=verify, form=pq_form)
    entry["source_dtype"] = store.stored_dtype(VECTORS)
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    entry["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    manifest = read_manifest(index_dir)
    comp = dict(manifest.get("compressed") or {})
    comp[kind] = entry
    comp["default"] = kind
    comp.setdefault("exact_dropped", False)
    manifest["compressed"] = comp
    write_manifest(index_dir, manifest)
    if kind == "pq":
        _remove_other_pq_form(index_dir, entry)

    if drop_exact:
        drop_exact_vectors(index_dir)
    return entry


def _remove_other_pq_form(index_dir: str | Path, entry: dict) -> None:
    """Delete the files of the PQ form `entry` replaced (the manifest, already written, lists only `entry`)."""
    if entry.get("form") == "binary":
        (Path(index_dir) / PQ_FILE).unlink(missing_ok=True)
    else:
        shutil.rmtree(Path(index_dir) / BINARY_DIR, ignore_errors=True)


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
        shard_path(index_dir, VECTORS, shard_no).unlink(missing_ok=True)
    try:
        (Path(index_dir) / VECTORS).rmdir()
    except OSError:
        pass
