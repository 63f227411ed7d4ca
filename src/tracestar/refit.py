"""A new index with another preconditioner, from an existing index's raw shards.

A new R costs a pass over stored vectors, not over the model: the raw shards, their sidecars,
the doc table and V are linked from the source index, and the build's phases 3–4 (R, final
vectors, manifest; `finalize.py`) run on them. The model runs only on the eval queries of a
mixed R. A rerun on a finished refit verifies and repairs it, as a rerun of a build does.
"""

from __future__ import annotations

import json
from pathlib import Path

from tracestar import dist
from tracestar.corpus import read_queries
from tracestar.errors import IndexStoreError, UserError
from tracestar.finalize import describe_work, finalize
from tracestar.index import repair, writer
from tracestar.index.store import IndexStore
from tracestar.normalizer import Normalizer
from tracestar.options import BuildOptions
from tracestar.progress import PhaseTimer, say
from tracestar.projection import Block
from tracestar.tracer import Tracer, encode_queries

#: What a refit keeps of the source manifest: everything fixed before R.
_BASE_KEYS = ("format_version", "tracestar_version", "model", "corpus", "projection", "dim", "normalizer",
              "optimizer_correction", "autocast", "max_length", "max_length_requested", "model_window", "shard_docs",
              "n_docs", "chunking")


def refit(
    index_dir: str | Path,
    out: str | Path,
    *,
    eval_queries: str | Path | None = None,
    preconditioner: str | None = None,
    lam: float | None = None,
    fit_docs: int | None = None,
    damping: float | None = None,
    r_factor: str | None = None,
    model_dir: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """A new index in `out` with another preconditioner, from `index_dir`'s raw shards. Returns `out`.

    Raw shards, sidecars, the doc table and V are hard-linked (copied where links are impossible).
    Each preconditioner argument left None keeps the source index's value (`r_factor`: `BuildOptions`).
    """
    src, out = Path(index_dir), Path(out)
    timer = PhaseTimer()
    manifest = IndexStore(src).manifest  # V, the doc table and the sidecars verified: they are linked as they are
    if manifest.get("raw_dtype") == "none":
        raise IndexStoreError(f"{src}: built with --raw-dtype none, so it kept no raw vectors to refit; rebuild it "
                              f"with --raw-dtype float32 or bfloat16")
    build_file = src / writer.BUILD_FILE
    if not build_file.is_file():
        raise IndexStoreError(f"{src}: no {writer.BUILD_FILE} (the arguments it was built with), so it cannot be refitted")
    prev = json.loads(build_file.read_text())
    base_opts = BuildOptions.from_json(prev)
    opts = BuildOptions.from_json(
        prev, quiet=quiet, overwrite=overwrite, variant=None,
        eval_queries=str(eval_queries) if eval_queries else None, preconditioner=preconditioner, lam=lam,
        fit_docs=fit_docs if fit_docs is not None else base_opts.fit_docs,
        damping=damping if damping is not None else base_opts.damping,
        r_factor=r_factor if r_factor is not None else base_opts.r_factor,
    ).resolved()
    queries = read_queries(opts.eval_queries) if opts.eval_queries else None
    tracer = capture = None
    if opts.preconditioner == "mixed":
        with timer.phase("load"):
            tracer, capture = _query_session(src, manifest, opts, queries, model_dir)
    identity = {**opts.identity(), "model_fingerprint": manifest["model"]["fingerprint"], "corpus": prev["corpus"]}
    with writer.undo_on_failure(out, overwrite, lambda: writer.any_sidecar(out, writer.VECTORS)):
        previous = None
        with timer.phase("verify"):
            if writer.prepare_dir(out, identity, overwrite) == "built":
                previous = repair.start_repair(out, opts.quiet)
                if previous is None:
                    return out
            if dist.rank() == 0:
                writer.link_inputs(src, out)
                writer.verify_source_raw(src, out, manifest, opts.quiet)
            dist.barrier()
        base = {k: manifest[k] for k in _BASE_KEYS if k in manifest}
        base["refit_from"] = str(src.resolve())
        summary = finalize(out, base, opts, queries=queries, query_capture=capture, tracer=tracer, previous=previous,
                           timer=timer)
    if previous is not None:
        say(opts.quiet, f"{out}: repaired: {describe_work([], summary)}")
    say(opts.quiet, timer.line())
    return out


def _query_session(src: Path, manifest: dict, opts: BuildOptions, queries, model_dir: str | Path | None):
    """(tracer, capture) that embed the eval queries exactly as the source index's build did."""
    tracer = Tracer(model_dir or manifest["model"]["path"], opts.device)
    if tracer.fingerprint != manifest["model"]["fingerprint"]:
        raise UserError(f"{model_dir}: model fingerprint differs from the index's ({src}); refusing to mix them")
    encode_queries(tracer.tokenizer, queries, opts.max_length)  # a target too long for the window
    normalizer = Normalizer.load(src / writer.NORMALIZER, manifest["normalizer"])
    blocks = [Block.from_json(b) for b in manifest["projection"]["blocks"]]
    capture = tracer.capture(blocks, normalizer, manifest["projection"]["seed"], manifest.get("autocast"))
    return tracer, capture
