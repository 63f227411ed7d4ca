"""The build's phases: corpus → V → raw vectors → R → final vectors (rank-aware, resumable).

1. V: from the optimizer state, or estimated on a sample (all-reduced), or none.
2. corpus pass: g = P(∇L/√V) per document, float32, one raw shard per `shard_docs` documents.
   Shard s holds rows [s·S, (s+1)·S) and belongs to rank s mod W, so any world size writes the
   same files.
3. R: Σ g gᵀ over a seeded sample of raw rows (and over the eval queries' vectors), all-reduced,
   mixed, inverted (`preconditioner.py`); rank 0 writes it, every rank reads it back.
4. final vectors: unit(R^{-1/2} g) in the stored dtype; then rank 0 writes the doc table and,
   last, the manifest.

What each file is called, how a finished shard is recognised (so a killed build resumes to the
same bytes) and how a rerun verifies and repairs an index live in `index/writer.py`; the model
session lives in `tracer.py`. `refit.py` reruns phases 3–4 on another index's raw shards.

Wall time per phase (`progress.PhaseTimer`) is printed at the end and recorded in the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from tracestar import __version__, dist, files
from tracestar.batching import encode_document
from tracestar.capture import FactoredCapture
from tracestar.corpus import (
    Document,
    Query,
    corpus_format,
    iter_documents,
    read_queries,
    validate_corpus,
)
from tracestar.errors import OptionError
from tracestar.index import writer
from tracestar.index.store import encode_dtype
from tracestar.normalizer import Normalizer, NoSecondMoment
from tracestar.options import VARIANTS, BuildOptions
from tracestar.preconditioner import Preconditioner, RStats, fit, r_ranges
from tracestar.progress import PhaseTimer, bar, loop_bars, say
from tracestar.projection import Block, layout_dim, make_layout
from tracestar.tracer import Tracer, clamp_to_window, encode_queries, finalize_vectors


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
                repair = writer.start_repair(out, opts.quiet)
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
    rows = set(_sample_rows(n_docs, opts.normalizer_docs, opts.seed, 1).tolist())
    docs = iter_documents(corpus, text_field=opts.text_field, id_field=opts.id_field)
    sample = [d for i, d in enumerate(docs) if i in rows and _mine(i // opts.shard_docs)]
    why = f"no second moment in the {stated.optimizer} state" if isinstance(stated, NoSecondMoment) else "no optimizer state"
    say(opts.quiet, f"{why}: estimating V from the mean squared gradient of {len(rows)} documents")
    return sample


# --- phase 2: the corpus pass --------------------------------------------------------------------


def _raw_phase(tracer: Tracer, capture: FactoredCapture, corpus: Path, n_docs: int, opts: BuildOptions, out: Path) -> list[int]:
    """Write every missing or damaged raw shard of this rank; returns the shard numbers written."""
    n_shards = -(-n_docs // opts.shard_docs)
    mine = [s for s in range(n_shards) if _mine(s)]
    todo = [s for s in mine if writer.done(out, writer.RAW, s) is None]
    if not todo:
        if mine:
            say(opts.quiet, f"resuming: all {len(mine)} shards already complete")
        dist.barrier()
        return []
    if len(todo) < len(mine):
        say(opts.quiet, f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already complete")
    update, close = bar(sum(_rows_of(s, n_docs, opts.shard_docs) for s in todo), opts.quiet, "indexing")
    todo_set = set(todo)
    # One writer thread: shard s is written (npy, then its sidecar) while shard s + 1 is computed.
    with ThreadPoolExecutor(max_workers=1) as background:
        pending = None
        try:
            for shard_no, docs in _shards(corpus, opts):
                if shard_no not in todo_set:
                    continue
                start = shard_no * opts.shard_docs
                writer.clear_partial(out, writer.RAW, shard_no)
                examples = [encode_document(tracer.tokenizer, d.text, start + i, opts.max_length) for i, d in enumerate(docs)]
                raw = tracer.raw_vectors(capture, examples, opts, update)
                info = {"start": start, "rows": len(docs), "docs": [[d.id, len(e.ids), e.truncated] for d, e in zip(docs, examples)]}
                if pending is not None:
                    pending.result()  # at most one shard in flight: memory stays one shard deep
                pending = background.submit(writer.write_done_shard, out, writer.RAW, shard_no, raw, info)
            if pending is not None:
                pending.result()
        finally:
            close()
    dist.barrier()
    return todo


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
        "n_docs": n_docs,
    }


# --- phases 3-4, shared by build and refit -------------------------------------------------------


def finalize(out: Path, base: dict, opts: BuildOptions, *, queries: list[Query] | None, query_capture, tracer,
             previous: dict | None = None, timer: PhaseTimer | None = None) -> dict:
    """Fit R on `out`'s raw shards (and the eval queries), write final vectors and the manifest.

    `previous`: the manifest being repaired (its creation time, still-valid compressed forms and
    timings carry over). `timer`: the build's phase timer (a new one if None). Returns what was
    done: {"r_refit": bool, "vectors": [shard numbers written]}.
    """
    timer = timer or PhaseTimer()
    n_docs = base["n_docs"]
    n_shards = -(-n_docs // opts.shard_docs)
    precond, r_refit = _fit_preconditioner(out, base, n_shards, opts, queries, query_capture, tracer, timer)
    written = _final_vectors(out, precond, n_docs, n_shards, opts, timer)
    dist.barrier()
    if dist.rank() == 0:
        fields = {"variant": opts.variant or _variant_name(opts), "unit_norm": opts.unit_norm, "dtype": opts.dtype,
                  "preconditioner": precond.to_json()}
        n_tokens, n_truncated = writer.finish(out, base, fields, n_shards, previous=previous, timer=timer, quiet=opts.quiet)
        say(opts.quiet, f"{out}: {n_docs:,} documents, {n_tokens:,} tokens ({n_truncated} truncated at {opts.max_length}), "
                        f"dim {base['dim']:,}, {opts.dtype}")
    dist.barrier()
    return {"r_refit": r_refit, "vectors": written}


def _final_vectors(out: Path, precond: Preconditioner, n_docs: int, n_shards: int, opts: BuildOptions,
                   timer: PhaseTimer) -> list[int]:
    """Write unit(R^{-1/2} g) for this rank's shards not yet done with this R; returns their numbers."""
    precond_sha = files.sha256_file(out / writer.PRECONDITIONER)
    todo = [s for s in range(n_shards) if _mine(s) and not writer.done(out, writer.VECTORS, s, {"preconditioner": precond_sha})]
    update, close = bar(sum(_rows_of(s, n_docs, opts.shard_docs) for s in todo), opts.quiet, "final vectors")
    try:
        with timer.phase("final vectors"):
            for shard_no in todo:
                writer.clear_partial(out, writer.VECTORS, shard_no)
                raw = torch.from_numpy(np.load(writer.shard_path(out, writer.RAW, shard_no)))
                final = finalize_vectors(raw, precond, opts.unit_norm).numpy()
                with timer.phase("writes"):
                    writer.write_done_shard(out, writer.VECTORS, shard_no, encode_dtype(final, opts.dtype),
                                            {"preconditioner": precond_sha})
                if update is not None:
                    update(raw.shape[0])
    finally:
        close()
    return todo


