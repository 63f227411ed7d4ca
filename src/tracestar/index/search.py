"""Exact streaming top-k search over an index's vector shards.

One pass over the shards, a chunk of rows at a time, yields both lists: proponents (highest scores)
and opponents (most negative). Memory is bounded by the chunk size and k, never by the corpus.

**The score of a row** is the exact dot product of the query with the stored (decoded) vector,
rounded once to the nearest float32 (`canonical_scores`). It is a function of the row's bytes and
the query alone: BLAS kernels do not promise one summation order (a row's place in a kernel tile
changes it, and so can the CPU), so two copies of one document could otherwise score a few ulps
apart and come back in either order. Equal stored vectors therefore always tie, and ties are
broken by row like a stable sort (proponents: ascending row; opponents: descending row, i.e. the
reverse of the proponents' order). The rounding is computed as a float64 product (exact for float32
operands) whose error bound decides whether the float32 rounding is certain; the rare pair near a
float32 rounding boundary is summed again exactly (`_exact_round_f32`).

How a chunk is scanned (measured on a 2-core AVX512-BF16/FP16 CPU, see bench/search.py):

- The matmul runs in the stored dtype (oneDNN has native bf16 and fp16 kernels with fp32
  accumulation; float32 shards use the fp32 gemm), the query rounded to the same dtype; float16 /
  bfloat16 chunks are *not* converted to float32 (that conversion ran far below memory bandwidth).
  That score is approximate, with a per-query error bound
  `e(s) = (‖q − q_low‖ + acc)·‖x‖ + rel·|s|` (query rounding, accumulation, output rounding), so a
  different kernel tiling moves it by far less than its bound.
- The scan keeps only approximate top-(k + margin) lists per query (for s and −s); no exact work
  runs per chunk. Afterwards the listed rows whose bound reaches the k-th best get their canonical
  score (a sorted gather from the mmaps), and each query gets a certificate: the k-th canonical
  score beats the float32 rounding of every unlisted row's upper bound. Bounds are compared after
  that rounding, so a row that could round to the k-th score (a tie, to be broken by row) is never
  dropped. Queries without a certificate (the error band held more rows than the margin) are
  rescanned with inline re-scoring (`_scan_inline`). So the result equals a brute force of
  canonical scores with a stable sort, and the scan itself costs about the bare stored-dtype
  matmuls (bench/search.py).

Distributed (`topk_distributed`): under torch.distributed rank r scans shards s ≡ r (mod world) and
the per-rank lists are all-gathered and merged, which gives the single-process answer.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from tracestar.errors import IndexStoreError, UserError
from tracestar.index.store import IndexStore

# Rows per chunk are chosen so one chunk of stored vectors is about this many bytes: big enough to
# amortise per-call overhead, small enough to stay in the last-level cache for the exact re-score.
CHUNK_BYTES = 32 << 20

# Relative output-rounding error of a chunk matmul whose result is stored in the given dtype
# (half an ulp, with slack for the conversion of the accumulator).
_REL_OUT = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 2.0**-23}

# Accumulation error of a chunk matmul (fp32 accumulators), per unit of ‖q‖·‖x‖: λ·√D·u32. The
# worst case D·u32 is far from what blocked kernels do: rounding errors add up like a random walk
# (Higham & Mary, SIAM J. Sci. Comput. 2019: the bound holds with probability ≥ 1 − 2D·e^(−λ²/2),
# i.e. 1 − 6e-18 per score at λ = 10, D = 16k), whatever order a kernel sums in.
_ACC_LAMBDA = 10.0


@dataclass
class SearchResult:
    """Top-k proponents (descending scores) and opponents (ascending: most negative first)."""

    prop_rows: np.ndarray  # [Q, k'] int64
    prop_scores: np.ndarray  # [Q, k'] float32
    opp_rows: np.ndarray  # [Q, k'] int64
    opp_scores: np.ndarray  # [Q, k'] float32

    @property
    def k(self) -> int:
        return int(self.prop_rows.shape[1])


# --- helpers -----------------------------------------------------------------------------------


def stored_dtype_of(store: IndexStore, kind: str) -> str:
    if kind == "raw":
        return "float32"
    return str(store.manifest.get("dtype", "float16"))


def _check_queries(store: IndexStore, queries: np.ndarray) -> np.ndarray:
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != store.dim:
        raise UserError(f"query vectors have shape {tuple(q.shape)}, the index has dim {store.dim}")
    if not np.isfinite(q).all():
        raise UserError("query vectors contain NaN or inf")
    return q


def _as_tensor(block: np.ndarray, stored: str) -> torch.Tensor:
    """Zero-copy torch view of a (memory-mapped, read-only) stored block in its own dtype."""
    arr = np.asarray(block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only mmap: we never write through it
        t = torch.from_numpy(arr)
    if stored == "bfloat16":
        return t.view(torch.bfloat16)
    if stored == "float16":
        return t if t.dtype == torch.float16 else t.to(torch.float16)
    if stored == "int8":
        return t
    return t if t.dtype == torch.float32 else t.float()


def _default_chunk_rows(dim: int, itemsize: int) -> int:
    return int(max(16, min(1 << 16, CHUNK_BYTES // max(1, dim * itemsize))))


class _RunningTopK:
    """Per-query running top-k of exact scores (largest), with their global rows.

    `ties`: None keeps whichever tied entries torch.topk picks (fast; approximate candidate lists);
    "asc" / "desc" breaks equal scores by ascending / descending row, which is the order a stable
    sort of a brute force gives for proponents / opponents (exact duplicates in a corpus tie).
    """

    def __init__(self, n_queries: int, k: int, ties: str | None = None):
        self.k = k
        self.ties = ties
        self.vals = torch.full((n_queries, k), -float("inf"))
        self.rows = torch.full((n_queries, k), -1, dtype=torch.int64)

    def threshold(self) -> torch.Tensor:
        """[Q] current k-th best (−inf until k rows were seen)."""
        if self.k == 0:
            return torch.full((self.vals.shape[0],), float("inf"))
        return self.vals[:, -1]

    def merge(self, vals: torch.Tensor, rows: torch.Tensor) -> None:
        """vals [Q, n] exact scores of global rows [n] or [Q, n]."""
        if self.k == 0 or vals.shape[1] == 0:
            return
        if rows.dim() == 1:
            rows = rows.unsqueeze(0).expand(vals.shape[0], -1)
        all_vals = torch.cat([self.vals, vals.float()], dim=1)
        all_rows = torch.cat([self.rows, rows], dim=1)
        if self.ties is None:
            top, idx = torch.topk(all_vals, self.k, dim=1, largest=True, sorted=True)
            self.vals, self.rows = top, torch.gather(all_rows, 1, idx)
            return
        # rows first (padding −1 rows carry −inf, so they never outrank a real row), then a stable
        # sort by score: equal scores stay in row order.
        o = torch.argsort(all_rows, dim=1, descending=self.ties == "desc", stable=True)
        all_vals, all_rows = torch.gather(all_vals, 1, o), torch.gather(all_rows, 1, o)
        o = torch.argsort(all_vals, dim=1, descending=True, stable=True)[:, : self.k]
        self.vals, self.rows = torch.gather(all_vals, 1, o), torch.gather(all_rows, 1, o)


def _merge_above_threshold(lst: _RunningTopK, sc: torch.Tensor, first_row: int) -> None:
    """Merge a chunk's scores [Q, C] into a running list, looking only at columns that can enter.

    A row whose score is ≤ every query's current m-th best cannot change any list, so only the
    columns where some query beats its threshold are selected and ranked (after the first chunks
    that is a few per thousand): a compare over the chunk instead of a top-k over it.
    """
    cols = torch.nonzero((sc > lst.threshold().unsqueeze(1)).any(dim=0)).squeeze(1)  # [c]
    if cols.numel() == 0:
        return
    sub = sc.index_select(1, cols)  # [Q, c]
    v, i = torch.topk(sub, min(lst.k, cols.numel()), dim=1)  # [Q, ≤m]
    if lst.ties is not None and cols.numel() > lst.k:
        _mend_split_ties(sub, v, i, lst.ties)
    lst.merge(v, cols[i] + first_row)


def _mend_split_ties(sub: torch.Tensor, v: torch.Tensor, i: torch.Tensor, ties: str) -> None:
    """Where top-k cut through equal scores (exact duplicates), keep the tied columns a stable sort keeps.

    torch.topk picks any of the tied columns at the boundary; columns are in row order, so "asc"
    keeps the first ones and "desc" the last. Rare, so mended per affected query, in place.
    """
    kth = v[:, -1:]  # [Q, 1]
    split = (sub == kth).sum(dim=1) > (v == kth).sum(dim=1)  # [Q] more ties than slots for them
    for qi in torch.nonzero(split).squeeze(1).tolist():
        above = torch.nonzero(sub[qi] > kth[qi]).squeeze(1)
        tied = torch.nonzero(sub[qi] == kth[qi]).squeeze(1)
        tied = tied[: v.shape[1] - above.numel()] if ties == "asc" else tied.flip(0)[: v.shape[1] - above.numel()]
        keep = torch.cat([above, tied])
        order = torch.argsort(sub[qi, keep], descending=True, stable=True)
        i[qi] = keep[order]
        v[qi] = sub[qi, i[qi]]


# --- canonical scores: the exact dot product, rounded once to float32 -----------------------------

_U64 = 2.0**-53  # unit roundoff of float64


def _gamma(n: int) -> float:
    """γ_n = n·u/(1 − n·u): a float64 sum of n terms in any order is within γ_n·Σ|terms| of the exact sum."""
    return n * _U64 / (1.0 - n * _U64)


def _f64_dots(q64: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[Q, n] float64 q·xᵀ (x float16 / float32, widened on the fly), summed in whatever order the
    kernel picks.

    The products of float32 operands are exact in float64, so the result is within γ_D·Σ|q_i·x_i|
    of the exact dot product wherever the row sits in a kernel's tiles. One query (the re-score
    of a scan's candidates) goes through einsum's buffered loop: single-threaded and cache-sized,
    which on a loaded 2-core machine ran 3–10× faster than torch's threaded kernels on these
    small operands.
    """
    if q64.shape[0] == 1:
        return np.einsum("ij,j->i", x, q64[0], dtype=np.float64)[None, :]
    return q64 @ x.astype(np.float64).T


