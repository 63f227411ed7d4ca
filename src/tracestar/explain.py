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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracestar.batching import collate, encode_document
from tracestar.corpus import Query, iter_documents
from tracestar.errors import UserError
from tracestar.index.store import as_float32


@dataclass
class TokenAttribution:
    doc_id: str
    doc_score: float  # the score `query` reports (from the stored vector)
    tokens: list[tuple[str, float]]  # (token text, contribution); contributions sum to the score

    def to_json(self) -> dict:
        return {
            "doc_id": self.doc_id,
            "doc_score": self.doc_score,
            "tokens": [{"token": t, "score": s} for t, s in self.tokens],
        }


def document_texts(index, doc_ids) -> dict[str, str]:
    """Texts of the given documents, read from the corpus recorded in the manifest (one pass)."""
    wanted = set(doc_ids)
    corpus = index.manifest["corpus"]
    found = {}
    for doc in iter_documents(corpus["path"], text_field=corpus["text_field"], id_field=corpus["id_field"]):
        if doc.id in wanted:
            found[doc.id] = doc.text
            if len(found) == len(wanted):
                break
    return found


def stored_vector(index, doc_id: str) -> np.ndarray:
    """[D] the stored (final) vector of one document."""
    row = index.store.row_of(doc_id)
    if row is None:
        raise UserError(f"{index.path}: no document with id {doc_id!r}")
    for shard_no, info in enumerate(index.store.shards):
        if info["start"] <= row < info["start"] + info["rows"]:
            shard = index.store.load_shard("vectors", shard_no)
            return as_float32(shard[row - info["start"]], index.manifest["dtype"])
    raise UserError(f"{index.path}: row {row} is in no shard")  # pragma: no cover - manifest is consistent


def explain_tokens(index, query: Query, doc_id: str, *, text: str | None = None, model_dir=None) -> TokenAttribution:
    """Per-token contributions of `doc_id` to its score for `query` (they sum to the score)."""
    from tracestar.api import Index, open_index

    if not isinstance(index, Index):
        index = open_index(index)
    if text is None:
        text = document_texts(index, [doc_id]).get(doc_id)
        if text is None:
            raise UserError(f"{index.manifest['corpus']['path']}: no document with id {doc_id!r}")
    q = torch.from_numpy(index.query_vectors([query], model_dir))[0]  # [D]
    tracer = index.tracer(model_dir)
    example = encode_document(tracer.tokenizer, text, 0, index.manifest["max_length"])
    per_pos = index._capture.token_vectors(collate([example], tracer.pad))[0].cpu()  # [T, D]
    whitened = index.preconditioner.apply(per_pos)  # [T, D], linear so it commutes with the sum
    norm = whitened.sum(0).norm() if index.manifest["unit_norm"] else torch.tensor(1.0)
    contrib = (whitened @ q) / norm.clamp(min=1e-30)  # [T]
    doc_score = float(np.dot(stored_vector(index, doc_id), q.numpy()))
    tokens = [tracer.tokenizer.decode([tid]) for tid in example.ids]
    return TokenAttribution(doc_id, doc_score, list(zip(tokens, contrib.tolist())))


def explain(
    index_dir: str | Path,
    doc_id: str,
    *,
    query: Query | None = None,
    queries_path: str | Path | None = None,
    query_id: str | None = None,
    model_dir=None,
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
    return explain_tokens(index_dir, query, doc_id, model_dir=model_dir)
