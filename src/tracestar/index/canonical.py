"""Canonical scores: each query·row dot product computed exactly and rounded once to float32.

**The score of a row** is the exact dot product of the query with the stored (decoded) vector,
rounded once to the nearest float32 (`canonical_scores`). It is a function of the row's bytes and
the query alone: BLAS kernels do not promise one summation order (a row's place in a kernel tile
changes it, and so can the CPU), so two copies of one document could otherwise score a few ulps
apart and come back in either order. Equal stored vectors therefore always tie, and every search
path (the exact scan, the compressed re-rank, `brute_force`) returns the same bits. The rounding is
computed as a float64 product (exact for float32 operands) whose error bound decides whether the
float32 rounding is certain; the rare pair near a float32 rounding boundary is summed again
exactly (`_exact_round_f32`).

`exact_scores` is the one re-scoring of given rows against the index: the scan's listed
candidates and the compressed forms' re-rank both go through it.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tracestar.index.store import IndexStore

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

    q: float32 [Q, D]; x: [n, D] float16 or float32 (bfloat16 rows widened by `decoded`).
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


def decoded(block: np.ndarray, stored: str) -> np.ndarray:
    """Stored rows as float16 / float32 numpy (bf16 bit patterns widened exactly to float32: the
    top half of the float32 word; shifted in place, which measured faster than `as_float32`)."""
    if stored != "bfloat16":
        return np.asarray(block)
    wide = np.asarray(block, dtype=np.uint16).astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


# --- rows of an index ------------------------------------------------------------------------------


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


def exact_scores(
    store: IndexStore,
    queries: np.ndarray,
    rows: np.ndarray,
    *,
    kind: str = "vectors",
    verify: bool = True,
    x_norm: float | None = None,
) -> np.ndarray:
    """Canonical scores [Q, r] float32 of query i against global rows[i, :] (−1 entries give −inf).

    Per query, its distinct rows are gathered once, sorted (`IndexStore.gather`), and only the
    asked-for products are computed, so memory stays bounded by the rows one query asks for;
    queries run on torch's thread count. x_norm: a bound on the rows' norms when the caller has
    one (a unit-norm index, `canonical_scores`).
    """
    store.require_kind(kind)
    q = store.check_queries(queries)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 2 or rows.shape[0] != q.shape[0]:
        raise ValueError(f"rows must be [Q, r] with Q = {q.shape[0]}, got {rows.shape}")
    if (rows >= store.n_rows).any():
        raise ValueError(f"rows must be < {store.n_rows} (the index's rows), got {int(rows.max())}")
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    valid = rows >= 0
    if not valid.any():
        return out
    if verify:  # each shard once, here, not on the worker threads
        for s in np.unique(np.searchsorted(store.shard_starts, rows[valid], side="right") - 1).tolist():
            store.verify_shard(kind, s)
    stored = store.stored_dtype(kind)

    def one(i: int) -> None:
        asked = rows[i, valid[i]]
        want = np.unique(asked)
        sc = canonical_scores(q[i : i + 1], decoded(store.gather(kind, want, verify=False), stored), x_norm)[0]
        out[i, valid[i]] = sc[np.searchsorted(want, asked)]

    _on_threads(one, np.flatnonzero(valid.any(axis=1)).tolist())
    return out


def brute_force(store: IndexStore, queries: np.ndarray, *, kind: str = "vectors", verify: bool = True) -> np.ndarray:
    """All canonical scores [Q, n_rows] float32 (tests, small indexes).

    Every row's exact dot product with each query rounded once to float32: the scores every search
    path returns, so a stable sort of a row of this array is the order `topk` must give.
    """
    q = store.check_queries(queries)
    stored = store.stored_dtype(kind)
    out = np.empty((q.shape[0], store.n_rows), dtype=np.float32)
    for start, block in store.iter_shards(kind, verify=verify):
        for lo in range(0, block.shape[0], 4096):
            x = decoded(block[lo : lo + 4096], stored)
            out[:, start + lo : start + lo + x.shape[0]] = canonical_scores(q, x)
    return out
