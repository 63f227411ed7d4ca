"""Exact streaming top-k search over an index's vector shards.

One pass over the shards, a chunk of rows at a time, yields both lists: proponents (highest scores)
and opponents (most negative). Memory is bounded by the chunk size and k, never by the corpus.

How a chunk is scored (measured on a 2-core AVX512-BF16/FP16 CPU, see bench/search.py):

- float32 shards: one fp32 matmul per chunk; exact.
- float16 / bfloat16 shards: the chunk is *not* converted to float32 (that conversion ran far
  below memory bandwidth); the matmul runs in the stored dtype (oneDNN has native bf16 and fp16
  kernels with fp32 accumulation), the query rounded to the same dtype. That score is approximate
  (query rounding, output rounding), with a per-query error bound `e(s) = a_q·‖x‖ + rel·|s|`.
  The scan keeps only approximate top-(k + margin) lists per query (for s and −s); no exact work
  runs per chunk. Afterwards the listed rows whose bound reaches the k-th best are re-scored once
  in float32 (a sorted gather from the mmaps), and each query gets a certificate: the k-th exact
  score beats the upper bound of every row outside its list. Queries without one (the error band
  held more rows than the margin) are rescanned with inline re-scoring (`_scan_inline`). So the
  result equals a float32 brute force over the decoded stored vectors, ties broken by row like a
  stable sort, and the scan itself costs about the bare stored-dtype matmuls (bench/search.py).

Distributed (`topk_distributed`): under torch.distributed rank r scans shards s ≡ r (mod world) and
the per-rank lists are all-gathered and merged, which gives the single-process answer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from tracestar.errors import IndexStoreError, UserError
from tracestar.index.store import IndexStore, as_float32

# Rows per chunk are chosen so one chunk of stored vectors is about this many bytes: big enough to
# amortise per-call overhead, small enough to stay in the last-level cache for the exact re-score.
CHUNK_BYTES = 32 << 20

# Relative output-rounding error of a matmul whose result is stored in the given dtype
# (half an ulp, with slack for the conversion of the accumulator).
_REL_OUT = {"bfloat16": 2.0**-7, "float16": 2.0**-10}


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


# Candidates kept per query and side during a low-precision scan, beyond k. The approximate scores
# carry a worst-case error bound (query rounding × ‖x‖ + output rounding); every row whose bound
# overlaps the k-th best must be re-scored. For unit vectors at D ≈ 16k that band holds a few rows
# for fp16 and ~100 for bf16 (rounding 8× coarser); a query whose band overflows the list is
# rescanned (`_scan_inline`), so the margin only trades list upkeep against rescans.
_MARGIN = {"float16": 64, "bfloat16": 256}


def _chunk_scores(q_low: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    """[Q, C] float32 scores of the low-precision query against a stored chunk (stored dtype matmul).

    X·qᵀ with the big chunk as the row-major source operand: oneDNN then repacks only the small
    query panel per call (not the chunk), which measured a little faster than q·Xᵀ for bf16.
    """
    return torch.mm(xc, q_low.T).T.float()


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
    """Stream the given shards; returns exact running top-k of s (proponents) and of −s (opponents).

    float32 shards: exact fp32 matmul per chunk. float16 / bfloat16: one pass of stored-dtype
    matmuls keeping approximate top-(k + margin) lists only (no per-chunk exact work), then one
    exact float32 re-score of the candidates whose error bound reaches the k-th best, and a
    certificate per query that no row outside the lists can enter; queries without a certificate
    are rescanned with inline exact re-scoring. The result equals a float32 brute force either way.
    """
    stored = stored_dtype_of(store, kind)
    n_q = q.shape[0]
    if k == 0 or n_q == 0:
        return _RunningTopK(n_q, k, "asc"), _RunningTopK(n_q, k, "desc")
    if stored == "float32":
        return _scan_inline(store, q, k, shard_nos, kind=kind, chunk_rows=chunk_rows, verify=verify)

    q32 = torch.from_numpy(q)
    tdt = torch.bfloat16 if stored == "bfloat16" else torch.float16
    q_low = q32.to(tdt)
    # ‖q − round(q)‖ bounds the query-rounding error of a dot with x by ‖x‖·a (Cauchy–Schwarz).
    a_q = (q32 - q_low.float()).norm(dim=1) + 1e-6 * q32.norm(dim=1)  # + accumulation slack
    rel = _REL_OUT[stored]
    unit = bool(store.manifest.get("unit_norm", True)) and kind == "vectors"
    rows_per_chunk = chunk_rows or _default_chunk_rows(store.dim, 2)
    n_total = sum(int(store.shards[s]["rows"]) for s in shard_nos)
    m = min(n_total, k + _MARGIN.get(stored, 64))
    lists = [_RunningTopK(n_q, m), _RunningTopK(n_q, m)]  # approximate: s and −s
    xn_max = 1.01 if unit else 0.0

    for shard_no in shard_nos:
        start = int(store.shards[shard_no]["start"])
        block = store.load_shard(kind, shard_no, verify=verify)
        n = block.shape[0]
        for lo in range(0, n, rows_per_chunk):
            hi = min(n, lo + rows_per_chunk)
            xc = _as_tensor(block[lo:hi], stored)
            s = _chunk_scores(q_low, xc)
            if not torch.isfinite(s).all():  # fp16 overflow (non-unit vectors): exact scores here
                s = torch.mm(q32, xc.float().T)  # exact values satisfy any error bound
            if not unit:
                xn_max = max(xn_max, torch.linalg.vector_norm(xc, dim=1, dtype=torch.float32).max().item() * 1.01)
            for lst, sc in ((lists[0], s), (lists[1], -s)):
                _merge_above_threshold(lst, sc, start + lo)

    base = (a_q * xn_max).unsqueeze(1)  # [Q, 1]
    sides, need = [], []
    for lst in lists:
        v, r = lst.vals, lst.rows  # approximate, descending
        err = base + rel * v.abs()
        lower, upper = v - err, v + err  # both monotone in v, so still descending
        kth_lower = lower[:, k - 1 : k]  # ≤ the true k-th best (k rows are at least this good)
        keep = (upper >= kth_lower) & (r >= 0)
        # every row never kept (or dropped) had an approximate score ≤ the list's last one
        full = r[:, -1] >= 0
        outside = torch.where(full, upper[:, -1], torch.full_like(upper[:, -1], -float("inf")))
        sides.append((r, keep, outside))
        need.append(torch.where(keep, r, torch.full_like(r, -1)))
    pair_rows = torch.cat(need, dim=1).numpy()  # [Q, 2m], −1 = not needed
    exact = _pair_scores(store, kind, stored, q, pair_rows, verify)  # [Q, 2m] (−inf where −1)
    out = [_RunningTopK(n_q, k, "asc"), _RunningTopK(n_q, k, "desc")]
    ok = torch.ones(n_q, dtype=torch.bool)
    for side, ((r, keep, outside), res) in enumerate(zip(sides, out)):
        ex = torch.from_numpy(exact[:, side * m : (side + 1) * m])
        if side == 1:
            ex = -ex
        ex = torch.where(keep, ex, torch.full_like(ex, -float("inf")))
        res.merge(ex, torch.where(keep, r, torch.full_like(r, -1)))
        ok &= res.threshold() > outside  # certificate: nothing outside the lists can enter
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


def _decode_f32(block: np.ndarray, stored: str) -> torch.Tensor:
    """float32 tensor of a (gathered, in-memory) stored block; exact (bf16 → fp32 is a shift)."""
    t = _as_tensor(np.ascontiguousarray(block), stored)
    return t if t.dtype == torch.float32 else t.float()


def _pair_scores(store: IndexStore, kind: str, stored: str, q: np.ndarray, rows: np.ndarray, verify: bool,
                 batch_rows: int | None = None) -> np.ndarray:
    """Exact float32 q[i]·x[rows[i, j]] for the listed pairs ([Q, r]; −1 entries give −inf).

    The union of the rows is gathered once (sorted, per shard), decoded to float32 in batches and
    scored against all queries with one fp32 matmul per batch (cheaper than per-pair products,
    which would copy each row once per query); only the asked-for pairs are kept.
    """
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    valid = rows >= 0
    uniq = np.unique(rows[valid])
    if uniq.size == 0:
        return out
    batch_rows = batch_rows or max(16, min(1024, (16 << 20) // (4 * store.dim)))
    starts = np.array([int(s["start"]) for s in store.shards], dtype=np.int64)
    shard_of = np.searchsorted(starts, uniq, side="right") - 1
    scores = torch.empty((q.shape[0], uniq.size), dtype=torch.float32)
    q32 = torch.from_numpy(q)
    col = 0
    for shard_no in np.unique(shard_of):
        local = uniq[shard_of == shard_no] - starts[shard_no]
        block = store.load_shard(kind, int(shard_no), verify=verify)
        for lo in range(0, local.size, batch_rows):
            sel = local[lo : lo + batch_rows]
            x = _decode_f32(block[sel], stored)
            torch.mm(q32, x.T, out=scores[:, col : col + sel.size])
            col += sel.size
    idx = np.searchsorted(uniq, np.where(valid, rows, uniq[0]))
    got = np.take_along_axis(scores.numpy(), idx, axis=1)
    out[valid] = got[valid]
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
    """Exact scan with re-scoring inline: float32 shards directly; fp16/bf16 chunks by an approximate
    matmul, then every row whose error bound reaches the running k-th best is re-scored in float32
    while still in cache. Slower than `_scan`'s deferred re-score, but needs no certificate."""
    stored = stored_dtype_of(store, kind)
    n_q = q.shape[0]
    props, opps = _RunningTopK(n_q, k, "asc"), _RunningTopK(n_q, k, "desc")
    if k == 0 or n_q == 0:
        return props, opps
    q32 = torch.from_numpy(q)
    exact_path = stored == "float32"
    if not exact_path:
        tdt = torch.bfloat16 if stored == "bfloat16" else torch.float16
        q_low = q32.to(tdt)
        a_q = (q32 - q_low.float()).norm(dim=1) + 1e-6 * q32.norm(dim=1)
        rel = _REL_OUT[stored]
        unit = bool(store.manifest.get("unit_norm", True)) and kind == "vectors"
    itemsize = 4 if exact_path else 2
    rows_per_chunk = chunk_rows or _default_chunk_rows(store.dim, itemsize)

    for shard_no in shard_nos:
        info = store.shards[shard_no]
        start = int(info["start"])
        block = store.load_shard(kind, shard_no, verify=verify)
        n = block.shape[0]
        for lo in range(0, n, rows_per_chunk):
            hi = min(n, lo + rows_per_chunk)
            xc = _as_tensor(block[lo:hi], stored)
            kk = min(k, hi - lo)
            if exact_path:
                s = torch.mm(q32, xc.T)  # [Q, C] exact
                v, i = torch.topk(s, kk, dim=1)
                props.merge(v, i + start + lo)
                v, i = torch.topk(-s, kk, dim=1)
                opps.merge(v, i + start + lo)
                continue
            s = _chunk_scores(q_low, xc)  # [Q, C] approximate
            if not torch.isfinite(s).all():  # fp16 overflow (non-unit vectors): exact for this chunk
                s = None
            if unit:
                xn = 1.01
            else:
                xn = torch.linalg.vector_norm(xc, dim=1, dtype=torch.float32).max().item() * 1.01
            if s is None:
                cand = torch.arange(hi - lo)
            else:
                base = (a_q * xn).unsqueeze(1)  # [Q, 1]
                err = base + rel * s.abs()  # [Q, C] bound on |s − exact|
                # proponents: lower bound of the chunk's k-th best, and the running threshold
                sk, ik = torch.topk(s, kk, dim=1)
                kth_low = sk[:, -1] - torch.gather(err, 1, ik[:, -1:]).squeeze(1)
                bar = torch.maximum(kth_low, props.threshold())
                keep = (s + err) >= bar.unsqueeze(1)
                # opponents: same on −s
                nk, ink = torch.topk(-s, kk, dim=1)
                kth_low_n = nk[:, -1] - torch.gather(err, 1, ink[:, -1:]).squeeze(1)
                bar_n = torch.maximum(kth_low_n, opps.threshold())
                keep |= (-s + err) >= bar_n.unsqueeze(1)
                cand = torch.nonzero(keep.any(dim=0)).squeeze(1)
            if cand.numel() == 0:
                continue
            exact = torch.mm(q32, xc.index_select(0, cand).float().T)  # [Q, c] exact fp32
            rows = cand + (start + lo)
            props.merge(exact, rows)
            opps.merge(-exact, rows)
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
    """All scores [Q, n_rows], float32, from a full float32 decode of every shard (tests, small indexes)."""
    q = _check_queries(store, queries)
    stored = stored_dtype_of(store, kind)
    out = np.empty((q.shape[0], store.n_rows), dtype=np.float32)
    for start, block in store.iter_shards(kind, verify=verify):
        x = as_float32(np.asarray(block), stored)
        out[:, start : start + x.shape[0]] = (q.astype(np.float64) @ x.astype(np.float64).T).astype(np.float32)
    return out


