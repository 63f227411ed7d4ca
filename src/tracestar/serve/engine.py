"""The model side of `tracestar serve`: one loaded index, model and BM25, shared by every request.

Everything that touches the model (generation, query gradients, the scan, per-token heat maps)
runs under one lock, so concurrent requests are answered one after another and never interleave
on the model (its hooks and caches are not made for two callers at once). Each turn on the lock
is recorded in `spans`, which is how the tests see that no two turns overlapped. A request that
would have to wait behind `MAX_WAITING` others is refused at once (`Busy`) rather than queued.

Traces are kept in memory (the last `history`), so a click on a generated token, or on a
document's full-text link, reuses the trace's continuation and query vectors.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tracestar.errors import UserError

#: Requests that may wait for the model at once; one more is refused with 503.
MAX_WAITING = 64
#: Documents shown per list in the app, and the cut of long documents inside a list.
LIST_MAX_TOKENS = 400
LIST_MAX_CHARS = 4000


class Busy(Exception):
    """Too many requests are waiting for the model."""


class NotFound(UserError):
    """An unknown trace, token or document (HTTP 404)."""


@dataclass
class TraceRecord:
    """One trace: what was said, and what has been computed about it so far."""

    trace_id: str
    continuation: object  # tracestar.trace.Continuation
    top_k: int
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # query id -> final query vector [D]
    results: dict[str, dict] = field(default_factory=dict)  # query id -> query-shaped result
    attributions: dict[tuple[str, str], object] = field(default_factory=dict)  # (query id, doc id) -> TokenAttribution


class Engine:
    """An index opened for serving: model, corpus texts and BM25 loaded once."""

    def __init__(self, index_dir: str | Path, *, model_dir: str | Path | None = None, max_new_tokens: int = 64,
                 top_k: int = 10, history: int = 64):
        from tracestar.api import check_search_options, open_index
        from tracestar.evaluate.bm25 import BM25Retriever
        from tracestar.errors import check_int
        from tracestar.trace import MAX_NEW_TOKENS_LIMIT, max_new_tokens_limit

        check_search_options(top_k, None)
        check_int("--max-new-tokens", max_new_tokens, minimum=1, maximum=MAX_NEW_TOKENS_LIMIT)
        self.index = open_index(index_dir)
        self.index.tracer(model_dir)  # loaded now, and refused now if its fingerprint differs
        # lowered to what the index can trace, as `index` lowers --max-length to the model's window
        self.max_new_tokens = min(max_new_tokens, max_new_tokens_limit(self.index))
        self.top_k = top_k
        self.docs = corpus_texts(self.index)
        self.bm25 = BM25Retriever(list(self.docs), list(self.docs.values()))
        self.history = history
        self.spans: deque[tuple[str, float, float]] = deque(maxlen=4096)  # (what, start, end) per turn on the model
        self._model_lock = threading.Lock()
        self._bm25_lock = threading.Lock()
        self._state_lock = threading.Lock()  # the waiting count and the trace history
        self._waiting = 0
        self._traces: OrderedDict[str, TraceRecord] = OrderedDict()

    # --- serialization ---------------------------------------------------------------------------

    @contextmanager
    def model_turn(self, what: str) -> Iterator[None]:
        """Hold the model for one piece of work; `Busy` if too many are already waiting."""
        with self._state_lock:
            if self._waiting >= MAX_WAITING:
                raise Busy(f"{self._waiting} requests are waiting for the model; try again shortly")
            self._waiting += 1
        try:
            with self._model_lock:
                start = time.perf_counter()
                try:
                    yield
                finally:
                    self.spans.append((what, start, time.perf_counter()))
        finally:
            with self._state_lock:
                self._waiting -= 1

    # --- what the side panel shows ---------------------------------------------------------------

    def info(self) -> dict:
        m = self.index.manifest
        norm, pre = m.get("normalizer") or {}, m.get("preconditioner") or {}
        v_source = "none (no optimizer correction)"
        if m.get("optimizer_correction", True) and norm.get("kind") not in (None, "identity"):
            where = Path(str(norm["source"])).name if norm.get("source") else ""
            v_source = f"{norm['kind']}" + (f" ({where})" if where and where != norm["kind"] else "")
        lam = pre.get("lambda")
        return {
            "model": Path(m["model"]["path"]).name,
            "model_path": m["model"]["path"],
            "fingerprint": m["model"]["fingerprint"][:12],
            "n_params": m["model"].get("n_params"),
            "coverage": m["model"].get("coverage"),
            "dim": m["dim"],
            "v_source": v_source,
            "preconditioner": pre.get("kind", "none"),
            "lambda": lam,
            "lambda_source": pre.get("lambda_source"),
            "unit_norm": m.get("unit_norm"),
            "n_docs": len(self.index.doc_ids),
            "corpus": Path(m["corpus"]["path"]).name,
            "max_length": self.index.max_length,
            "max_new_tokens": self.max_new_tokens,
            "top_k": self.top_k,
        }

    # --- traces ----------------------------------------------------------------------------------

    def trace(self, prompt: str, *, target: str | None = None, max_new_tokens: int | None = None,
              top_k: int | None = None, on_token: Callable[[int, int, str], None] | None = None) -> dict:
        """Generate (or take the target), trace the continuation, and keep the trace for later clicks."""
        from tracestar.corpus import Query
        from tracestar.evaluate.bm25 import query_text
        from tracestar.trace import StepClock, explain_results, generate, given, piece_vectors, search_pieces, whole

        top_k = top_k or self.top_k
        timings: dict[str, float] = {}
        clock = StepClock(timings)
        with self.model_turn("trace"):
            with clock("generate_s"):
                if target is not None:
                    cont = given(self.index, prompt, target)
                    for i, (tid, text) in enumerate(zip(cont.ids, cont.texts)):
                        if on_token is not None:
                            on_token(i, tid, text)
                else:
                    cont = generate(self.index, prompt, max_new_tokens or self.max_new_tokens, on_token=on_token)
            piece = whole(cont, self.index.max_length)
            with clock("attribute_s"):
                vectors = piece_vectors(self.index, [piece])
                result = search_pieces(self.index, [piece], vectors, top_k)[0]
            with clock("explain_s"):
                found = explain_results(self.index, [piece], vectors, [result], texts=self.docs)
        with clock("bm25_s"), self._bm25_lock:
            bm25 = self.bm25.search([query_text(Query("", cont.prompt, cont.text))], top_k=top_k)[0]
        record = TraceRecord(secrets.token_hex(8), cont, top_k, {piece.query_id: vectors[0]}, {piece.query_id: result},
                             dict(found))
        self._remember(record)
        out = self._payload(record, piece.query_id)
        out["generation"] = cont.to_json()
        out["bm25"] = [{"doc_id": d, "score": s} for d, s in bm25]
        out["html"]["bm25"] = self._list_html(record, piece.query_id, out["bm25"], kind="bm25", explained=False)
        out["timings"] = {k: round(v, 4) for k, v in timings.items()}
        return out

    def token(self, trace_id: str, position: int) -> dict:
        """The proponents and opponents of one continuation token (computed on the first click)."""
        from tracestar.trace import explain_results, one_token, search_pieces

        record = self._record(trace_id)
        n = len(record.continuation.ids)
        if not 0 <= position < n:
            raise UserError(f"field 'position': must be between 0 and {n - 1}, got {position}")
        qid = f"trace/{position}"
        if qid not in record.results:
            piece = one_token(record.continuation, position, self.index.max_length)
            with self.model_turn("token"):
                vectors = self._vectors(record, [piece])
                result = search_pieces(self.index, [piece], vectors, record.top_k)[0]
                found = explain_results(self.index, [piece], vectors, [result], texts=self.docs)
            with self._state_lock:
                record.results[qid] = result
                record.attributions.update(found)
        return self._payload(record, qid)

    def document(self, trace_id: str, doc_id: str, position: int | None = None,
                 chunk: int | None = None) -> tuple[dict, object]:
        """(the traced query as a result-like dict, the document's TokenAttribution) for its page;
        `chunk`: the window, in an index built with --chunk-tokens."""
        from tracestar.corpus import Query
        from tracestar.explain import explain_pairs
        from tracestar.trace import one_token, whole

        record = self._record(trace_id)
        if doc_id not in self.docs:
            raise NotFound(f"no document with id {doc_id!r} in the index")
        cont = record.continuation
        if position is None:
            piece = whole(cont, self.index.max_length)
        else:
            if not 0 <= position < len(cont.ids):
                raise NotFound(f"the trace has no token at position {position}")
            piece = one_token(cont, position, self.index.max_length)
        row = doc_id if chunk is None else (doc_id, chunk)
        key = (piece.query_id, row)
        if key not in record.attributions:
            with self.model_turn("document"):
                vec = self._vectors(record, [piece])[0]
                found = explain_pairs(self.index, [(Query(piece.query_id, piece.prompt, piece.target), row)],
                                      texts=self.docs, query_vectors={piece.query_id: vec})
            with self._state_lock:
                record.attributions.update(found)
        return {"prompt": piece.prompt, "target": piece.target, "position": position}, record.attributions[key]

    # --- helpers ---------------------------------------------------------------------------------

    def _vectors(self, record: TraceRecord, pieces: list) -> np.ndarray:
        """[N, D] final query vectors of the pieces, computed once per trace (call with the model held)."""
        from tracestar.trace import piece_vectors

        todo = [p for p in pieces if p.query_id not in record.vectors]
        if todo:
            for p, v in zip(todo, piece_vectors(self.index, todo)):
                record.vectors[p.query_id] = v
        return np.stack([record.vectors[p.query_id] for p in pieces])

    def _remember(self, record: TraceRecord) -> None:
        with self._state_lock:
            self._traces[record.trace_id] = record
            while len(self._traces) > self.history:
                self._traces.popitem(last=False)

    def _record(self, trace_id: str) -> TraceRecord:
        with self._state_lock:
            record = self._traces.get(trace_id)
            if record is not None:
                self._traces.move_to_end(trace_id)
        if record is None:
            raise NotFound(f"unknown trace id {trace_id!r} (the server keeps the last {self.history} traces)")
        return record

    def _payload(self, record: TraceRecord, qid: str) -> dict:
        """A `query`-shaped result (hits without their per-token lists) plus its lists as HTML."""
        res = record.results[qid]
        slim = {k: v for k, v in res.items() if k not in ("proponents", "opponents")}
        for key in ("proponents", "opponents"):
            slim[key] = [{k: v for k, v in h.items() if k != "tokens"} for h in res[key]]
        slim["trace_id"] = record.trace_id
        scale = max([abs(h["score"]) for key in ("proponents", "opponents") for h in res[key]], default=0.0)
        slim["html"] = {key: self._list_html(record, qid, res[key], kind=key, scale=scale)
                        for key in ("proponents", "opponents")}
        return slim

    def _list_html(self, record: TraceRecord, qid: str, hits: list[dict], *, kind: str, explained: bool = True,
                   scale: float | None = None) -> str:
        """The report's hit list (escaped text, heat maps) with a link to each document's page."""
        from urllib.parse import urlencode

        from tracestar.report.hits import hit_key
        from tracestar.report.html import hit_list

        position = qid.split("/", 1)[1] if "/" in qid else None
        links = {}
        for h in hits:  # keyed as the list looks them up: by doc id, or (doc id, chunk) for a window
            params = {"trace": record.trace_id, "doc": h["doc_id"], **({"position": position} if position else {}),
                      **({"chunk": h["chunk"]} if h.get("chunk") is not None else {})}
            links[hit_key(h)] = "/doc?" + urlencode(params)
        scores = None
        if explained:
            scores = {}
            for h in hits:
                att = record.attributions.get((qid, hit_key(h)))
                if att is not None:
                    scores[hit_key(h)] = [(t, s, att.is_special(i)) for i, (t, s) in enumerate(att.tokens)]
        return hit_list(hits, self.docs, scores, kind=kind, scale=scale, links=links,
                        open_first=3 if kind == "proponents" else 0, max_tokens=LIST_MAX_TOKENS, max_chars=LIST_MAX_CHARS)


def corpus_texts(index) -> dict[str, str]:
    """doc_id -> text of every indexed document, from the corpus the manifest names (read once)."""
    from tracestar.corpus import indexed_texts

    return indexed_texts(index.manifest["corpus"], index.path, index.doc_ids)
