"""Search an index: the one public entry (`search`), over the exact, int8 and PQ readers.

- exact (`index/exact.py`): a streaming scan of the `vectors/` shards, canonical scores.
- int8 (`index/int8.py`) and PQ (`index/pq.py`): approximate scores from a compressed form; the
  top `rerank` candidates (and the `rerank` most negative ones) are re-scored exactly from
  `vectors/` when present (`index/canonical.py`), so the returned scores are exact and the order
  among candidates is the exact order, ties included. After `compress --drop-exact` the scores are
  the compressed approximation.

Which one runs is `IndexStore.search_form`: a compressed form when the index has one, unless
`exact=True`; `tracestar query` reports the same choice.
"""

from __future__ import annotations

import numpy as np
import torch

from tracestar.errors import IndexStoreError
from tracestar.index.canonical import exact_scores
from tracestar.index.exact import Bounds, chunk_scores, as_tensor, topk_distributed
from tracestar.index.int8 import int8_candidates
from tracestar.index.pq import pq_candidates
from tracestar.index.store import IndexStore
from tracestar.index.topk import SearchResult

__all__ = ["SearchResult", "search", "search_compressed"]


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
    if kind == "vectors" and store.search_form(exact=exact)[0] != "exact":
        return search_compressed(store, queries, k, rerank=rerank, verify=verify, chunk_rows=chunk_rows)
    return topk_distributed(store, queries, k, kind=kind, chunk_rows=chunk_rows, verify=verify)


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

    rerank: how many candidates per query (and per direction) to re-score; default max(10k, the
    form's own depth): 100, or what `compress` recorded for PQ with wide sub-vectors.
    0 disables re-ranking (compressed scores). Opponents come from the most negative candidates.
    """
    forms = store.compressed_forms()
    if not forms:
        raise IndexStoreError(f"{store.path}: no compressed form; run `tracestar compress`")
    form = form or store.default_form()
    if form not in forms:
        raise IndexStoreError(f"{store.path}: no compressed form {form!r} (have {', '.join(forms)})")
    entry = store.manifest["compressed"][form]
    q = store.check_queries(queries)
    k_out = max(0, min(int(k), store.n_rows))
    if rerank is None:
        rerank = max(10 * k_out, int(entry.get("rerank") or 100))
    n_cand = max(k_out, min(int(rerank), store.n_rows)) if k_out else 0
    if k_out == 0:
        return SearchResult(*(np.zeros((q.shape[0], 0), dt) for dt in (np.int64, np.float32, np.int64, np.float32)))

    if form == "int8":
        props, opps = int8_candidates(store, q, n_cand, entry, verify, chunk_rows)
        p_rows, p_sc = props.rows.numpy(), props.vals.numpy()
        o_rows, o_sc = opps.rows.numpy(), -opps.vals.numpy()
    else:
        p_rows, p_sc, o_rows, o_sc = pq_candidates(store, q, n_cand, entry, verify)
    p_rows, o_rows = np.asarray(p_rows, np.int64), np.asarray(o_rows, np.int64)

    if rerank and store.has_kind("vectors"):
        if form == "pq":  # deep candidate lists: only the candidates that can reach the top k_out
            p_need, o_need = _screened(store, q, p_rows, o_rows, k_out, verify)
        else:
            p_need, o_need = p_rows, o_rows
        both = np.concatenate([p_need, o_need], axis=1)
        # a unit-norm index (the builder normalises) bounds ‖x‖ as the exact scan does, which spares
        # the re-score a pass over the gathered rows for their norms (at 2^16 dims, 800 candidates:
        # ~0.25 s of float16 → float64 per query here)
        x_norm = 1.01 if store.manifest.get("unit_norm", True) else None
        ex = exact_scores(store, q, both, verify=verify, x_norm=x_norm)
        p_sc, o_sc = ex[:, : p_rows.shape[1]], ex[:, p_rows.shape[1] :]
        p_sc = np.where(p_need >= 0, p_sc, -np.inf)  # screened out: below the k-th, never returned
        o_sc = np.where(o_need >= 0, o_sc, np.inf)
    else:
        p_sc = np.where(p_rows >= 0, p_sc, -np.inf)
        o_sc = np.where(o_rows >= 0, o_sc, np.inf)
    return _ranked(p_rows, p_sc, o_rows, o_sc, k_out)


def _screened(
    store: IndexStore, q: np.ndarray, p_rows: np.ndarray, o_rows: np.ndarray, k_out: int, verify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates [Q, c] (each side) that can be in their side's exact top k_out; −1 for the rest.

    Each query's candidate rows get the exact scan's stored-dtype score and its error interval
    (`exact.Bounds`, rounded to float32 as canonical scores are): a proponent whose upper bound
    is below the k_out-th largest lower bound cannot reach the top k_out, nor tie with it, and
    likewise for opponents; the exact re-score (`exact_scores`) then runs on the few rows left.
    At 2^16 dims it re-scored 800 candidates per query exactly in ~0.37 s, most of it in the
    exact rounding of scores near a float32 boundary (`canonical._exact_round_f32`).
    """
    if p_rows.shape[1] <= k_out and o_rows.shape[1] <= k_out:
        return p_rows, o_rows
    stored = store.stored_dtype("vectors")
    if verify:  # the rows are read here first: check their shards, as `exact_scores` does
        rows = np.concatenate([p_rows, o_rows], axis=1)
        rows = rows[rows >= 0]
        for s in np.unique(np.searchsorted(store.shard_starts, rows, side="right") - 1).tolist():
            store.verify_shard("vectors", s)
    bounds = Bounds.of(store, "vectors", q)
    p_keep, o_keep = np.full(p_rows.shape, -1, np.int64), np.full(o_rows.shape, -1, np.int64)
    for i in range(q.shape[0]):
        both = np.concatenate([p_rows[i], o_rows[i]])
        want = np.unique(both[both >= 0])
        if want.size == 0:
            continue
        xt = as_tensor(store.gather("vectors", want, verify=False), stored)
        lower, upper = bounds.select(torch.tensor([i])).interval(chunk_scores(bounds.q_low[i : i + 1], xt),
                                                                bounds.norm_bound(xt))
        lower, upper = lower[0].numpy(), upper[0].numpy()
        for rows, keep, sign in ((p_rows[i], p_keep[i], 1.0), (o_rows[i], o_keep[i], -1.0)):
            ok = rows >= 0
            at = np.searchsorted(want, rows[ok])
            lo, up = (lower[at], upper[at]) if sign > 0 else (-upper[at], -lower[at])  # opponents: bounds of −s
            if lo.size > k_out:
                kth = np.partition(lo, lo.size - k_out)[lo.size - k_out]  # the k_out-th largest lower bound
                keep[np.flatnonzero(ok)[up >= kth]] = rows[ok][up >= kth]
            else:
                keep[ok] = rows[ok]
    return p_keep, o_keep


def _ranked(p_rows: np.ndarray, p_sc: np.ndarray, o_rows: np.ndarray, o_sc: np.ndarray, k_out: int) -> SearchResult:
    """The top k_out of each side's candidates [Q, c], in the exact search's order.

    Equal scores (duplicate documents) come in the order the exact search gives them: proponents
    by ascending row, opponents by descending row; then a stable sort by score.
    """
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
