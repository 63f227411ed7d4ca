"""The Python API — the same functions the CLI calls.

    from tracestar.api import build_index, open_index
    build_index("model/", "corpus.jsonl", "index/", optimizer_state="model/optimizer.pt")
    idx = open_index("index/")
    results = idx.query([Query("q1", "The capital of France is", " Paris")], top_k=10)
    vectors = idx.query_vectors(queries)          # [Q, D] final TrackStar query vectors
    docs = idx.document_vectors(["some text"])     # [N, D] final vectors for new texts
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tracestar import dist
from tracestar.batching import encode_document
from tracestar.build import build_index
from tracestar.corpus import Query, read_queries
from tracestar.errors import UserError, check_int
from tracestar.files import write_jsonl
from tracestar.index import writer
from tracestar.index.store import IndexStore
from tracestar.normalizer import Normalizer
from tracestar.options import BuildOptions
from tracestar.preconditioner import Preconditioner
from tracestar.projection import Block
from tracestar.refit import refit
from tracestar.tracer import Tracer, finalize_vectors

__all__ = ["BuildOptions", "Index", "Query", "build_index", "by_document", "open_index", "query_file", "refit"]


class Index:
    """An opened index: its manifest, doc table, V, R^{-1/2}, and (lazily) the model to embed queries."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.store = IndexStore(self.path)
        self.manifest = self.store.manifest
        self.blocks = [Block.from_json(b) for b in self.manifest["projection"]["blocks"]]
        self.normalizer = Normalizer.load(self.path / writer.NORMALIZER, self.manifest["normalizer"])
        self.preconditioner = Preconditioner.load(self.path / writer.PRECONDITIONER, self.manifest["preconditioner"])
        self._tracer: Tracer | None = None
        self._capture = None

    @property
    def doc_ids(self) -> list[str]:
        return self.store.doc_ids

    @property
    def max_length(self) -> int:
        """The manifest's max_length, never beyond the model's window (indexes built before the
        build clamped it may record a longer one)."""
        window = self._tracer.window if self._tracer is not None else None
        return min(self.manifest["max_length"], window or self.manifest["max_length"])

    @property
    def options(self) -> BuildOptions:
        m = self.manifest
        return BuildOptions(max_length=self.max_length, unit_norm=m["unit_norm"], seed=m["projection"]["seed"], quiet=True)

    def tracer(self, model_dir: str | Path | None = None, device: str | None = None) -> Tracer:
        """The model this index was built with; a model with another fingerprint is refused."""
        if self._tracer is None or (model_dir is not None and Path(model_dir).resolve() != self._tracer.model_dir):
            path = Path(model_dir) if model_dir is not None else Path(self.manifest["model"]["path"])
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            tracer = Tracer(path, device)
            if tracer.fingerprint != self.manifest["model"]["fingerprint"]:
                raise UserError(
                    f"{path}: model fingerprint {tracer.fingerprint[:12]} differs from the index's "
                    f"{self.manifest['model']['fingerprint'][:12]} ({self.path}); refusing to mix them"
                )
            self._tracer = tracer
            seed = self.manifest["projection"]["seed"]
            self._capture = tracer.capture(self.blocks, self.normalizer, seed, self.manifest.get("autocast"))
        return self._tracer

    def raw_query_vectors(self, queries: list[Query], model_dir: str | Path | None = None) -> np.ndarray:
        """[Q, D] g = P(∇L/√V) of the target given the prompt, before R and normalization."""
        tracer = self.tracer(model_dir)
        return tracer.query_vectors(self._capture, queries, self.options)

    def query_vectors(self, queries: list[Query], model_dir: str | Path | None = None) -> np.ndarray:
        """[Q, D] final query vectors, comparable with the stored document vectors."""
        raw = torch.from_numpy(self.raw_query_vectors(queries, model_dir))
        return finalize_vectors(raw, self.preconditioner, self.manifest["unit_norm"]).numpy()

    def document_vectors(self, texts: list[str], model_dir: str | Path | None = None) -> np.ndarray:
        """[N, D] final vectors for texts treated as training documents."""
        tracer = self.tracer(model_dir)
        examples = [encode_document(tracer.tokenizer, t, i, self.max_length) for i, t in enumerate(texts)]
        raw = torch.from_numpy(tracer.raw_vectors(self._capture, examples, self.options))
        return finalize_vectors(raw, self.preconditioner, self.manifest["unit_norm"]).numpy()

    def search_vectors(self, vectors: np.ndarray, top_k: int = 10, *, exact: bool = False, rerank: int | None = None):
        from tracestar.index.search import search

        check_search_options(top_k, rerank)
        return search(self.store, np.asarray(vectors, dtype=np.float32), top_k, exact=exact, rerank=rerank)

    def query(
        self,
        queries: list[Query],
        top_k: int = 10,
        *,
        model_dir: str | Path | None = None,
        exact: bool = False,
        rerank: int | None = None,
        by_doc: bool = False,
    ) -> list[dict]:
        """Top-k proponents (descending score) and opponents (ascending) per query, in input order.

        Each hit is {"doc_id", "score"}; in an index built with --chunk-tokens a hit is a window,
        with its "chunk" and token span "start", "end". `by_doc`: one hit per document instead, at
        its best window (`by_document`).
        """
        check_search_options(top_k, rerank)
        if not queries:
            return []
        vectors = self.query_vectors(queries, model_dir)
        if by_doc:
            props, opps = by_document(self, vectors, top_k, exact=exact, rerank=rerank)
        else:
            props, opps = self.hits(self.search_vectors(vectors, top_k, exact=exact, rerank=rerank))
        return [{"query_id": q.id, "prompt": q.prompt, "target": q.target, "proponents": props[qi], "opponents": opps[qi]}
                for qi, q in enumerate(queries)]

    def hits(self, found) -> tuple[list[list[dict]], list[list[dict]]]:
        """(proponents, opponents) per query of a `SearchResult`, as result entries (`DocRow.hit`)."""
        docs = self.store.docs

        def entries(rows, scores) -> list[list[dict]]:
            return [[docs[int(r)].hit(float(s)) for r, s in zip(rs, ss)] for rs, ss in zip(rows, scores)]

        return entries(found.prop_rows, found.prop_scores), entries(found.opp_rows, found.opp_scores)


