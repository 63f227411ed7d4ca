"""Exact per-token attribution: which tokens of a proponent carry its score.

A document's gradient is a sum over positions: for every tracked matrix, ∇W = Σ_t δ_t x_tᵀ, so
g = Σ_t g_t where g_t = P((δ_t x_tᵀ)/√V) is the part carried by the activations at position t
(`FactoredCapture.token_vectors`). R^{-1/2} is linear, so with q̂ the final query vector

    score = q̂ · R^{-1/2} g / ‖R^{-1/2} g‖ = Σ_t q̂ · R^{-1/2} g_t / ‖R^{-1/2} g‖

and the per-position terms add up to the score exactly. We attribute per *position of the
gradient* (the input token at t, whose activations x_t and δ_t form g_t) rather than per
*predicted token* (one backward pass per loss term): one forward and backward per document gives
an exact decomposition. δ_t includes the loss of every later token, so a position's score is what
the model's computation at that token contributes to the document's influence on the query.

Only q̂ depends on the query; the per-position vectors g_t and the norm ‖R^{-1/2} g‖ are the
document's alone. `explain_pairs` therefore runs one backward pass per distinct document and turns
it into the heat maps of every query that retrieved it with one [T, D] × [D, n] product, holding
one document's [T, D] block at a time. R^{-1/2} moves to the query side, q̂ · R^{-1/2} g_t =
(R^{-1/2}ᵀ q̂) · g_t, so it is applied once per query and once per document (to g, for the norm)
rather than to every position: on a CPU that product, not the backward pass, dominated the cost.
The norms are computed for a chunk of documents at once, which reads R^{-1/2} once per chunk.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from tracestar.batching import Example, collate, document_ids, encode_document
from tracestar.corpus import Query, indexed_texts
from tracestar.errors import OptionError, UserError
from tracestar.index.store import as_float32

POSITION_CONVENTION = (
    "positions count the document's tokens from 0 as the model reads them, special tokens included; "
    "a position's score is the part of the gradient carried by the model's activations at that input token, "
    "so it includes the gradient from the loss of every later token"
)
WINDOW_CONVENTION = (
    "; in a window of a longer document (--chunk-tokens) positions count the window's tokens, the model reads the "
    "window alone, and document position = start + position"
)


@dataclass
class TokenAttribution:
    doc_id: str
    doc_score: float  # the score `query` reports (from the stored vector)
    tokens: list[tuple[str, float]]  # per position: (token text, contribution); contributions sum to the score
    special: list[bool] = field(default_factory=list)  # per position: a special token of the tokenizer (eos, bos…)
    chunk: int | None = None  # a window of the document (--chunk-tokens): its number and token span
    start: int | None = None  # the document position of position 0
    end: int | None = None

    def is_special(self, position: int) -> bool:
        return bool(self.special[position]) if position < len(self.special) else False

    def to_json(self) -> dict:
        span = {} if self.chunk is None else {"chunk": self.chunk, "start": self.start, "end": self.end}
        return {
            "doc_id": self.doc_id,
            **span,
            "doc_score": self.doc_score,
            "position_convention": POSITION_CONVENTION + (WINDOW_CONVENTION if self.chunk is not None else ""),
            "tokens": [
                {"position": i, "token": t, "score": s, "special": self.is_special(i)}
                for i, (t, s) in enumerate(self.tokens)
            ],
        }

    def to_text(self, top: int = 15) -> str:
        """`tracestar explain`'s text form: the score and its per-position sum, how positions are
        counted, then the `top` positions by |score|."""
        n = len(self.tokens)
        name = self.doc_id if self.chunk is None else f"{self.doc_id} (chunk {self.chunk}: tokens {self.start}–{self.end})"
        convention = POSITION_CONVENTION + (WINDOW_CONVENTION if self.chunk is not None else "")
        lines = [f"{name}: score {self.doc_score:+.5f} (sum over its {n} positions "
                 f"{sum(s for _, s in self.tokens):+.5f})", f"{convention}."]
        best = sorted(range(n), key=lambda i: -abs(self.tokens[i][1]))[:top]
        lines += [f"top {len(best)} of {n} positions by |score| (--json lists all):", f"  {'pos':>5}  {'score':>9}  token"]
        for i in best:
            token, score = self.tokens[i]
            lines.append(f"  {i:>5}  {score:+.5f}  {token!r}{'  (special token)' if self.is_special(i) else ''}")
        return "\n".join(lines)


def document_texts(index, doc_ids) -> dict[str, str]:
    """Texts of the given documents, read from the corpus recorded in the manifest (one pass); an id
    the corpus lacks is left out, for `explain_pairs` to report with its document."""
    return indexed_texts(index.manifest["corpus"], index.path, doc_ids, allow_missing=True)


#: What names an explained row: a doc id, or (doc id, chunk) for a window (`DocRow.key`).
RowKey = str | tuple[str, int]


def row_of(index, key: RowKey) -> int:
    """The index row of `key`; a document split into several windows must be named with its chunk."""
    doc_id, chunk = (key, None) if isinstance(key, str) else key
    if chunk is not None and not index.store.chunked:
        raise OptionError("--chunk", f"{index.path} was built without --chunk-tokens: its rows are whole documents, "
                                     f"so leave --chunk out")
    row = index.store.row_of(doc_id, chunk)
    if row is not None:
        return row
    n = index.store.chunks_of(doc_id)
    if n and chunk is None:
        raise OptionError("--chunk", f"document {doc_id!r} is split into {n} windows in {index.path}; name one "
                                     f"(0 to {n - 1}, a hit's `chunk`)")
    if n:
        raise OptionError("--chunk", f"document {doc_id!r} has windows 0 to {n - 1} in {index.path}, not {chunk}")
    raise UserError(f"{index.path}: no document with id {doc_id!r}")


def stored_vector(index, key: RowKey) -> np.ndarray:
    """[D] the stored (final) vector of one document, or of one window of it."""
    return as_float32(index.store.gather("vectors", [row_of(index, key)])[0], index.store.stored_dtype("vectors"))


def _span(index, key: RowKey) -> tuple[int, int, int] | None:
    """(chunk, start, end) of the window `key` names in a chunked index, else None (a whole document)."""
    if not index.store.chunked:
        return None
    d = index.store.docs[row_of(index, key)]
    return None if d.chunk is None else (d.chunk, d.start, d.end)


def _open(index):
    from tracestar.api import Index, open_index

    return index if isinstance(index, Index) else open_index(index)


def pulled_back(precond, queries: torch.Tensor) -> torch.Tensor:
    """[n, D] R^{-1/2}ᵀ q̂ per row of `queries` [n, D], so that q̂ · (R^{-1/2} g) = (this) · g."""
    if precond.kind == "none":
        return queries.float()
    out = queries.clone().float()
    for (s, e), m in zip(precond.ranges, precond.mats):
        out[:, s:e] = queries[:, s:e].float() @ m.T  # apply() maps v to v @ m; its adjoint is q @ mᵀ
    return out


def document_terms(index, tracer, text: str, pulled: torch.Tensor,
                   span: tuple[int, int] | None = None) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(token ids [T], unnormalised contributions [T, n], gradient g [D]) of one document for the
    queries given by `pulled` [n, D] (`pulled_back` of the final query vectors): one forward and
    backward pass. Divided by `final_norms` of g, column j sums to the document's score for query j.
    `span`: the token window [start, end) of a chunked index's row, cut from the document's ids as
    the build cut it.
    """
    if span is None:
        example = encode_document(tracer.tokenizer, text, 0, index.max_length)
    else:
        example = Example(row=0, ids=document_ids(tracer.tokenizer, text)[span[0] : span[1]], loss_from=1)
    per_pos = index._capture.token_vectors(collate([example], tracer.pad))[0].detach().cpu().float()  # [T, D]
    return example.ids, per_pos @ pulled.T, per_pos.sum(0)