def _round_if_certain(f: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 rounding of f, where it is certain): every value within ±delta of f rounds alike.

    Rounding is monotone, so both ends of the interval rounding alike settles every value between.
    Non-finite values count as certain (they round to themselves).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        sure = ((f - delta).astype(np.float32) == (f + delta).astype(np.float32)) | ~np.isfinite(f)
        return f.astype(np.float32), sure


def canonical_scores(q: np.ndarray, x: np.ndarray, x_norm: float | None = None) -> np.ndarray:
    """[Q, n] float32: each q_i·x_j computed exactly and rounded once to the nearest float32 (ties to even).

    q: float32 [Q, D]; x: [n, D] float16 or float32 (bfloat16 rows widened by `_decoded`).
    x_norm: a bound on every ‖x_j‖ when the caller has one (a unit-norm index); else the norms
    are computed. The result depends only on the two vectors: not on where x_j sits in x, nor on
    the BLAS, the CPU or the thread count. So equal stored vectors always tie, and every search
    path, the compressed re-rank and the brute force agree bit for bit.
    """
    q64 = np.asarray(q, dtype=np.float64)
    f = _f64_dots(q64, x)  # [Q, n]
    nq = np.sqrt(np.einsum("ij,ij->i", q64, q64))
    if x_norm is None:
        nx = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    else:
        nx = np.full(x.shape[0], float(x_norm))
    # |f − exact| ≤ γ_D·Σ|q_i x_i| ≤ γ_D·‖q‖·‖x‖; the factor 2 covers the norms' own rounding
    delta = (2.0 * _gamma(q64.shape[1])) * nq[:, None] * nx[None, :] + 2.0**-51 * np.abs(f)
    out, sure = _round_if_certain(f, delta)
    if not sure.all():  # f lies near a float32 rounding boundary: sum those products again
        qi, xj = np.nonzero(~sure)
        out[qi, xj] = _exact_round_f32(q64[qi] * x[xj].astype(np.float64))
    return out