def open_index(path: str | Path) -> Index:
    return Index(path)


def by_document(index: Index, vectors: np.ndarray, top_k: int, *, exact: bool = False,
                rerank: int | None = None) -> tuple[list[list[dict]], list[list[dict]]]:
    """(proponents, opponents) per query [Q, D] of `vectors`, one entry per document: a document
    scores as its best window — the max over its windows for proponents, the min for opponents —
    and its entry is that window's hit (`DocRow.hit`). `tracestar query --by-doc` calls this.

    Why the answer is exact: the windows come back in score order, so once the top k' windows of
    a side hold k distinct documents, those documents' best windows are among them, and no
    document outside the list can beat the k'-th window. k' starts at 2k and doubles until every
    query has k documents a side or k' covers the index. An index without chunking has one row per
    document, and the answer is the plain search's.
    """
    check_search_options(top_k, rerank)
    n_rows = index.store.n_rows
    want = min(top_k, len({d.doc_id for d in index.store.docs}))
    k = min(n_rows, 2 * top_k)
    while True:
        props, opps = index.hits(index.search_vectors(vectors, k, exact=exact, rerank=rerank))
        props, opps = [_best_per_doc(h, want) for h in props], [_best_per_doc(h, want) for h in opps]
        if k >= n_rows or all(len(h) >= want for h in props + opps):
            return props, opps
        k = min(n_rows, 2 * k)


def _best_per_doc(hits: list[dict], k: int) -> list[dict]:
    """The first hit of each document in ranked `hits` (its best window), the first `k` documents."""
    seen: set[str] = set()
    out = []
    for h in hits:
        if h["doc_id"] not in seen:
            seen.add(h["doc_id"])
            out.append(h)
            if len(out) == k:
                break
    return out


def check_search_options(top_k: int, rerank: int | None) -> None:
    """--top-k ≥ 1 (a search that returns nothing is a mistake, not a request); --rerank ≥ 0
    (0 keeps the compressed form's own scores)."""
    check_int("--top-k", top_k, minimum=1)
    check_int("--rerank", rerank, minimum=0, optional=True)


def query_file(index_dir: str | Path | Index, queries_path: str | Path, out: str | Path, *, top_k: int = 10, model_dir=None, exact=False,
               rerank=None, by_doc: bool = False) -> list[dict]:
    """`tracestar query`: read QUERIES.jsonl, write RESULTS.jsonl (one object per query, input order).

    `index_dir` may be an open `Index`, so a caller that also reports on the index (the CLI names
    the form it searched) verifies its files once. Under torchrun each rank scans its own shards
    and the lists are merged; rank 0 writes the file.
    """
    check_search_options(top_k, rerank)
    queries = read_queries(queries_path)
    dist.init_from_env("cuda" if torch.cuda.is_available() else "cpu")
    index = index_dir if isinstance(index_dir, Index) else open_index(index_dir)
    results = index.query(queries, top_k, model_dir=model_dir, exact=exact, rerank=rerank, by_doc=by_doc)
    if dist.rank() == 0:
        write_jsonl(out, results)
    dist.barrier()
    return results
