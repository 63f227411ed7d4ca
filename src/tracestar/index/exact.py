"""The exact reader: streaming top-k over an index's vector shards, with canonical scores.

One pass over the shards, a chunk of rows at a time, yields both lists: proponents (highest scores)
and opponents (most negative). Memory is bounded by the chunk size and k, never by the corpus.
Scores are canonical (`index/canonical.py`): the exact dot product rounded once to float32, so
equal stored vectors always tie, and ties are broken by row like a stable sort (proponents:
ascending row; opponents: descending row, i.e. the reverse of the proponents' order).

How a chunk is scanned (measured on a 2-core AVX512-BF16/FP16 CPU, see bench/search.py):

- The matmul runs in the stored dtype (oneDNN has native bf16 and fp16 kernels with fp32
  accumulation; float32 shards use the fp32 gemm), the query rounded to the same dtype; float16 /
  bfloat16 chunks are *not* converted to float32 (that conversion ran far below memory bandwidth).
  That score is approximate, with a per-query error bound
  `e(s) = (‖q − q_low‖ + acc)·‖x‖ + rel·|s|` (query rounding, accumulation, output rounding), so a
  different kernel tiling moves it by far less than its bound.
- The scan keeps only approximate top-(k + margin) lists per query (for s and −s); no exact work
  runs per chunk. Afterwards the listed rows whose bound reaches the k-th best get their canonical
  score (`exact_scores`: a sorted gather from the mmaps), and each query gets a certificate: the
  k-th canonical score beats the float32 rounding of every unlisted row's upper bound. Bounds are
  compared after that rounding, so a row that could round to the k-th score (a tie, to be broken by
  row) is never dropped. Queries without a certificate (the error band held more rows than the
  margin) are rescanned with inline re-scoring (`_scan_inline`), under the same bounds. So the
  result equals a brute force of canonical scores with a stable sort, and the scan itself costs
  about the bare stored-dtype matmuls (bench/search.py).

Distributed (`topk_distributed`): under torch.distributed rank r scans shards s ≡ r (mod world) and
the per-rank lists are all-gathered and merged, which gives the single-process answer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from tracestar.index.canonical import canonical_scores, decoded, exact_scores
from tracestar.index.store import IndexStore
from tracestar.index.topk import (
    RunningTopK,
    SearchResult,
    merge_above_threshold,
    side_lists,
    to_result,
)

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


def as_tensor(block: np.ndarray, stored: str) -> torch.Tensor:
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


def default_chunk_rows(dim: int, itemsize: int) -> int:
    """Rows per chunk so that one chunk of stored rows is about `CHUNK_BYTES` (16 to 65,536 rows)."""
    return int(max(16, min(1 << 16, CHUNK_BYTES // max(1, dim * itemsize))))


# --- the scan ---------------------------------------------------------------------------------------

_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}

# Candidates kept per query and side during the scan, beyond k. Every row whose error band overlaps
# the k-th best must be re-scored. For unit vectors at D ≈ 16k that band holds a few rows for fp16
# and ~100 for bf16 (rounding 8× coarser), fewer for fp32; a query whose band overflows the list is
# rescanned (`_scan_inline`), so the margin only trades list upkeep against rescans.
_MARGIN = {"float16": 64, "bfloat16": 256, "float32": 32}


def chunk_scores(q_low: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    """[Q, C] float32 scores of the low-precision query against a stored chunk (stored dtype matmul).

    X·qᵀ with the big chunk as the row-major source operand: oneDNN then repacks only the small
    query panel per call (not the chunk), which measured a little faster than q·Xᵀ for bf16.
    """
    return torch.mm(xc, q_low.T).T.float()


@dataclass
class Bounds:
    """How far a chunk score can be from the exact dot product, per query (see the module doc)."""

    q_low: torch.Tensor  # [Q, D] the query as the chunk matmul sees it (stored dtype)
    base: torch.Tensor  # [Q] float64: ‖q − q_low‖ + acc·‖q‖; times ‖x‖ it bounds query rounding + accumulation
    rel: float  # output rounding, relative to |s|
    unit: bool  # the index promises unit rows (‖x‖ ≤ 1.01 after the stored rounding); the bounds,
    # and the canonical re-score's own error bound, trust that promise (the builder normalises)

    @classmethod
    def of(cls, store: IndexStore, kind: str, q: np.ndarray) -> Bounds:
        stored = store.stored_dtype(kind)
        q32 = torch.from_numpy(q)
        q_low = q32.to(_TORCH_DTYPE[stored])
        # Cauchy–Schwarz: |(q − q_low)·x| ≤ ‖q − q_low‖·‖x‖ (the difference is exact in float32;
        # ×1.01 covers the float32 norms' rounding)
        a_q = torch.linalg.vector_norm(q32 - q_low.float(), dim=1).double() * 1.01
        acc = _ACC_LAMBDA * math.sqrt(store.dim) * 2.0**-24 * torch.linalg.vector_norm(q32, dim=1).double() * 1.01
        unit = bool(store.manifest.get("unit_norm", True)) and kind == "vectors"
        return cls(q_low, a_q + acc, _REL_OUT[stored], unit)

    def select(self, idx: torch.Tensor) -> Bounds:
        """The bounds of some of the queries (those a rescan repeats)."""
        return Bounds(self.q_low[idx], self.base[idx], self.rel, self.unit)

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
    store: IndexStore, q: np.ndarray, shard_nos: list[int], bounds: Bounds, m: int, *, kind: str,
    chunk_rows: int | None, verify: bool,
) -> tuple[list[RunningTopK], float]:
    """One pass of stored-dtype matmuls: approximate top-m lists of s and of −s, and a bound of ‖x‖."""
    lists = [RunningTopK(q.shape[0], m), RunningTopK(q.shape[0], m)]
    xn_max = 0.0
    for first_row, _, xc, s in _scored_chunks(store, q, shard_nos, bounds, kind=kind, chunk_rows=chunk_rows, verify=verify):
        xn_max = max(xn_max, bounds.norm_bound(xc))
        for lst, sc in ((lists[0], s), (lists[1], -s)):
            merge_above_threshold(lst, sc, first_row)
    return lists, xn_max


def _scored_chunks(
    store: IndexStore, q: np.ndarray, shard_nos: list[int], bounds: Bounds, *, kind: str,
    chunk_rows: int | None, verify: bool,
) -> Iterator[tuple[int, np.ndarray, torch.Tensor, torch.Tensor]]:
    """The one streaming loop of both scans: per chunk of each shard, in row order, its first row,
    its stored rows, their tensor and the [Q, C] approximate stored-dtype scores."""
    stored = store.stored_dtype(kind)
    rows_per_chunk = chunk_rows or default_chunk_rows(store.dim, _ITEMSIZE[stored])
    for shard_no in shard_nos:
        start = int(store.shards[shard_no]["start"])
        block = store.load_shard(kind, shard_no, verify=verify)
        for lo in range(0, block.shape[0], rows_per_chunk):
            rows = block[lo : lo + rows_per_chunk]
            xc = as_tensor(rows, stored)
            s = chunk_scores(bounds.q_low, xc)  # [Q, C] approximate
            if not torch.isfinite(s).all():  # fp16 overflow (non-unit vectors): fp32 scores, within the bound
                s = torch.mm(torch.from_numpy(q), xc.float().T)
            yield start + lo, rows, xc, s


def _masked_canonical(q: np.ndarray, x: np.ndarray, mask: torch.Tensor, x_norm: float) -> torch.Tensor:
    """[Q, c] canonical scores of q [Q, D] against decoded rows x [c, D] where mask [Q, c], −inf elsewhere."""
    out = torch.full(mask.shape, -float("inf"))
    for i in torch.nonzero(mask.any(dim=1)).flatten().tolist():
        cols = torch.nonzero(mask[i]).squeeze(1)
        out[i, cols] = torch.from_numpy(canonical_scores(q[i : i + 1], x[cols.numpy()], x_norm)[0])
    return out


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
) -> tuple[RunningTopK, RunningTopK]:
    """Stream the given shards; returns the top-k canonical scores of s (proponents) and of −s (opponents).

    One pass of stored-dtype matmuls keeps approximate top-(k + margin) lists (no per-chunk exact
    work); then the listed rows whose bound reaches the k-th best are scored canonically, and each
    query gets a certificate that no unlisted row can enter or tie; queries without one are
    rescanned with inline re-scoring. The result equals a stable sort of canonical scores either way.
    """
    n_q = q.shape[0]
    if k == 0 or n_q == 0:
        return side_lists(n_q, k)
    n_total = sum(int(store.shards[s]["rows"]) for s in shard_nos)
    bounds = Bounds.of(store, kind, q)
    m = min(n_total, k + _MARGIN[store.stored_dtype(kind)])
    lists, xn = _approx_lists(store, q, shard_nos, bounds, m, kind=kind, chunk_rows=chunk_rows, verify=verify)
    out, ok, pair_rows = _rescore_listed(store, q, k, lists, bounds, xn, n_total, kind=kind, verify=verify)
    if stats is not None:
        stats["rescored_pairs"] = stats.get("rescored_pairs", 0) + int((pair_rows >= 0).sum())
        stats["rescored_rows"] = stats.get("rescored_rows", 0) + int(np.unique(pair_rows[pair_rows >= 0]).size)
        stats["rows"] = stats.get("rows", 0) + n_total
        stats["rescanned_queries"] = stats.get("rescanned_queries", 0) + int((~ok).sum())
    if not ok.all():
        bad = torch.nonzero(~ok).squeeze(1)
        again = _scan_inline(store, q[bad.numpy()], k, shard_nos, bounds.select(bad), kind=kind,
                             chunk_rows=chunk_rows, verify=verify)
        for res, part in zip(out, again):
            res.vals[bad], res.rows[bad] = part.vals, part.rows
    return out


def _rescore_listed(
    store: IndexStore, q: np.ndarray, k: int, lists: list[RunningTopK], bounds: Bounds, xn: float, n_total: int,
    *, kind: str, verify: bool,
) -> tuple[tuple[RunningTopK, RunningTopK], torch.Tensor, np.ndarray]:
    """Canonical top-k lists from the approximate top-m lists (of s and −s), a certificate per query
    [Q] bool, and the re-scored rows [Q, 2m] (−1 = not needed).

    Of the m listed rows, k score ≥ lower[k−1]: a row whose upper bound rounds below it can neither
    enter nor tie, so only the others are re-scored. An unlisted row's approximate score is ≤ the
    list's last one, so when the k-th canonical score beats that row's upper bound, nothing
    outside the list can reach the top k: the query is certified.
    """
    n_q, m = q.shape[0], lists[0].k
    sides, need = [], []
    for lst in lists:
        v, r = lst.vals, lst.rows  # approximate, descending
        lower, upper = bounds.interval(v, xn)  # both monotone in v, so still descending
        listed = r >= 0
        keep = listed if n_total <= k else (upper >= lower[:, k - 1 : k]) & listed  # n_total ≤ k: all returned
        if m == n_total:  # every row is listed: none outside
            outside = torch.full((n_q,), -float("inf"))
        else:
            outside = torch.where(listed[:, -1], upper[:, -1], torch.full_like(upper[:, -1], -float("inf")))
        sides.append((r, keep, outside))
        need.append(torch.where(keep, r, torch.full_like(r, -1)))
    pair_rows = torch.cat(need, dim=1).numpy()  # [Q, 2m], −1 = not needed
    exact = exact_scores(store, q, pair_rows, kind=kind, verify=verify, x_norm=xn)  # [Q, 2m] (−inf where −1)
    out = side_lists(n_q, k)
    ok = torch.ones(n_q, dtype=torch.bool)
    for side, ((r, keep, outside), res) in enumerate(zip(sides, out)):
        ex = torch.from_numpy(exact[:, side * m : (side + 1) * m])
        if side == 1:
            ex = -ex
        ex = torch.where(keep, ex, torch.full_like(ex, -float("inf")))
        res.merge(ex, torch.where(keep, r, torch.full_like(r, -1)))
        # certificate: no unlisted row can reach the k-th canonical score, not even as a tie
        ok &= (res.threshold() > outside) | torch.isneginf(outside)
    return out, ok, pair_rows


def _scan_inline(
    store: IndexStore,
    q: np.ndarray,
    k: int,
    shard_nos: list[int],
    bounds: Bounds,
    *,
    kind: str,
    chunk_rows: int | None,
    verify: bool,
) -> tuple[RunningTopK, RunningTopK]:
    """Exact scan with re-scoring inline, for k ≥ 1 and the queries of `bounds`: each chunk's
    approximate scores, then canonical scores for every row whose bound reaches both the chunk's
    k-th lower bound and the running k-th canonical score, while the chunk is in cache. Slower than
    `_scan`'s deferred re-score, but needs no certificate."""
    stored = store.stored_dtype(kind)
    n_q = q.shape[0]
    props, opps = side_lists(n_q, k)
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
        x = decoded(chunk[cols.numpy()], stored)
        ex = _masked_canonical(q, x, keep_p | keep_o, xn)  # [Q, c]
        rows = (cols + first_row).unsqueeze(0).expand(n_q, -1)
        none = torch.full_like(rows, -1)
        props.merge(torch.where(keep_p, ex, neg_inf), torch.where(keep_p, rows, none))
        opps.merge(torch.where(keep_o, -ex, neg_inf), torch.where(keep_o, rows, none))
    return props, opps


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
    store.require_kind(kind)
    q = store.check_queries(queries)
    k_out = max(0, min(int(k), store.n_rows))
    props, opps = _scan(store, q, k_out, list(range(len(store.shards))), kind=kind, chunk_rows=chunk_rows, verify=verify)
    return to_result(props, opps, k_out)


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
    store.require_kind(kind)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q = store.check_queries(queries)
    qt = torch.from_numpy(q.copy())
    dist.broadcast(qt, src=0, group=group)
    q = qt.numpy()
    k_out = max(0, min(int(k), store.n_rows))
    mine = [s for s in range(len(store.shards)) if s % world == rank]
    parts = _scan(store, q, k_out, mine, kind=kind, chunk_rows=chunk_rows, verify=verify)
    merged = side_lists(q.shape[0], k_out)
    for part, out in zip(parts, merged):
        vals = [torch.empty_like(part.vals) for _ in range(world)]
        rows = [torch.empty_like(part.rows) for _ in range(world)]
        dist.all_gather(vals, part.vals.contiguous(), group=group)
        dist.all_gather(rows, part.rows.contiguous(), group=group)
        for v, r in zip(vals, rows):
            out.merge(v, r)
    return to_result(merged[0], merged[1], k_out)