def _fit_preconditioner(out: Path, base: dict, n_shards: int, opts: BuildOptions, queries: list[Query] | None,
                        query_capture, tracer, timer: PhaseTimer) -> tuple[Preconditioner, bool]:
    """(R^{-1/2}, whether it was fitted now): reused when its inputs are unchanged, else fitted."""
    path, info_path = out / writer.PRECONDITIONER, out / writer.PRECONDITIONER_INFO
    kind, n_docs = opts.preconditioner, base["n_docs"]
    ranges = r_ranges([Block.from_json(b) for b in base["projection"]["blocks"]], opts.r_block)
    fit_docs = min(n_docs, opts.fit_docs or 10_000)
    sample = _sample_rows(n_docs, fit_docs, opts.seed, 2) if kind != "none" else np.zeros(0, dtype=np.int64)
    inputs = _r_inputs(out, opts, sample, n_shards)
    reused = dist.broadcast_object(_reusable_preconditioner(out, inputs) is not None if dist.rank() == 0 else None)
    if reused:
        return Preconditioner.load(path, json.loads(info_path.read_text())), False
    stats: dict[str, RStats] = {}
    with timer.phase("R statistics"):
        if kind != "none":
            stats["train"] = _train_stats(out, ranges, sample, n_shards, opts)
        if kind == "mixed":
            stats["eval"] = _eval_stats(ranges, queries, query_capture, tracer, opts)
    if dist.rank() == 0:
        with timer.phase("eigendecomposition"):
            precond = fit(kind, stats.get("train"), stats.get("eval"), lam=opts.lam, damping=opts.damping,
                          dim=base["dim"], progress=loop_bars(opts.quiet))
        stats.clear()  # the sums are not stored (refit recomputes them from the raw shards)
        if kind == "mixed":
            precond.info["eval_queries"] = str(Path(opts.eval_queries).resolve())
        precond.info["fit_docs"] = int(precond.info.get("train_count", 0))
        precond.info["r_block"] = opts.r_block
        precond.info["inputs_sha256"] = inputs
        with timer.phase("writes"):
            # The old description goes first: a description on disk always belongs to the matrices beside it.
            info_path.unlink(missing_ok=True)
            precond.save(path)
            files.write_json(info_path, precond.to_json())
        if kind == "mixed":
            say(opts.quiet, f"mixed preconditioner: λ = {precond.lam:.4f} ({precond.info.get('lambda_source')})")
    dist.barrier()
    return Preconditioner.load(path, json.loads(info_path.read_text())), True