def final_norms(index, grads: torch.Tensor) -> torch.Tensor:
    """[c] ‖R^{-1/2} g‖ per row of `grads` [c, D] (ones without unit norm).

    Many documents at once: R^{-1/2} is hundreds of MB, and reading it once per document would
    cost more than the document's backward pass.
    """
    if not index.manifest["unit_norm"]:
        return torch.ones(grads.shape[0])
    return index.preconditioner.apply(grads).norm(dim=1).clamp(min=1e-30)


def _doc_score(index, doc_id: RowKey, q: np.ndarray, fallback: float) -> float:
    """The score `query` reports: the stored vector · q; the exact sum when the vectors were dropped."""
    if not index.store.has_kind("vectors"):
        return fallback
    return float(np.dot(stored_vector(index, doc_id), q))


def explain_pairs(
    index,
    pairs: Sequence[tuple[Query, RowKey]],
    *,
    texts: Mapping[str, str] | None = None,
    model_dir=None,
    quiet: bool = True,
    on_error: Callable[[str, Exception], None] | None = None,
    chunk_docs: int = 32,
    query_vectors: Mapping[str, np.ndarray] | None = None,
) -> dict[tuple[str, str], TokenAttribution]:
    """Per-token attributions of many (query, doc_id) pairs, keyed by (query.id, doc_id).

    In an index built with --chunk-tokens a pair names a window as (doc_id, chunk) (`DocRow.key`,
    `report.hits.hit_key` of a hit), and that key is the result's; `texts` stays keyed by doc id.

    One backward pass per distinct document, reused for every query that retrieved it; a progress
    bar over documents unless `quiet`. Documents are taken `chunk_docs` at a time, so memory holds
    one document's [T, D] per-position block plus `chunk_docs` gradients [D] besides the results.
    A model that does not match the index is refused before any work (UserError). A document that
    fails is passed to `on_error(doc_id, exc)` and left out; with no `on_error` the error is raised.
    `query_vectors` (query id -> final vector [D]) is for a caller that already has them, such as a
    trace of generated token ids, which no (prompt, target) text reproduces exactly.
    """
    from tqdm.auto import tqdm

    index = _open(index)
    tracer = index.tracer(model_dir)  # refuses a mismatched model
    queries, by_doc = _by_document(pairs)
    if not by_doc:
        return {}
    qids = list(queries)
    q_final = _final_query_vectors(index, [queries[i] for i in qids], query_vectors, model_dir)  # [Q, D]
    pulled = pulled_back(index.preconditioner, q_final)  # [Q, D]
    column = {qid: j for j, qid in enumerate(qids)}
    missing = list(dict.fromkeys(_doc_id(k) for k in by_doc if texts is None or _doc_id(k) not in texts))
    if missing:
        texts = {**(texts or {}), **document_texts(index, missing)}
    special_ids = set(getattr(tracer.tokenizer, "all_special_ids", None) or [])

    out: dict[tuple[str, str], TokenAttribution] = {}
    docs = list(by_doc.items())
    with tqdm(total=len(docs), desc="explaining", unit="doc", disable=quiet) as bar:
        for start in range(0, len(docs), chunk_docs):
            done = []  # (doc_id, query ids, token ids, contributions [T, n] before the norm, g [D])
            for doc_id, doc_qids in docs[start : start + chunk_docs]:  # doc_id: a RowKey
                try:
                    text = texts.get(_doc_id(doc_id))
                    if text is None:
                        raise UserError(f"{index.manifest['corpus']['path']}: no document with id {_doc_id(doc_id)!r}")
                    cols = [column[q] for q in doc_qids]
                    span = _span(index, doc_id)
                    terms = document_terms(index, tracer, text, pulled[cols], None if span is None else span[1:])
                    done.append((doc_id, doc_qids, span, *terms))
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    if on_error is None:
                        raise
                    on_error(doc_id, exc)
                bar.update(1)
            if not done:
                continue
            norms = final_norms(index, torch.stack([g for *_, g in done]))  # [c]
            for (doc_id, doc_qids, span, ids, raw, _), norm in zip(done, norms):
                contrib = raw / norm  # [T, n]
                tokens = [tracer.tokenizer.decode([tid]) for tid in ids]
                special = [tid in special_ids for tid in ids]
                for j, qid in enumerate(doc_qids):
                    score = _doc_score(index, doc_id, q_final[column[qid]].numpy(), float(contrib[:, j].sum()))
                    out[(qid, doc_id)] = TokenAttribution(_doc_id(doc_id), score, list(zip(tokens, contrib[:, j].tolist())),
                                                          special, *(span or ()))
    return out


