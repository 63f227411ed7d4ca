"""The build's phases: corpus → V → raw vectors → R → final vectors (rank-aware, resumable).

1. V: from the optimizer state, or estimated on a sample (all-reduced), or none.
2. corpus pass: g = P(∇L/√V) per document (float32, or as `--raw-dtype` says). Shard s holds
   documents [s·S, (s+1)·S) (or their windows, with `--chunk-tokens`) and belongs to rank s mod W,
   so any world size writes the same files.
3–4. R, then the final vectors unit(R^{-1/2} g) and the manifest: `finalize.py`, which `refit.py`
   runs again on another index's raw shards.

What each file is called and how a finished shard is recognised (so a killed build resumes to the
same bytes) live in `index/writer.py`; how a rerun verifies and repairs a finished index, in
`index/repair.py`; the model session, in `tracer.py`.

Wall time per phase (`progress.PhaseTimer`) is printed at the end and recorded in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tracestar import __version__, dist, files
from tracestar.batching import Example, encode_chunks, encode_document
from tracestar.capture import FactoredCapture
from tracestar.corpus import (
    Document,
    corpus_format,
    iter_documents,
    read_queries,
    validate_corpus,
)
from tracestar.errors import OptionError
from tracestar.finalize import describe_work, finalize, owns, rows_of, sample_rows
from tracestar.index import writer
from tracestar.index.repair import start_repair
from tracestar.normalizer import Normalizer, NoSecondMoment
from tracestar.options import VARIANTS, BuildOptions  # noqa: F401 (re-exported)
from tracestar.progress import PhaseTimer, bar, say
from tracestar.projection import Block, layout_dim, make_layout
from tracestar.tracer import Tracer, clamp_to_window, encode_queries


def build_index(model_dir: str | Path, corpus: str | Path, out: str | Path, options: BuildOptions | None = None, **kw) -> Path:
    """Build a TrackStar index of `corpus` for the model in `model_dir` into `out`. Returns `out`.

    Keyword arguments override fields of `options` (see `BuildOptions`). Rerun on a finished index,
    it verifies every file the manifest lists and recomputes what is damaged.
    """
    opts = dataclasses.replace(options or BuildOptions(), **kw).resolved()
    corpus, out = Path(corpus), Path(out)
    timer = PhaseTimer()
    dist.init_from_env(opts.device)
    # Everything the user can get wrong is checked before anything is written.
    with timer.phase("load"):
        n_docs = validate_corpus(corpus, text_field=opts.text_field, id_field=opts.id_field)
        queries = read_queries(opts.eval_queries) if opts.eval_queries else None
        tracer = Tracer(model_dir, opts.device)
        opts, requested = clamp_to_window(opts, tracer.window)
        if opts.chunk_tokens is not None and opts.chunk_tokens > opts.max_length:
            raise OptionError("--chunk-tokens", f"must be at most the model's window of {opts.max_length} positions, "
                                                f"got {opts.chunk_tokens}")
        blocks = _layout(tracer, opts)
    with timer.phase("V"):
        stated = _stated_v(tracer, opts)  # --optimizer-state is read, mapped and shape-checked before anything is written
    if queries:
        encode_queries(tracer.tokenizer, queries, opts.max_length)  # a target too long for the window
    identity = {**opts.identity(), "model_fingerprint": tracer.fingerprint, "corpus": _corpus_identity(corpus)}
    with writer.undo_on_failure(out, opts.overwrite, lambda: writer.any_sidecar(out, writer.RAW)):
        with timer.phase("verify"):
            repair = None
            if writer.prepare_dir(out, identity, opts.overwrite) == "built":
                repair = start_repair(out, opts.quiet)
                if repair is None:
                    return out
        if requested != opts.max_length:
            say(opts.quiet, f"--max-length {requested} is longer than the model's window of {opts.max_length} "
                            f"positions; documents are truncated at {opts.max_length} tokens")
        with timer.phase("V"):
            normalizer = _normalizer(tracer, corpus, n_docs, opts, out, stated)
        capture = tracer.capture(blocks, normalizer, opts.seed, opts.autocast)
        say(opts.quiet, f"tracking {len(tracer.tracked)} matrices, {tracer.coverage['share']:.2%} of "
                        f"{tracer.coverage['n_params']:,} parameters; dim {capture.dim:,} in {len(blocks)} blocks")
        with timer.phase("corpus pass"):
            raw_done = _raw_phase(tracer, capture, corpus, n_docs, opts, out)
        base = _base_manifest(tracer, corpus, blocks, normalizer, opts, n_docs, requested)
        base["n_docs"] = _n_rows(out, n_docs, opts)
        summary = finalize(out, base, opts, queries=queries, query_capture=capture, tracer=tracer, previous=repair,
                           timer=timer)
    if repair is not None:
        say(opts.quiet, f"{out}: repaired: {describe_work(raw_done, summary)}")
    say(opts.quiet, timer.line())
    return out


def _layout(tracer: Tracer, opts: BuildOptions) -> list[Block]:
    """The projection blocks; --proj-dim must leave every block at least one 1×1 coordinate.

    Below that, each block would still get k = 1 and the index would be larger than asked.
    """
    blocks = make_layout(tracer.tracked, kind=opts.blocks, dim=opts.proj_dim)
    if opts.proj_dim < len(blocks):
        raise OptionError(
            "--proj-dim",
            f"must be at least {len(blocks)} for this model (its '{opts.blocks}' layout has {len(blocks)} "
            f"projection blocks of at least 1 coordinate each), got {opts.proj_dim}",
        )
    return blocks


def _corpus_identity(corpus: Path) -> dict:
    p = corpus.resolve()
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return {"path": str(p), "bytes": size}


# --- phase 1: V ----------------------------------------------------------------------------------


def _stated_v(tracer: Tracer, opts: BuildOptions) -> Normalizer | NoSecondMoment | None:
    """V from --optimizer-state; with --estimate-v-if-missing, the error of a state without V (then
    V is estimated and the manifest says so). None when there is no state to read."""
    if not (opts.optimizer_correction and opts.optimizer_state):
        return None
    try:
        return tracer.normalizer(opts, None)
    except NoSecondMoment as missing:
        if not opts.estimate_v_if_missing:
            raise
        return missing


def _normalizer(tracer: Tracer, corpus: Path, n_docs: int, opts: BuildOptions, out: Path,
                stated: Normalizer | NoSecondMoment | None = None) -> Normalizer:
    """V as stated, or estimated on this rank's share of a seeded document sample; written by rank 0
    and read back by every rank (a resumed build reads the V its interrupted run fixed)."""
    path, info_path = out / writer.NORMALIZER, out / writer.NORMALIZER_INFO
    if path.exists() and info_path.exists():
        return Normalizer.load(path, json.loads(info_path.read_text()))
    if isinstance(stated, Normalizer):
        normalizer = stated
    else:
        sample = _v_sample(corpus, n_docs, opts, stated) if opts.optimizer_correction else None
        update, close = bar(len(sample or []), opts.quiet, "V: mean squared gradient")
        try:
            normalizer = tracer.normalizer(opts, sample, update)
        finally:
            close()
    if isinstance(stated, NoSecondMoment):
        normalizer.details.update({"optimizer_state": stated.source, "optimizer": stated.optimizer,
                                   "mapping": stated.mapping, "v_missing": "estimated"})
    if dist.rank() == 0:
        normalizer.save(path)
        files.write_json(info_path, normalizer.to_json())
    dist.barrier()
    return Normalizer.load(path, json.loads(info_path.read_text()))


def _v_sample(corpus: Path, n_docs: int, opts: BuildOptions, stated: NoSecondMoment | None) -> list[Document]:
    """The documents V is estimated on: a seeded sample, each read by the rank that owns its shard."""
    rows = set(sample_rows(n_docs, opts.normalizer_docs, opts.seed, 1).tolist())
    docs = iter_documents(corpus, text_field=opts.text_field, id_field=opts.id_field)
    sample = [d for i, d in enumerate(docs) if i in rows and owns(i // opts.shard_docs)]
    why = f"no second moment in the {stated.optimizer} state" if isinstance(stated, NoSecondMoment) else "no optimizer state"
    say(opts.quiet, f"{why}: estimating V from the mean squared gradient of {len(rows)} documents")
    return sample


# --- phase 2: the corpus pass --------------------------------------------------------------------
#
# Shard s holds the rows of documents [s·S, (s+1)·S). Without chunking a row is a document, so
# shard s starts at row s·S; with --chunk-tokens a row is a window, and shard s starts after the
# windows of every document before it: its sidecar records the start, and the doc table each
# window's (chunk, start, end). A row whose gradient is NaN or inf is stored as zeros and flagged.


def _raw_phase(tracer: Tracer, capture: FactoredCapture, corpus: Path, n_docs: int, opts: BuildOptions, out: Path) -> list[int]:
    """Write every missing or damaged raw shard of this rank; returns the shard numbers written."""
    n_shards = -(-n_docs // opts.shard_docs)
    mine = [s for s in range(n_shards) if owns(s)]
    todo = [s for s in mine if writer.done(out, writer.RAW, s) is None]
    if not todo:
        if mine:
            say(opts.quiet, f"resuming: all {len(mine)} shards already complete")
        dist.barrier()
        return []
    if len(todo) < len(mine):
        say(opts.quiet, f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already complete")
    update, close = bar(sum(rows_of(s, n_docs, opts.shard_docs) for s in todo), opts.quiet, "indexing")
    todo_set = set(todo)
    start = 0  # the first row of the next shard
    # One writer thread: shard s is written (npy, then its sidecar) while shard s + 1 is computed.
    with ThreadPoolExecutor(max_workers=1) as background:
        pending = None
        try:
            for shard_no, docs in _shards(corpus, opts):
                if shard_no not in todo_set and opts.chunk_tokens is None:
                    continue
                examples, owners = _shard_examples(tracer.tokenizer, docs, shard_no, start, opts)
                start += len(examples)
                if shard_no not in todo_set:  # chunked: tokenized only to know where the next shard starts
                    continue
                writer.clear_partial(out, writer.RAW, shard_no)
                raw = tracer.raw_vectors(capture, examples, opts, _tokens_only(update, opts))
                if update is not None and opts.chunk_tokens is not None:
                    update(len(docs))  # the bar counts documents, not windows
                bad = _zero_nonfinite(raw)
                info = {"start": examples[0].row if examples else start, "rows": len(examples),
                        "docs": [_doc_entry(docs[o].id, e, bool(b)) for o, e, b in zip(owners, examples, bad)]}
                if pending is not None:
                    pending.result()  # at most one shard in flight: memory stays one shard deep
                pending = background.submit(writer.write_done_shard, out, writer.RAW, shard_no,
                                            writer.encode_raw(raw, opts.raw_dtype), info)
            if pending is not None:
                pending.result()
        finally:
            close()
    dist.barrier()
    return todo


def _tokens_only(update, opts: BuildOptions):
    """The bar's callback as `raw_vectors` calls it per batch: with chunking, tokens only (a batch
    holds windows, and the bar counts documents)."""
    if update is None or opts.chunk_tokens is None:
        return update
    return lambda n_items, n_tokens=0: update(0, n_tokens)


def _shard_examples(tokenizer, docs: list[Document], shard_no: int, start: int,
                    opts: BuildOptions) -> tuple[list[Example], list[int]]:
    """(one example per row of the shard, the index in `docs` of each row's document).

    Rows are numbered from `start` (chunked) or from shard_no · shard_docs (one row per document).
    """
    if opts.chunk_tokens is None:
        first = shard_no * opts.shard_docs
        examples = [encode_document(tokenizer, d.text, first + i, opts.max_length) for i, d in enumerate(docs)]
        return examples, list(range(len(docs)))
    examples: list[Example] = []
    owners: list[int] = []
    for i, d in enumerate(docs):
        windows = encode_chunks(tokenizer, d.text, start + len(examples), opts.chunk_tokens, opts.chunk_stride)
        examples += windows
        owners += [i] * len(windows)
    return examples, owners


def _zero_nonfinite(raw: np.ndarray) -> np.ndarray:
    """[N] bool: the rows of `raw` [N, D] holding a NaN or inf, which are set to zeros in place.

    Why zeros: a zero raw vector adds nothing to any sum, its final vector R^{-1/2}·0 is zero, and
    a zero vector scores exactly 0 against every query, so it can never rank as a proponent or an
    opponent ahead of a document with a real score of either sign. The doc table flags the row
    and R's statistics leave it out (`finalize`), so the index stays finite and says what it lost.
    """
    bad = ~np.isfinite(raw).all(axis=1)
    raw[bad] = 0.0
    return bad


def _doc_entry(doc_id: str, example: Example, nonfinite: bool) -> list:
    """The raw sidecar's row for one example: a window's span and the nonfinite flag when they apply."""
    extra = {} if example.chunk is None else {"chunk": example.chunk, "start": example.start, "end": example.end}
    if nonfinite:
        extra["nonfinite"] = True
    return writer.doc_entry(doc_id, len(example.ids), example.truncated, extra)


def _n_rows(out: Path, n_docs: int, opts: BuildOptions) -> int:
    """Rows in the index: the documents, or with --chunk-tokens the windows the raw sidecars record."""
    if opts.chunk_tokens is None:
        return n_docs
    return sum(writer.read_sidecar(out, writer.RAW, s)["rows"] for s in range(-(-n_docs // opts.shard_docs)))


def _shards(corpus: Path, opts: BuildOptions) -> Iterator[tuple[int, list[Document]]]:
    shard: list[Document] = []
    shard_no = 0
    for doc in iter_documents(corpus, text_field=opts.text_field, id_field=opts.id_field):
        shard.append(doc)
        if len(shard) == opts.shard_docs:
            yield shard_no, shard
            shard, shard_no = [], shard_no + 1
    if shard:
        yield shard_no, shard


def _base_manifest(tracer: Tracer, corpus: Path, blocks: list[Block], normalizer: Normalizer, opts: BuildOptions, n_docs: int,
                   max_length_requested: int) -> dict:
    """What the manifest says about the model, corpus, projection and V (R and the shards follow)."""
    return {
        "format_version": writer.FORMAT_VERSION,
        "tracestar_version": __version__,
        "model": {
            "path": str(tracer.model_dir),
            "fingerprint": tracer.fingerprint,
            "tokenizer_hash": tracer.tokenizer_hash,
            "n_params": tracer.coverage["n_params"],
            "coverage": tracer.coverage["share"],
            "left_out": tracer.coverage["left_out"],
            "tracked": [t.name for t in tracer.tracked],
        },
        "corpus": {
            "path": str(corpus.resolve()),
            "format": corpus_format(corpus),
            "text_field": opts.text_field,
            "id_field": opts.id_field,
        },
        "projection": {
            "kind": "two-sided gaussian N(0, 1/k)",
            "seed": opts.seed,
            "blocks_kind": opts.blocks,
            "requested_dim": opts.proj_dim,
            "blocks": [b.to_json() for b in blocks],
        },
        "dim": layout_dim(blocks),
        "normalizer": normalizer.to_json(),
        "optimizer_correction": opts.optimizer_correction,
        "autocast": opts.autocast,
        "max_length": opts.max_length,  # effective: at most the model's window
        "max_length_requested": max_length_requested,
        "model_window": tracer.window,
        "shard_docs": opts.shard_docs,
        "n_docs": n_docs,  # rows: the build sets the number of windows with --chunk-tokens
        # with --chunk-tokens only, so an index without chunking keeps its bytes
        **({"chunking": {"tokens": opts.chunk_tokens, "stride": opts.chunk_stride, "n_documents": n_docs}}
           if opts.chunk_tokens is not None else {}),
    }