def exact_scores(
    store: IndexStore,
    queries: np.ndarray,
    rows: np.ndarray,
    *,
    kind: str = "vectors",
    verify: bool = True,
    batch_rows: int = 1024,
) -> np.ndarray:
    """Exact float32 scores [Q, r] of query i against global rows[i, :] (−1 entries give −inf).

    Gathers the union of the requested rows shard by shard, decodes them, and scores them in
    batches, so memory stays bounded by `batch_rows` × D.
    """
    _require_kind(store, kind)
    q = _check_queries(store, queries)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 2 or rows.shape[0] != q.shape[0]:
        raise ValueError(f"rows must be [Q, r] with Q = {q.shape[0]}, got {rows.shape}")
    stored = stored_dtype_of(store, kind)
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    valid = rows >= 0
    uniq = np.unique(rows[valid])
    if uniq.size == 0:
        return out
    starts = np.array([int(s["start"]) for s in store.shards], dtype=np.int64)
    shard_of = np.searchsorted(starts, uniq, side="right") - 1
    scores = np.empty((q.shape[0], uniq.size), dtype=np.float32)
    q32 = torch.from_numpy(q)
    col = 0
    for shard_no in np.unique(shard_of):
        want = uniq[shard_of == shard_no]
        block = store.load_shard(kind, int(shard_no), verify=verify)
        local = want - starts[shard_no]
        for lo in range(0, local.size, batch_rows):
            sel = local[lo : lo + batch_rows]
            x = as_float32(np.asarray(block[sel]), stored)
            s = torch.mm(q32, torch.from_numpy(np.ascontiguousarray(x)).T).numpy()
            scores[:, col : col + sel.size] = s
            col += sel.size
    idx = np.searchsorted(uniq, np.where(valid, rows, uniq[0]))
    gathered = np.take_along_axis(scores, idx, axis=1)
    out[valid] = gathered[valid]
    return out