def _r_inputs(out: Path, opts: BuildOptions, sample: np.ndarray, n_shards: int) -> str:
    """sha256 of everything R depends on: its options, the bytes of the raw shards its sample
    reads (from their verified sidecars), and the eval queries' file. Equal ⇒ R can be reused."""
    touched = sorted({int(r) // opts.shard_docs for r in sample.tolist()}) if opts.preconditioner != "none" else []
    spec = {
        "kind": opts.preconditioner,
        "lambda": opts.lam,
        "damping": opts.damping,
        "r_block": opts.r_block,
        "sample": [len(sample), opts.seed],
        "raw": {s: writer.read_sidecar(out, writer.RAW, s)["sha256"] for s in touched if s < n_shards},
        "eval_queries": files.sha256_file(opts.eval_queries) if opts.preconditioner == "mixed" else None,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _reusable_preconditioner(out: Path, inputs: str) -> Preconditioner | None:
    """The R^{-1/2} already in `out` when it was fitted on exactly these inputs (resume, repair)."""
    path, info_path = out / writer.PRECONDITIONER, out / writer.PRECONDITIONER_INFO
    if not (path.exists() and info_path.exists()):
        return None
    try:
        info = json.loads(info_path.read_text())
        if info.get("inputs_sha256") != inputs:
            return None
        return Preconditioner.load(path, info)
    except Exception:  # noqa: BLE001 - an unreadable leftover is simply refitted
        return None


def _train_stats(out: Path, ranges, sample: np.ndarray, n_shards: int, opts: BuildOptions) -> RStats:
    """Σ g gᵀ over the sampled raw rows of this rank's shards, all-reduced."""
    train = RStats(ranges)
    mine = [s for s in range(n_shards) if _mine(s)]
    bounds = {s: (s * opts.shard_docs, (s + 1) * opts.shard_docs) for s in mine}
    n_mine = sum(int(((sample >= lo) & (sample < hi)).sum()) for lo, hi in bounds.values())
    update, close = bar(n_mine, opts.quiet, "R_train: statistics")
    try:
        for shard_no in mine:
            lo, hi = bounds[shard_no]
            local = sample[(sample >= lo) & (sample < hi)] - lo
            if not len(local):
                continue
            raw = np.load(writer.shard_path(out, writer.RAW, shard_no), mmap_mode="r")
            train.update(torch.from_numpy(np.asarray(raw[local])))
            if update is not None:
                update(len(local))
    finally:
        close()
    train.all_reduce(dist.all_reduce_)
    return train


def _eval_stats(ranges, queries: list[Query], query_capture, tracer: Tracer, opts: BuildOptions) -> RStats:
    """Σ g gᵀ over the eval queries' raw vectors (each rank embeds every W-th query), all-reduced."""
    mine = [q for i, q in enumerate(queries) if i % dist.world() == dist.rank()]
    evals = RStats(ranges)
    if mine:
        update, close = bar(len(mine), opts.quiet, "R_eval: eval-query gradients", unit="query")
        try:
            evals.update(torch.from_numpy(tracer.query_vectors(query_capture, mine, opts, update)))
        finally:
            close()
    evals.all_reduce(dist.all_reduce_)
    return evals


# --- small helpers -------------------------------------------------------------------------------


def _mine(shard_no: int) -> bool:
    return shard_no % dist.world() == dist.rank()


def _rows_of(shard_no: int, n_docs: int, shard_docs: int) -> int:
    return min(shard_docs, n_docs - shard_no * shard_docs)


def _sample_rows(n: int, size: int, seed: int, salt: int) -> np.ndarray:
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, salt]).choice(n, size=size, replace=False))


def _variant_name(opts: BuildOptions) -> str:
    for name, spec in VARIANTS.items():
        if all(getattr(opts, k) == v for k, v in spec.items()):
            return name
    return "custom"


def describe_work(raw_done: list[int], summary: dict) -> str:
    """"recomputed raw shards 1, 3, final vectors of shards 1, 2, 3 and the manifest; R reused"."""
    def shards(nos: list[int]) -> str:
        return f"shard{'s' if len(nos) > 1 else ''} {', '.join(map(str, nos))}"

    parts = [f"raw {shards(raw_done)}"] if raw_done else []
    if summary["r_refit"]:
        parts.append("R")
    if summary["vectors"]:
        parts.append(f"final vectors of {shards(summary['vectors'])}")
    parts.append("the manifest")
    done = ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else parts[0]
    kept = "" if summary["r_refit"] else "; R reused (the shards its sample reads are unchanged)"
    return f"recomputed {done}{kept}"
