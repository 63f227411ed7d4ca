"""Exact streaming top-k search over an index's vector shards.

One pass over the shards, a chunk of rows at a time, yields both lists: proponents (highest scores)
and opponents (most negative). Memory is bounded by the chunk size and k, never by the corpus.

How a chunk is scored (measured on a 2-core AVX512-BF16/FP16 CPU, see bench/search.py):

- float32 shards: one fp32 matmul per chunk; exact.
- float16 / bfloat16 shards: the chunk is *not* converted to float32 (that conversion ran far
  below memory bandwidth); the matmul runs in the stored dtype (oneDNN has native bf16 and fp16
  kernels with fp32 accumulation), the query rounded to the same dtype. That score is approximate
  (query rounding, output rounding), with a per-query error bound `e(s) = a_q·‖x‖ + rel·|s|`.
  Every row whose approximate score could, within that bound, still enter the running top-k is
  re-scored exactly in float32 (decode of just those rows, still hot in cache) and only exact
  scores are merged. So the result equals a float32 brute force over the decoded stored vectors,
  and the re-scoring touches a handful of rows per chunk once the running threshold has settled.

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
    """Per-query running top-k of exact scores (largest), with their global rows."""

    def __init__(self, n_queries: int, k: int):
        self.k = k
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
        all_vals = torch.cat([self.vals, vals], dim=1)
        all_rows = torch.cat([self.rows, rows], dim=1)
        top, idx = torch.topk(all_vals, self.k, dim=1, largest=True, sorted=True)
        self.vals, self.rows = top, torch.gather(all_rows, 1, idx)


def _scan(
    store: IndexStore,
    q: np.ndarray,
    k: int,
    shard_nos: list[int],
    *,
    kind: str,
    chunk_rows: int | None,
    verify: bool,
) -> tuple[_RunningTopK, _RunningTopK]:
    """Stream the given shards; returns running top-k of s (proponents) and of −s (opponents)."""
    stored = stored_dtype_of(store, kind)
    n_q = q.shape[0]
    props, opps = _RunningTopK(n_q, k), _RunningTopK(n_q, k)
    if k == 0 or n_q == 0:
        return props, opps
    q32 = torch.from_numpy(q)
    exact_path = stored == "float32"
    if not exact_path:
        tdt = torch.bfloat16 if stored == "bfloat16" else torch.float16
        q_low = q32.to(tdt)
        # ‖q − round(q)‖: bounds the query-rounding error of a dot with x by ‖x‖·a (Cauchy–Schwarz).
        a_q = (q32 - q_low.float()).norm(dim=1) + 1e-6 * q32.norm(dim=1)  # + accumulation slack
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
            s = torch.mm(q_low, xc.T).float()  # [Q, C] approximate
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
        out = _RunningTopK(q.shape[0], k_out)
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