def _doc_id(key: RowKey) -> str:
    return key if isinstance(key, str) else key[0]


def _by_document(pairs: Sequence[tuple[Query, RowKey]]) -> tuple[dict[str, Query], dict[RowKey, list[str]]]:
    """(query id -> query, doc id -> ids of the queries that retrieved it), both in first-seen order."""
    queries: dict[str, Query] = {}
    by_doc: dict[RowKey, list[str]] = defaultdict(list)
    for query, doc_id in pairs:
        queries.setdefault(query.id, query)
        if query.id not in by_doc[doc_id]:
            by_doc[doc_id].append(query.id)
    return queries, by_doc


def _final_query_vectors(index, queries: list[Query], given: Mapping[str, np.ndarray] | None, model_dir) -> torch.Tensor:
    """[Q, D] final vectors of `queries`: the caller's (`given`, by query id), else traced from their texts."""
    if given is not None:
        return torch.from_numpy(np.stack([np.asarray(given[q.id], dtype=np.float32) for q in queries]))
    return torch.from_numpy(index.query_vectors(queries, model_dir))


def explain_tokens(index, query: Query, doc_id: str, *, text: str | None = None, model_dir=None,
                   chunk: int | None = None) -> TokenAttribution:
    """Per-token contributions of `doc_id` (its window `chunk` in a chunked index) to its score for
    `query` (they sum to the score)."""
    index = _open(index)
    texts = {doc_id: text} if text is not None else None
    key: RowKey = doc_id if chunk is None else (doc_id, chunk)
    if index.store.chunked or chunk is not None:
        row_of(index, key)  # a document of several windows needs its chunk: one line, before the model loads
    return explain_pairs(index, [(query, key)], texts=texts, model_dir=model_dir)[(query.id, key)]


def explain(
    index_dir: str | Path,
    doc_id: str,
    *,
    query: Query | None = None,
    queries_path: str | Path | None = None,
    query_id: str | None = None,
    model_dir=None,
    chunk: int | None = None,
) -> TokenAttribution:
    """`tracestar explain`: the query is given directly or picked by id from a queries file."""
    if query is None:
        from tracestar.corpus import read_queries

        if queries_path is None or query_id is None:
            raise UserError("give --prompt and --target, or --queries and --query-id")
        matches = [q for q in read_queries(queries_path) if q.id == query_id]
        if not matches:
            raise UserError(f"{queries_path}: no query with id {query_id!r}")
        query = matches[0]
    return explain_tokens(index_dir, query, doc_id, model_dir=model_dir, chunk=chunk)
