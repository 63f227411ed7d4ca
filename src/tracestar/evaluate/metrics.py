"""Attribution metrics of the paper's protocol (docs/ARCHITECTURE.md, “Evaluation”): MRR and
recall@k, overall and per bucket.

A *result* is what `tracestar.api.Index.query` returns for one query:
``{"query_id": str, "proponents": [{"doc_id": str, "score": float}, ...], "opponents": [...]}``,
proponents best first. Ground truth comes from the query file: `Query.extra["relevant"]` (the
ids of documents that state the fact) and `Query.extra["bucket"]` (e.g. how often the fact occurs
in the corpus).

- MRR = mean over queries of 1 / rank of the first relevant proponent (0 if none in the list).
- recall@k = share of queries with at least one relevant document among the top k proponents.

Queries without any relevant document are left out of both (nothing could be found for them);
queries without a result count as a miss.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from tracestar.corpus import Query

NO_BUCKET = "all"


def relevant_ids(query: Query) -> list[str]:
    """The ids of the documents that state the query's fact (`extra["relevant"]`), as strings."""
    rel = query.extra.get("relevant") or []
    if isinstance(rel, (str, int)):
        rel = [rel]
    return [str(r) for r in rel]


def query_bucket(query: Query) -> str:
    """The query's bucket (`extra["bucket"]`) as a string, or "all" when it has none."""
    b = query.extra.get("bucket")
    return NO_BUCKET if b is None else str(b)


def first_relevant_rank(ranked_doc_ids: Sequence[str], relevant: Iterable[str]) -> int | None:
    """1-based rank of the first relevant id in the list, or None if none is in it."""
    rel = {str(r) for r in relevant}
    for i, d in enumerate(ranked_doc_ids, start=1):
        if str(d) in rel:
            return i
    return None


def _ranked_ids(result: dict[str, Any] | None) -> list[str]:
    if not result:
        return []
    return [str(p["doc_id"]) for p in result.get("proponents", [])]


def _summarize(ranks: list[int | None], ks: Sequence[int]) -> dict[str, float]:
    n = len(ranks)
    out: dict[str, float] = {"mrr": (sum(1.0 / r for r in ranks if r is not None) / n) if n else 0.0}
    for k in ks:
        out[f"recall@{k}"] = (sum(1 for r in ranks if r is not None and r <= k) / n) if n else 0.0
    out["n"] = n
    return out


def attribution_metrics(
    queries: Sequence[Query],
    results: Sequence[dict[str, Any]],
    ks: Sequence[int] = (1, 3, 5, 10),
) -> dict[str, Any]:
    """MRR and recall@k overall and per bucket.

    Returns ``{"mrr": x, "recall@1": x, ..., "n": queries scored,
    "by_bucket": {bucket: {"mrr": x, "recall@k": x, ..., "n": n}}}``. `results` are matched to
    queries by `query_id`; a query with no result scores 0.
    """
    by_id = {str(r["query_id"]): r for r in results}
    ranks: list[int | None] = []
    per_bucket: dict[str, list[int | None]] = {}
    for q in queries:
        rel = relevant_ids(q)
        if not rel:
            continue
        rank = first_relevant_rank(_ranked_ids(by_id.get(q.id)), rel)
        ranks.append(rank)
        per_bucket.setdefault(query_bucket(q), []).append(rank)
    out: dict[str, Any] = _summarize(ranks, ks)
    out["by_bucket"] = {b: _summarize(per_bucket[b], ks) for b in sort_buckets(per_bucket)}
    return out


def mrr(queries: Sequence[Query], results: Sequence[dict[str, Any]]) -> float:
    """Mean reciprocal rank of the first relevant proponent."""
    return float(attribution_metrics(queries, results, ks=())["mrr"])


def recall_at_k(queries: Sequence[Query], results: Sequence[dict[str, Any]], k: int = 10) -> float:
    """Share of queries with a relevant document among the top k proponents."""
    return float(attribution_metrics(queries, results, ks=(k,))[f"recall@{k}"])


def sort_buckets(buckets: Iterable[str]) -> list[str]:
    """Buckets in a natural order: '1-10' < '10-100' < '100+' (by the first number in the name)."""
    import re

    def key(b: str):
        m = re.search(r"-?\d+(\.\d+)?", b)
        return (0, float(m.group()), b) if m else (1, 0.0, b)

    return sorted(buckets, key=key)