def _compensated_sum(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row sums of p [a, n] float64 by a fixed pairwise tree with TwoSum at every node.

    Returns (hi, lo, bound) [a]: the tree's plain sum, the sum of its exact rounding errors, and a
    bound on |hi + lo − exact sum| (the errors are themselves summed in float64: γ·u·depth·Σ|p|).
    """
    n = p.shape[1]
    width = 1 << max(0, (n - 1).bit_length())
    s = np.pad(p, ((0, 0), (0, width - n)))  # zeros add exactly
    e = np.zeros_like(s[:, :1])
    depth = 0
    while s.shape[1] > 1:
        h = s.shape[1] // 2
        a, b = s[:, :h], s[:, h:]
        t = a + b
        z = t - a
        err = (a - (t - z)) + (b - z)  # Knuth's TwoSum: a + b = t + err exactly
        e = err if depth == 0 else e[:, :h] + e[:, h:] + err
        s, depth = t, depth + 1
    bound = 2.0 * _gamma(2 * depth + 2) * _U64 * (depth + 1) * np.abs(p).sum(axis=1)
    return s[:, 0], e[:, 0], bound


def _exact_round_f32(p: np.ndarray) -> np.ndarray:
    """[a] float32: each row's exact sum of the float64 terms p [a, n], rounded once to float32.

    The compensated sum settles the rounding unless the sum sits within a few float64 ulps of a
    float32 midpoint; those rows are summed exactly (`math.fsum`).
    """
    hi, lo, bound = _compensated_sum(p)
    f = hi + lo
    out, sure = _round_if_certain(f, 2.0 * bound + 2.0**-51 * np.abs(f))
    for i in np.flatnonzero(~sure):
        out[i] = _round_f32_exactly(p[i].tolist())
    return out


def _round_f32_exactly(terms: list[float]) -> float:
    """The float32 nearest to the exact sum of float64 terms (ties to even)."""
    s = math.fsum(terms)  # the exact sum rounded once to float64
    c = np.float32(s)
    if not math.isfinite(s) or float(c) == s:
        return float(c)
    other = np.nextafter(c, np.float32(math.inf if s > float(c) else -math.inf))
    if s != (float(c) + float(other)) / 2:  # not on a float32 midpoint: s and the exact sum round alike
        return float(c)
    rest = math.fsum([*terms, -s])  # the exact sum − s, whose sign decides the side
    if rest == 0.0:
        return float(c)  # an exact tie, already rounded to even
    return float(max(c, other) if rest > 0 else min(c, other))


def _decoded(block: np.ndarray, stored: str) -> np.ndarray:
    """Stored rows as float16 / float32 numpy (bf16 bit patterns widened exactly to float32: the
    top half of the float32 word; shifted in place, which measured faster than `as_float32`)."""
    if stored != "bfloat16":
        return np.asarray(block)
    wide = np.asarray(block, dtype=np.uint16).astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


# --- the scan ---------------------------------------------------------------------------------------

_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}

# Candidates kept per query and side during the scan, beyond k. Every row whose error band overlaps
# the k-th best must be re-scored. For unit vectors at D ≈ 16k that band holds a few rows for fp16
# and ~100 for bf16 (rounding 8× coarser), fewer for fp32; a query whose band overflows the list is
# rescanned (`_scan_inline`), so the margin only trades list upkeep against rescans.
_MARGIN = {"float16": 64, "bfloat16": 256, "float32": 32}


def _chunk_scores(q_low: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    """[Q, C] float32 scores of the low-precision query against a stored chunk (stored dtype matmul).

    X·qᵀ with the big chunk as the row-major source operand: oneDNN then repacks only the small
    query panel per call (not the chunk), which measured a little faster than q·Xᵀ for bf16.
    """
    return torch.mm(xc, q_low.T).T.float()


@dataclass
class _Bounds:
    """How far a chunk score can be from the exact dot product, per query (see the module doc)."""

    q_low: torch.Tensor  # [Q, D] the query as the chunk matmul sees it (stored dtype)
    base: torch.Tensor  # [Q] float64: ‖q − q_low‖ + acc·‖q‖; times ‖x‖ it bounds query rounding + accumulation
    rel: float  # output rounding, relative to |s|
    unit: bool  # the index promises unit rows (‖x‖ ≤ 1.01 after the stored rounding); the bounds,
    # and the canonical re-score's own error bound, trust that promise (the builder normalises)

    @classmethod
    def of(cls, store: IndexStore, kind: str, q: np.ndarray) -> _Bounds:
        stored = stored_dtype_of(store, kind)
        q32 = torch.from_numpy(q)
        q_low = q32.to(_TORCH_DTYPE[stored])
        # Cauchy–Schwarz: |(q − q_low)·x| ≤ ‖q − q_low‖·‖x‖ (the difference is exact in float32;
        # ×1.01 covers the float32 norms' rounding)
        a_q = torch.linalg.vector_norm(q32 - q_low.float(), dim=1).double() * 1.01
        acc = _ACC_LAMBDA * math.sqrt(store.dim) * 2.0**-24 * torch.linalg.vector_norm(q32, dim=1).double() * 1.01
        unit = bool(store.manifest.get("unit_norm", True)) and kind == "vectors"
        return cls(q_low, a_q + acc, _REL_OUT[stored], unit)

    def norm_bound(self, xc: torch.Tensor) -> float:
        """An upper bound of ‖x‖ over a chunk's rows."""
        if self.unit:
            return 1.01
        return torch.linalg.vector_norm(xc, dim=1, dtype=torch.float32).max().item() * 1.01

    def interval(self, s: torch.Tensor, xn: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(lower, upper) float32 like s [Q, n]: float32 roundings of bounds on each exact score.

        Canonical scores are roundings of exact scores and rounding is monotone, so a row's
        canonical score lies in [lower, upper]; comparing these (not the unrounded bounds) never
        loses a row that could round to a tie.
        """
        s64 = s.double()
        mag = torch.nan_to_num(s64.abs(), posinf=0.0)  # −inf: list padding, far below any bound
        err = (self.base.unsqueeze(1) * xn + self.rel * mag) * (1.0 + 2.0**-40)
        return (s64 - err).float(), (s64 + err).float()


def _approx_lists(
    store: IndexStore, q: np.ndarray, shard_nos: list[int], bounds: _Bounds, m: int, *, kind: str,
    chunk_rows: int | None, verify: bool,
) -> tuple[list[_RunningTopK], float]:
    """One pass of stored-dtype matmuls: approximate top-m lists of s and of −s, and a bound of ‖x‖."""
    lists = [_RunningTopK(q.shape[0], m), _RunningTopK(q.shape[0], m)]
    xn_max = 0.0
    for first_row, _, xc, s in _scored_chunks(store, q, shard_nos, bounds, kind=kind, chunk_rows=chunk_rows, verify=verify):
        xn_max = max(xn_max, bounds.norm_bound(xc))
        for lst, sc in ((lists[0], s), (lists[1], -s)):
            _merge_above_threshold(lst, sc, first_row)
    return lists, xn_max


def _scored_chunks(
    store: IndexStore, q: np.ndarray, shard_nos: list[int], bounds: _Bounds, *, kind: str,
    chunk_rows: int | None, verify: bool,
) -> Iterator[tuple[int, np.ndarray, torch.Tensor, torch.Tensor]]:
    """The one streaming loop of both scans: per chunk of each shard, in row order, its first row,
    its stored rows, their tensor and the [Q, C] approximate stored-dtype scores."""
    stored = stored_dtype_of(store, kind)
    rows_per_chunk = chunk_rows or _default_chunk_rows(store.dim, _ITEMSIZE[stored])
    for shard_no in shard_nos:
        start = int(store.shards[shard_no]["start"])
        block = store.load_shard(kind, shard_no, verify=verify)
        for lo in range(0, block.shape[0], rows_per_chunk):
            rows = block[lo : lo + rows_per_chunk]
            xc = _as_tensor(rows, stored)
            s = _chunk_scores(bounds.q_low, xc)  # [Q, C] approximate
            if not torch.isfinite(s).all():  # fp16 overflow (non-unit vectors): fp32 scores, within the bound
                s = torch.mm(torch.from_numpy(q), xc.float().T)
            yield start + lo, rows, xc, s


def _scan(
    store: IndexStore,
    q: np.ndarray,
    k: int,
    shard_nos: list[int],
    *,
    kind: str,
    chunk_rows: int | None,
    verify: bool,
    stats: dict | None = None,
) -> tuple[_RunningTopK, _RunningTopK]:
    """Stream the given shards; returns the top-k canonical scores of s (proponents) and of −s (opponents).

    One pass of stored-dtype matmuls keeps approximate top-(k + margin) lists (no per-chunk exact
    work); then the listed rows whose bound reaches the k-th best are scored canonically, and each
    query gets a certificate that no unlisted row can enter or tie; queries without one are
    rescanned with inline re-scoring. The result equals a stable sort of canonical scores either way.
    """
    stored = stored_dtype_of(store, kind)
    n_q = q.shape[0]
    if k == 0 or n_q == 0:
        return _RunningTopK(n_q, k, "asc"), _RunningTopK(n_q, k, "desc")
    n_total = sum(int(store.shards[s]["rows"]) for s in shard_nos)
    bounds = _Bounds.of(store, kind, q)
    m = min(n_total, k + _MARGIN[stored])
    lists, xn = _approx_lists(store, q, shard_nos, bounds, m, kind=kind, chunk_rows=chunk_rows, verify=verify)

    sides, need = [], []
    for lst in lists:
        v, r = lst.vals, lst.rows  # approximate, descending
        lower, upper = bounds.interval(v, xn)  # both monotone in v, so still descending
        listed = r >= 0
        if n_total <= k:  # every row is returned
            keep = listed
        else:  # k listed rows score ≥ lower[k−1]: a row whose upper bound rounds below it cannot enter or tie
            keep = (upper >= lower[:, k - 1 : k]) & listed
        # an unlisted row's approximate score is ≤ the list's last one; with every row listed, none is
        if m == n_total:
            outside = torch.full((n_q,), -float("inf"))
        else:
            outside = torch.where(listed[:, -1], upper[:, -1], torch.full_like(upper[:, -1], -float("inf")))
        sides.append((r, keep, outside))
        need.append(torch.where(keep, r, torch.full_like(r, -1)))
    pair_rows = torch.cat(need, dim=1).numpy()  # [Q, 2m], −1 = not needed
    exact = _pair_scores(store, kind, stored, q, pair_rows, verify, xn)  # [Q, 2m] (−inf where −1)
    out = [_RunningTopK(n_q, k, "asc"), _RunningTopK(n_q, k, "desc")]
    ok = torch.ones(n_q, dtype=torch.bool)
    for side, ((r, keep, outside), res) in enumerate(zip(sides, out)):
        ex = torch.from_numpy(exact[:, side * m : (side + 1) * m])
        if side == 1:
            ex = -ex
        ex = torch.where(keep, ex, torch.full_like(ex, -float("inf")))
        res.merge(ex, torch.where(keep, r, torch.full_like(r, -1)))
        # certificate: no unlisted row can reach the k-th canonical score, not even as a tie
        ok &= (res.threshold() > outside) | torch.isneginf(outside)
    if stats is not None:
        stats["rescored_pairs"] = stats.get("rescored_pairs", 0) + int((pair_rows >= 0).sum())
        stats["rescored_rows"] = stats.get("rescored_rows", 0) + int(np.unique(pair_rows[pair_rows >= 0]).size)
        stats["rows"] = stats.get("rows", 0) + n_total
        stats["rescanned_queries"] = stats.get("rescanned_queries", 0) + int((~ok).sum())
    if not ok.all():
        bad = torch.nonzero(~ok).squeeze(1)
        p2, o2 = _scan_inline(store, q[bad.numpy()], k, shard_nos, kind=kind, chunk_rows=chunk_rows, verify=verify)
        for res, part in zip(out, (p2, o2)):
            res.vals[bad], res.rows[bad] = part.vals, part.rows
    return out[0], out[1]


def _gather_rows(blocks: dict[int, np.ndarray], starts: np.ndarray, stored: str, rows: np.ndarray) -> np.ndarray:
    """[n, D] stored rows (sorted global row numbers) from the shards' mmaps `blocks`, `_decoded`."""
    shard_of = np.searchsorted(starts, rows, side="right") - 1
    parts = [blocks[int(s)][rows[shard_of == s] - starts[s]] for s in np.unique(shard_of)]
    return _decoded(np.concatenate(parts) if len(parts) > 1 else parts[0], stored)


def _on_threads(fn, items: list) -> None:
    """fn(item) for every item, on torch's intra-op thread count of Python threads.

    numpy releases the GIL in the gathers, casts and einsum that make up a canonical re-score, so
    per-query work spreads over the cores; unlike OpenMP regions on small operands, idle workers
    block instead of spinning, which keeps a loaded machine's throughput.
    """
    workers = min(len(items), torch.get_num_threads())
    if workers <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, items):
            pass


def _pair_scores(store: IndexStore, kind: str, stored: str, q: np.ndarray, rows: np.ndarray, verify: bool,
                 x_norm: float | None = None) -> np.ndarray:
    """Canonical scores of q[i] against global rows[i, j] ([Q, r]; −1 entries give −inf).

    Per query, its rows are gathered once (sorted) from the mmaps: only the asked-for products are
    computed. x_norm: a bound on the rows' norms, if the caller has one (`canonical_scores`).
    """
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    valid = rows >= 0
    if not valid.any():
        return out
    starts = np.array([int(s["start"]) for s in store.shards], dtype=np.int64)
    shards = np.unique(np.searchsorted(starts, rows[valid], side="right") - 1)
    blocks = {int(s): store.load_shard(kind, int(s), verify=verify) for s in shards}  # verified here, once

    def one(i: int) -> None:
        asked = rows[i, valid[i]]
        want = np.unique(asked)
        sc = canonical_scores(q[i : i + 1], _gather_rows(blocks, starts, stored, want), x_norm)[0]
        out[i, valid[i]] = sc[np.searchsorted(want, asked)]

    _on_threads(one, np.flatnonzero(valid.any(axis=1)).tolist())
    return out


def _masked_canonical(q: np.ndarray, x: np.ndarray, mask: torch.Tensor, x_norm: float) -> torch.Tensor:
    """[Q, c] canonical scores of q [Q, D] against decoded rows x [c, D] where mask [Q, c], −inf elsewhere."""
    out = torch.full(mask.shape, -float("inf"))
    for i in torch.nonzero(mask.any(dim=1)).flatten().tolist():
        cols = torch.nonzero(mask[i]).squeeze(1)
        out[i, cols] = torch.from_numpy(canonical_scores(q[i : i + 1], x[cols.numpy()], x_norm)[0])
    return out


def _scan_inline(
    store: IndexStore,
    q: np.ndarray,
    k: int,
    shard_nos: list[int],
    *,
    kind: str,
    chunk_rows: int | None,
    verify: bool,
) -> tuple[_RunningTopK, _RunningTopK]:
    """Exact scan with re-scoring inline: each chunk's approximate scores, then canonical scores for
    every row whose bound reaches both the chunk's k-th lower bound and the running k-th canonical
    score, while the chunk is in cache. Slower than `_scan`'s deferred re-score, but needs no
    certificate."""
    stored = stored_dtype_of(store, kind)
    n_q = q.shape[0]
    props, opps = _RunningTopK(n_q, k, "asc"), _RunningTopK(n_q, k, "desc")
    if k == 0 or n_q == 0:
        return props, opps
    bounds = _Bounds.of(store, kind, q)
    neg_inf = torch.tensor(-float("inf"))
    for first_row, chunk, xc, s in _scored_chunks(store, q, shard_nos, bounds, kind=kind, chunk_rows=chunk_rows, verify=verify):
        xn = bounds.norm_bound(xc)
        lower, upper = bounds.interval(s, xn)
        kk = min(k, chunk.shape[0])
        # proponents (s) and opponents (−s, whose bounds are −upper, −lower): a row can enter a
        # list, or tie its k-th, only if its upper bound reaches both bars
        bar_p = torch.maximum(torch.topk(lower, kk, dim=1).values[:, -1], props.threshold())
        keep_p = upper >= bar_p.unsqueeze(1)
        bar_o = torch.maximum(torch.topk(-upper, kk, dim=1).values[:, -1], opps.threshold())
        keep_o = -lower >= bar_o.unsqueeze(1)
        cols = torch.nonzero((keep_p | keep_o).any(dim=0)).squeeze(1)
        if cols.numel() == 0:
            continue
        keep_p, keep_o = keep_p[:, cols], keep_o[:, cols]
        x = _decoded(chunk[cols.numpy()], stored)
        ex = _masked_canonical(q, x, keep_p | keep_o, xn)  # [Q, c]
        rows = (cols + first_row).unsqueeze(0).expand(n_q, -1)
        none = torch.full_like(rows, -1)
        props.merge(torch.where(keep_p, ex, neg_inf), torch.where(keep_p, rows, none))
        opps.merge(torch.where(keep_o, -ex, neg_inf), torch.where(keep_o, rows, none))
    return props, opps


def _finish(props: _RunningTopK, opps: _RunningTopK, k_out: int) -> SearchResult:
    return SearchResult(
        prop_rows=props.rows[:, :k_out].numpy().astype(np.int64, copy=True),
        prop_scores=props.vals[:, :k_out].numpy().astype(np.float32, copy=True),
        opp_rows=opps.rows[:, :k_out].numpy().astype(np.int64, copy=True),
        opp_scores=(-opps.vals[:, :k_out]).numpy().astype(np.float32, copy=True),
    )


def _require_kind(store: IndexStore, kind: str) -> None:
    if not store.has_kind(kind):
        dropped = (store.manifest.get("compressed") or {}).get("exact_dropped")
        why = " (dropped by `tracestar compress --drop-exact`; search the compressed form)" if dropped else ""
        raise IndexStoreError(f"{store.path}: no {kind}/ shards in this index{why}")


# --- public ------------------------------------------------------------------------------------


def topk(
    store: IndexStore,
    queries: np.ndarray,
    k: int,
    *,
    kind: str = "vectors",
    chunk_rows: int | None = None,
    verify: bool = True,
) -> SearchResult:
    """Exact top-k proponents and opponents of each query over all rows, in one streaming pass.

    queries: float32 [Q, D], final query vectors. Returns k' = min(k, n_rows) per query.
    """
    _require_kind(store, kind)
    q = _check_queries(store, queries)
    k_out = max(0, min(int(k), store.n_rows))
    props, opps = _scan(store, q, k_out, list(range(len(store.shards))), kind=kind, chunk_rows=chunk_rows, verify=verify)
    return _finish(props, opps, k_out)


def topk_distributed(
    store: IndexStore,
    queries: np.ndarray,
    k: int,
    *,
    kind: str = "vectors",
    chunk_rows: int | None = None,
    verify: bool = True,
    group=None,
) -> SearchResult:
    """`topk` sharded over torch.distributed ranks (rank r scans shards s ≡ r mod world).

    Queries are broadcast from rank 0; every rank returns the same merged result. Without an
    initialised process group this is `topk`.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return topk(store, queries, k, kind=kind, chunk_rows=chunk_rows, verify=verify)
    _require_kind(store, kind)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q = _check_queries(store, queries)
    qt = torch.from_numpy(q.copy())
    dist.broadcast(qt, src=0, group=group)
    q = qt.numpy()
    k_out = max(0, min(int(k), store.n_rows))
    mine = [s for s in range(len(store.shards)) if s % world == rank]
    props, opps = _scan(store, q, k_out, mine, kind=kind, chunk_rows=chunk_rows, verify=verify)
    merged = []
    for part in (props, opps):
        vals = [torch.empty_like(part.vals) for _ in range(world)]
        rows = [torch.empty_like(part.rows) for _ in range(world)]
        dist.all_gather(vals, part.vals.contiguous(), group=group)
        dist.all_gather(rows, part.rows.contiguous(), group=group)
        out = _RunningTopK(q.shape[0], k_out, "asc" if part is props else "desc")
        for v, r in zip(vals, rows):
            out.merge(v, r)
        merged.append(out)
    return _finish(merged[0], merged[1], k_out)



def brute_force(store: IndexStore, queries: np.ndarray, *, kind: str = "vectors", verify: bool = True) -> np.ndarray:
    """All canonical scores [Q, n_rows] float32 (tests, small indexes).

    Every row's exact dot product with each query rounded once to float32: the scores every search
    path returns, so a stable sort of a row of this array is the order `topk` must give.
    """
    q = _check_queries(store, queries)
    stored = stored_dtype_of(store, kind)
    out = np.empty((q.shape[0], store.n_rows), dtype=np.float32)
    for start, block in store.iter_shards(kind, verify=verify):
        for lo in range(0, block.shape[0], 4096):
            x = _decoded(block[lo : lo + 4096], stored)
            out[:, start + lo : start + lo + x.shape[0]] = canonical_scores(q, x)
    return out


def exact_scores(
    store: IndexStore,
    queries: np.ndarray,
    rows: np.ndarray,
    *,
    kind: str = "vectors",
    verify: bool = True,
) -> np.ndarray:
    """Canonical scores [Q, r] float32 of query i against global rows[i, :] (−1 entries give −inf).

    Each query's rows are gathered from the shards and scored in cache-sized batches, so memory
    stays bounded by the rows one query asks for.
    """
    _require_kind(store, kind)
    q = _check_queries(store, queries)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 2 or rows.shape[0] != q.shape[0]:
        raise ValueError(f"rows must be [Q, r] with Q = {q.shape[0]}, got {rows.shape}")
    if (rows >= store.n_rows).any():
        raise ValueError(f"rows must be < {store.n_rows} (the index's rows), got {int(rows.max())}")
    return _pair_scores(store, kind, stored_dtype_of(store, kind), q, rows, verify)
