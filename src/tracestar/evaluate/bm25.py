"""BM25 baseline (docs/ARCHITECTURE.md, “Evaluation”): lexical retrieval over the document
text, query = prompt + target.

Results have the same shape as tracestar's, so the same metrics and tail-patch apply:
``{"query_id": str, "proponents": [{"doc_id": str, "score": float}, ...], "opponents": []}``.
Documents with a BM25 score of zero share no term with the query and are not returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tracestar.corpus import Query, iter_documents

# Keep one-character words (digits, initials): facts are often numbers.
TOKEN_PATTERN = r"(?u)\b\w+\b"


def _tokenize(texts: list[str], stopwords: str | None):
    import bm25s

    return bm25s.tokenize(
        texts, lower=True, token_pattern=TOKEN_PATTERN, stopwords=stopwords, return_ids=False, show_progress=False
    )


class BM25Retriever:
    """A bm25s index over (doc_id, text) pairs. `stopwords` is passed to `bm25s.tokenize` ('en' or None)."""

    def __init__(self, doc_ids: Sequence[str], texts: Sequence[str], *, stopwords: str | None = "en",
                 k1: float = 1.5, b: float = 0.75):
        import bm25s

        if len(doc_ids) != len(texts):
            raise ValueError("doc_ids and texts differ in length")
        if not doc_ids:
            raise ValueError("BM25 over an empty corpus")
        self.doc_ids = [str(d) for d in doc_ids]
        self.stopwords = stopwords
        self._bm25 = bm25s.BM25(k1=k1, b=b)
        self._bm25.index(_tokenize(list(texts), stopwords), show_progress=False)

    @classmethod
    def from_corpus(cls, path: str | Path, *, text_field: str = "text", id_field: str = "id", **kw) -> "BM25Retriever":
        ids, texts = [], []
        for doc in iter_documents(path, text_field=text_field, id_field=id_field):
            ids.append(doc.id)
            texts.append(doc.text)
        return cls(ids, texts, **kw)

    def search(self, texts: Sequence[str], top_k: int = 10) -> list[list[tuple[str, float]]]:
        """Per query text, up to top_k (doc_id, score) pairs, best first, scores > 0."""
        k = min(int(top_k), len(self.doc_ids))
        tokens = _tokenize(list(texts), self.stopwords)
        # bm25s cannot score a query with no known term; those get an empty list.
        vocab = self._bm25.vocab_dict
        out: list[list[tuple[str, float]]] = [[] for _ in texts]
        todo = [i for i, t in enumerate(tokens) if any(w in vocab for w in t)]
        if not todo or k <= 0:
            return out
        docs, scores = self._bm25.retrieve(
            [[w for w in tokens[i] if w in vocab] for i in todo], k=k, show_progress=False, n_threads=1
        )
        docs, scores = np.asarray(docs), np.asarray(scores)
        for row, i in enumerate(todo):
            out[i] = [(self.doc_ids[int(d)], float(s)) for d, s in zip(docs[row], scores[row]) if s > 0]
        return out

    def query(self, queries: Sequence[Query], top_k: int = 10) -> list[dict[str, Any]]:
        """tracestar-shaped results for (prompt, target) queries; the query text is prompt + target."""
        hits = self.search([query_text(q) for q in queries], top_k=top_k)
        return [
            {"query_id": q.id, "proponents": [{"doc_id": d, "score": s} for d, s in h], "opponents": []}
            for q, h in zip(queries, hits)
        ]


def query_text(q: Query) -> str:
    """prompt + target, with a space between them when neither side has one."""
    if q.prompt and not q.prompt[-1].isspace() and q.target and not q.target[0].isspace():
        return q.prompt + " " + q.target
    return q.prompt + q.target


def bm25_results(corpus_path: str | Path, queries: Sequence[Query], *, top_k: int = 10,
                 text_field: str = "text", id_field: str = "id", stopwords: str | None = "en") -> list[dict[str, Any]]:
    """BM25 over the corpus file for each query; see `BM25Retriever.query`."""
    return BM25Retriever.from_corpus(corpus_path, text_field=text_field, id_field=id_field,
                                     stopwords=stopwords).query(queries, top_k=top_k)
