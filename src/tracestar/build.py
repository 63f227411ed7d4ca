"""Corpus → batches → raw vectors → shards → R → final vectors → manifest (rank-aware, resumable).

Phases, each restartable:
1. V: from the optimizer state, or estimated on a sample (all-reduced), or none.
2. raw shards: g = P(∇L/√V) per document, float32, `raw/shard-NNNNN.npy`. Shard s holds rows
   [s·S, (s+1)·S) and belongs to rank s mod W, so any world size writes the same files.
3. R: Σ g gᵀ over a seeded sample of raw rows (and over the eval queries' vectors), all-reduced,
   mixed, inverted (`preconditioner.py`); rank 0 writes it, every rank reads it back.
4. final shards: unit(R^{-1/2} g) in the stored dtype, `vectors/shard-NNNNN.npy`.
5. rank 0 writes docs.jsonl and, last, manifest.json.

Every shard gets a small sidecar JSON (`shard-NNNNN.json`) written after the `.npy`, holding its
sha256: a rerun skips shards whose bytes still match, so a killed build resumes to the same bytes.
`refit` reuses phases 3–5 on another index's raw shards: a new R costs a pass over vectors, not
over the model.

Wall time per phase (load, V, corpus pass, R statistics, eigendecomposition, final vectors, writes;
`PhaseTimer`) is printed at the end and recorded in the manifest as `timings`. A repair keeps the
original build's `timings`, as it keeps `created`: the manifest describes the index, not the rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from tracestar import __version__, dist
from tracestar.batching import (
    TargetTooLong,
    bucketed,
    collate,
    encode_document,
    encode_query,
    forward_loss,
    pad_id,
)
from tracestar.capture import FactoredCapture
from tracestar.corpus import (
    Document,
    Query,
    corpus_format,
    iter_documents,
    read_queries,
    validate_corpus,
)
from tracestar.errors import (
    IndexStoreError,
    OptionError,
    UserError,
)
from tracestar.index import store
from tracestar.model import (
    coverage,
    load_model,
    model_fingerprint,
    model_window,
    tokenizer_hash,
    tracked_matrices,
)
from tracestar.normalizer import (
    Normalizer,
    NoSecondMoment,
    estimate,
    from_optimizer_state,
    identity,
)
from tracestar.options import VARIANTS, BuildOptions  # noqa: F401 (re-exported)
from tracestar.preconditioner import (
    Preconditioner,
    RStats,
    fit,
    r_ranges,
)
from tracestar.projection import Block, layout_dim, make_layout

BUILD_FILE = "build.json"


class Tracer:
    """A loaded model with its tracked matrices: everything that turns text into raw vectors."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        self.model_dir = Path(model_dir).resolve()
        self.device = device
        self.model, self.tokenizer = load_model(self.model_dir, device=device)
        self.tracked = tracked_matrices(self.model)
        self.coverage = coverage(self.model, self.tracked)
        self.fingerprint = model_fingerprint(self.model)
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)
        self.pad = pad_id(self.tokenizer)

    def normalizer(self, opts: BuildOptions, sample: list[Document] | None, progress=None) -> Normalizer:
        """V: from the optimizer state, or estimated on `sample` (`progress(docs, tokens)` after each)."""
        if not opts.optimizer_correction:
            return identity(self.tracked)
        if opts.optimizer_state and sample is None:  # a sample means V is estimated even with a state
            return from_optimizer_state(opts.optimizer_state, self.model, self.tracked)

        def batches():
            for i, d in enumerate(sample or []):
                batch = collate([encode_document(self.tokenizer, d.text, i, opts.max_length)], self.pad)
                yield batch.to(self.device)
                if progress is not None:  # resumed once `estimate` has run the batch
                    progress(1, batch.n_tokens)

        return estimate(self.model, self.tracked, batches(), forward_loss, reduce=dist.all_reduce_)

    def capture(self, blocks: list[Block], normalizer: Normalizer, seed: int, autocast: str | None = None) -> FactoredCapture:
        dtype = {None: None, "bfloat16": torch.bfloat16}[autocast]
        return FactoredCapture(self.model, self.tracked, blocks, normalizer, seed, device=self.device, autocast=dtype)

    def raw_vectors(self, capture: FactoredCapture, examples: list, opts: BuildOptions, progress=None) -> np.ndarray:
        """[N, D] float32 in the order of `examples` (batched by length internally)."""
        out = np.zeros((len(examples), capture.dim), dtype=np.float32)
        position = {e.row: i for i, e in enumerate(examples)}
        for group in bucketed(examples, opts.batch_tokens):
            batch = collate(group, self.pad, padding_side=opts.padding_side)
            vecs = capture.vectors(batch).detach().to("cpu", torch.float32).numpy()  # [B, D]
            out[[position[r] for r in batch.rows]] = vecs
            if progress is not None:
                progress(len(group), batch.n_tokens)
        return out

    def query_vectors(self, capture: FactoredCapture, queries: list[Query], opts: BuildOptions, progress=None) -> np.ndarray:
        return self.raw_vectors(capture, encode_queries(self.tokenizer, queries, opts.max_length), opts, progress)

    @property
    def window(self) -> int | None:
        """The model's context length (None when its config does not say)."""
        return model_window(self.model)


def encode_queries(tokenizer, queries: list[Query], max_length: int) -> list:
    """Queries as `Example`s; a target that cannot fit is refused naming the query's file and line."""
    examples = []
    for i, q in enumerate(queries):
        try:
            examples.append(encode_query(tokenizer, q.prompt, q.target, i, max_length))
        except TargetTooLong as exc:
            raise UserError(f"{q.describe()}: field 'target': {exc.problem}") from None
    return examples


def clamp_to_window(opts: BuildOptions, window: int | None) -> tuple[BuildOptions, int]:
    """(options with `max_length` ≤ the model's window, the requested max_length).

    Positions past the window would index outside the model's position embedding, so the
    effective length is the smaller of the two; the manifest records both.
    """
    requested = opts.max_length
    if window is None or requested <= window:
        return opts, requested
    return dataclasses.replace(opts, max_length=window), requested


# --- helpers -----------------------------------------------------------------------------------


def finalize_vectors(raw: torch.Tensor, precond: Preconditioner, unit_norm: bool) -> torch.Tensor:
    """Ḡ = unit(R^{-1/2} g): the vectors that are stored and searched. [N, D] → [N, D]."""
    v = precond.apply(raw.float())
    if unit_norm:
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return v


def _sidecar(index_dir: Path, kind: str, shard_no: int) -> Path:
    return index_dir / kind / f"{store.shard_name(shard_no)}.json"


def _done(index_dir: Path, kind: str, shard_no: int, expect: dict | None = None) -> dict | None:
    """The sidecar of a finished shard whose bytes still match it, else None."""
    side = _sidecar(index_dir, kind, shard_no)
    npy = store.shard_path(index_dir, kind, shard_no)
    if not (side.exists() and npy.exists()):
        return None
    info = json.loads(side.read_text())
    if any(info.get(k) != v for k, v in (expect or {}).items()):
        return None
    return info if store.sha256_file(npy) == info["sha256"] else None


def _clear_partial(index_dir: Path, kind: str, shard_no: int) -> None:
    """Remove what an interrupted writer of this shard left (only its owner rank calls this)."""
    for leftover in (index_dir / kind).glob(f"{store.shard_name(shard_no)}.*.tmp-*"):
        leftover.unlink(missing_ok=True)


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


def _mine(shard_no: int) -> bool:
    return shard_no % dist.world() == dist.rank()


def _sample_rows(n: int, size: int, seed: int, salt: int) -> np.ndarray:
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, salt]).choice(n, size=size, replace=False))


def _progress(total: int, quiet: bool, desc: str, unit: str = "doc"):
    """A tqdm bar (with tokens/s when tokens are reported) on rank 0; returns (callback, close).
    Nothing to do draws no bar (a "0doc" bar reads like a stall)."""
    if quiet or dist.rank() != 0 or total <= 0:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    start, tokens = time.perf_counter(), [0]

    def update(n_items: int, n_tokens: int = 0) -> None:
        tokens[0] += n_tokens
        bar.update(n_items)
        if tokens[0]:
            bar.set_postfix_str(f"{tokens[0] / max(time.perf_counter() - start, 1e-9):,.0f} tok/s")

    return update, bar.close


def _loop_bars(opts: BuildOptions, unit: str = "block"):
    """`progress(items, desc)` for `preconditioner.fit`: one bar per loop on rank 0, none under --quiet."""
    if opts.quiet or dist.rank() != 0:
        return lambda items, desc: items
    from tqdm.auto import tqdm

    def wrap(items, desc):
        if not hasattr(items, "__len__"):
            items = list(items)
        # a lazy Sized (results computed as they are consumed) keeps its laziness: the bar moves and
        # shows an ETA as each one arrives
        return tqdm(items, total=len(items), desc=desc, unit=unit, dynamic_ncols=True) if len(items) else items

    return wrap


class PhaseTimer:
    """Wall seconds per build phase, exclusive of phases timed inside it (writes inside final vectors).

    Printed at the end of a build and recorded in the manifest (`timings`), which says where a
    build's time went: the corpus pass, or the fixed costs after it.
    """

    ORDER = ("load", "verify", "V", "corpus pass", "R statistics", "eigendecomposition", "final vectors", "writes")

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, seconds of phases nested inside]
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        self._stack.append([time.perf_counter(), 0.0])
        try:
            yield
        finally:
            start, inner = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if self._stack:
                self._stack[-1][1] += elapsed

    def snapshot(self) -> dict[str, float]:
        """{phase: seconds} in pipeline order, rounded to 0.01 s, plus the total wall time so far."""
        names = [n for n in self.ORDER if n in self.seconds] + sorted(set(self.seconds) - set(self.ORDER))
        out = {n: round(self.seconds[n], 2) for n in names}
        out["total"] = round(time.perf_counter() - self._start, 2)
        return out

    def line(self) -> str:
        snap = self.snapshot()
        total = snap.pop("total")
        return "time: " + ", ".join(f"{n} {_seconds(v)}" for n, v in snap.items()) + f"; total {_seconds(total)}"


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{int(value // 60)} min {value % 60:02.0f} s"


# --- the build ---------------------------------------------------------------------------------


def _prepare_dir(out: Path, identity: dict, overwrite: bool) -> str:
    """Create or check the output directory: "new" (empty, build.json written), "resume" (an
    unfinished build with the same identity) or "built" (a manifest is there: verify it)."""
    build_file = out / BUILD_FILE
    if out.exists() and overwrite and dist.rank() == 0:
        shutil.rmtree(out)
    dist.barrier()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not build_file.exists():
            raise UserError(f"{out}: exists and is not a tracestar build; choose another --out or pass --overwrite")
        try:
            previous = json.loads(build_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{build_file}: unreadable; the build's arguments are unknown, so pass --overwrite") from None
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise UserError(
                f"{out}: holds a build with different arguments ({', '.join(changed)}); use another --out or --overwrite"
            )
        return "built" if (out / store.MANIFEST).exists() else "resume"
    dist.barrier()
    if dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        store.write_json(build_file, identity)
    dist.barrier()
    return "new"


@contextmanager
def _undo_on_failure(out: Path, overwrite: bool, worth_keeping):
    """Remove what this invocation created in `out` when it fails before `worth_keeping()` is true.

    A build that stops on an error before finishing anything leaves nothing behind — a stray
    build.json would block the corrected rerun. Work worth resuming (a finished shard) is kept, as
    is anything that was there before: an interrupted earlier build is never deleted. Ctrl-C is
    not an error here: it keeps everything so the rerun resumes.
    """
    root = None if out.exists() else _first_missing(out)
    owned_contents = out.is_dir() and (overwrite or not any(out.iterdir()))
    try:
        yield
    except Exception:
        if dist.rank() == 0 and not worth_keeping():
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)
            elif owned_contents and out.is_dir():
                for child in out.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
        raise


def _first_missing(path: Path) -> Path:
    """The outermost ancestor of `path` (or `path` itself) that does not exist yet."""
    path = path.absolute()
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _any_sidecar(out: Path, kind: str) -> bool:
    return (out / kind).is_dir() and any((out / kind).glob("shard-*.json"))


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
    with _undo_on_failure(out, opts.overwrite, lambda: _any_sidecar(out, "raw")):
        with timer.phase("verify"):
            state = _prepare_dir(out, identity, opts.overwrite)
            repair = None
            if state == "built":
                repair = _start_repair(out, opts)
                if repair is None:
                    return out
        if requested != opts.max_length:
            _say(opts, f"--max-length {requested} is longer than the model's window of {opts.max_length} positions; "
                       f"documents are truncated at {opts.max_length} tokens")
        with timer.phase("V"):
            normalizer = _normalizer(tracer, corpus, n_docs, opts, out, stated)
        capture = tracer.capture(blocks, normalizer, opts.seed, opts.autocast)
        _say(opts, f"tracking {len(tracer.tracked)} matrices, {tracer.coverage['share']:.2%} of {tracer.coverage['n_params']:,} parameters; dim {capture.dim:,} in {len(blocks)} blocks")
        with timer.phase("corpus pass"):
            raw_done = _raw_phase(tracer, capture, corpus, n_docs, opts, out)
        base = _base_manifest(tracer, corpus, blocks, normalizer, opts, n_docs, requested)
        summary = finalize(out, base, opts, queries=queries, query_capture=capture, tracer=tracer, previous=repair,
                           timer=timer)
    if repair is not None:
        _say(opts, f"{out}: repaired: {_describe_work(raw_done, summary)}")
    _say(opts, timer.line())
    return out


def _say(opts: BuildOptions, msg: str) -> None:
    if not opts.quiet and dist.rank() == 0:
        print(msg, flush=True)


def _corpus_identity(corpus: Path) -> dict:
    p = corpus.resolve()
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return {"path": str(p), "bytes": size}


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
    path = out / "normalizer.safetensors"
    info_path = out / "normalizer.json"
    if path.exists() and info_path.exists():  # resume: V was fixed by the interrupted run
        return Normalizer.load(path, json.loads(info_path.read_text()))
    sample = None
    if opts.optimizer_correction and not isinstance(stated, Normalizer):
        rows = set(_sample_rows(n_docs, opts.normalizer_docs, opts.seed, 1).tolist())
        sample = [
            d
            for i, d in enumerate(iter_documents(corpus, text_field=opts.text_field, id_field=opts.id_field))
            if i in rows and _mine(i // opts.shard_docs)
        ]
        why = f"no second moment in the {stated.optimizer} state" if isinstance(stated, NoSecondMoment) else "no optimizer state"
        _say(opts, f"{why}: estimating V from the mean squared gradient of {len(rows)} documents")
    if isinstance(stated, Normalizer):
        normalizer = stated
    else:
        update, close = _progress(len(sample or []), opts.quiet, "V: mean squared gradient")
        try:
            normalizer = tracer.normalizer(opts, sample, update)
        finally:
            close()
    if isinstance(stated, NoSecondMoment):
        normalizer.details.update({"optimizer_state": stated.source, "optimizer": stated.optimizer,
                                   "mapping": stated.mapping, "v_missing": "estimated"})
    if dist.rank() == 0:
        normalizer.save(path)
        store.write_json(info_path, normalizer.to_json())
    dist.barrier()
    return Normalizer.load(path, json.loads(info_path.read_text()))


def _raw_phase(tracer: Tracer, capture: FactoredCapture, corpus: Path, n_docs: int, opts: BuildOptions, out: Path) -> list[int]:
    """Write every missing or damaged raw shard of this rank; returns the shard numbers written."""
    n_shards = -(-n_docs // opts.shard_docs)
    mine = [s for s in range(n_shards) if _mine(s)]
    todo = [s for s in mine if _done(out, "raw", s) is None]
    todo_docs = sum(min(opts.shard_docs, n_docs - s * opts.shard_docs) for s in todo)
    if not todo:
        if mine:
            _say(opts, f"resuming: all {len(mine)} shards already complete")
        dist.barrier()
        return []
    if len(todo) < len(mine):
        _say(opts, f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already complete")
    update, close = _progress(todo_docs, opts.quiet, "indexing")
    todo_set = set(todo)
    # One writer thread: shard s is written (npy, then its sidecar) while shard s + 1 is computed.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        try:
            for shard_no, docs in _shards(corpus, opts):
                if shard_no not in todo_set:
                    continue
                start = shard_no * opts.shard_docs
                _clear_partial(out, "raw", shard_no)
                examples = [encode_document(tracer.tokenizer, d.text, start + i, opts.max_length) for i, d in enumerate(docs)]
                raw = tracer.raw_vectors(capture, examples, opts, update)
                table = [[d.id, len(e.ids), e.truncated] for d, e in zip(docs, examples)]
                if pending is not None:
                    pending.result()  # at most one shard in flight: memory stays one shard deep
                pending = writer.submit(_write_raw_shard, out, shard_no, start, raw, table)
            if pending is not None:
                pending.result()
        finally:
            close()
    dist.barrier()
    return todo


def _write_raw_shard(out: Path, shard_no: int, start: int, raw: np.ndarray, table: list) -> None:
    """The `.npy` first, then the sidecar that marks it complete (with its checksum)."""
    sha = store.write_shard(out, "raw", shard_no, raw)
    store.write_json(_sidecar(out, "raw", shard_no), {"start": start, "rows": len(table), "sha256": sha, "docs": table})


def _base_manifest(tracer: Tracer, corpus: Path, blocks: list[Block], normalizer: Normalizer, opts: BuildOptions, n_docs: int,
                   max_length_requested: int) -> dict:
    return {
        "format_version": store.FORMAT_VERSION,
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


# --- phases 3-5, shared by build and refit ------------------------------------------------------


def finalize(out: Path, base: dict, opts: BuildOptions, *, queries: list[Query] | None, query_capture, tracer,
             previous: dict | None = None, timer: PhaseTimer | None = None) -> dict:
    """Fit R on `out`'s raw shards (and the eval queries), write final vectors and the manifest.

    `previous`: the manifest being repaired (its creation time, still-valid compressed forms and
    timings carry over). `timer`: the build's phase timer (a new one if None). Returns what was
    done: {"r_refit": bool, "vectors": [shard numbers written]}.
    """
    timer = timer or PhaseTimer()
    n_docs, dim = base["n_docs"], base["dim"]
    blocks = [Block.from_json(b) for b in base["projection"]["blocks"]]
    n_shards = -(-n_docs // opts.shard_docs)
    precond, r_refit = _fit_preconditioner(out, blocks, dim, n_docs, n_shards, opts, queries, query_capture, tracer, timer)
    precond_sha = store.sha256_file(out / "preconditioner.safetensors")
    todo = [s for s in range(n_shards) if _mine(s) and not _done(out, "vectors", s, {"preconditioner": precond_sha})]
    update, close = _progress(sum(_rows_of(s, n_docs, opts.shard_docs) for s in todo), opts.quiet, "final vectors")
    try:
        with timer.phase("final vectors"):
            for shard_no in todo:
                _clear_partial(out, "vectors", shard_no)
                raw = torch.from_numpy(np.load(store.shard_path(out, "raw", shard_no)))
                final = finalize_vectors(raw, precond, opts.unit_norm).numpy()
                with timer.phase("writes"):
                    sha = store.write_shard(out, "vectors", shard_no, store.encode_dtype(final, opts.dtype))
                    store.write_json(_sidecar(out, "vectors", shard_no), {"sha256": sha, "preconditioner": precond_sha})
                if update is not None:
                    update(raw.shape[0])
    finally:
        close()
    dist.barrier()
    if dist.rank() == 0:
        _write_manifest(out, base, opts, precond, n_shards, previous, timer)
    dist.barrier()
    return {"r_refit": r_refit, "vectors": todo}


def _rows_of(shard_no: int, n_docs: int, shard_docs: int) -> int:
    return min(shard_docs, n_docs - shard_no * shard_docs)


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
        "raw": {s: json.loads(_sidecar(out, "raw", s).read_text())["sha256"] for s in touched if s < n_shards},
        "eval_queries": store.sha256_file(opts.eval_queries) if opts.preconditioner == "mixed" else None,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _reusable_preconditioner(out: Path, inputs: str) -> Preconditioner | None:
    """The R^{-1/2} already in `out` when it was fitted on exactly these inputs (resume, repair)."""
    path, info_path = out / "preconditioner.safetensors", out / "preconditioner.json"
    if not (path.exists() and info_path.exists()):
        return None
    try:
        info = json.loads(info_path.read_text())
        if info.get("inputs_sha256") != inputs:
            return None
        return Preconditioner.load(path, info)
    except Exception:  # noqa: BLE001 - an unreadable leftover is simply refitted
        return None


def _fit_preconditioner(out, blocks, dim, n_docs, n_shards, opts, queries, query_capture, tracer,
                        timer: PhaseTimer) -> tuple[Preconditioner, bool]:
    """(R^{-1/2}, whether it was fitted now): reused when its inputs are unchanged, else fitted."""
    path = out / "preconditioner.safetensors"
    kind = opts.preconditioner
    ranges = r_ranges(blocks, opts.r_block)
    fit_docs = min(n_docs, opts.fit_docs or 10_000)
    sample = _sample_rows(n_docs, fit_docs, opts.seed, 2) if kind != "none" else np.zeros(0, dtype=np.int64)
    inputs = _r_inputs(out, opts, sample, n_shards)
    reused = dist.broadcast_object(_reusable_preconditioner(out, inputs) is not None if dist.rank() == 0 else None)
    if reused:
        return Preconditioner.load(path, json.loads((out / "preconditioner.json").read_text())), False
    stats: dict[str, RStats] = {}
    with timer.phase("R statistics"):
        if kind != "none":
            stats["train"] = _train_stats(out, ranges, sample, n_shards, opts)
        if kind == "mixed":
            mine = [q for i, q in enumerate(queries) if i % dist.world() == dist.rank()]
            evals = RStats(ranges)
            if mine:
                update, close = _progress(len(mine), opts.quiet, "R_eval: eval-query gradients", unit="query")
                try:
                    evals.update(torch.from_numpy(tracer.query_vectors(query_capture, mine, opts, update)))
                finally:
                    close()
            evals.all_reduce(dist.all_reduce_)
            stats["eval"] = evals
    if dist.rank() == 0:
        with timer.phase("eigendecomposition"):
            precond = fit(kind, stats.get("train"), stats.get("eval"), lam=opts.lam, damping=opts.damping, dim=dim,
                          progress=_loop_bars(opts))
        stats.clear()  # the sums are not stored (refit recomputes them from the raw shards)
        if kind == "mixed":
            precond.info["eval_queries"] = str(Path(opts.eval_queries).resolve())
        precond.info["fit_docs"] = int(precond.info.get("train_count", 0))
        precond.info["r_block"] = opts.r_block
        precond.info["inputs_sha256"] = inputs
        with timer.phase("writes"):
            # The old description goes first: a description on disk always belongs to the matrices beside it.
            (out / "preconditioner.json").unlink(missing_ok=True)
            precond.save(path)
            store.write_json(out / "preconditioner.json", precond.to_json())
        if kind == "mixed":
            _say(opts, f"mixed preconditioner: λ = {precond.lam:.4f} ({precond.info.get('lambda_source')})")
    dist.barrier()
    return Preconditioner.load(path, json.loads((out / "preconditioner.json").read_text())), True


def _train_stats(out: Path, ranges, sample: np.ndarray, n_shards: int, opts: BuildOptions) -> RStats:
    """Σ g gᵀ over the sampled raw rows of this rank's shards, all-reduced."""
    train = RStats(ranges)
    mine = [s for s in range(n_shards) if _mine(s)]
    bounds = {s: (s * opts.shard_docs, (s + 1) * opts.shard_docs) for s in mine}
    n_mine = sum(int(((sample >= lo) & (sample < hi)).sum()) for lo, hi in bounds.values())
    update, close = _progress(n_mine, opts.quiet, "R_train: statistics")
    try:
        for shard_no in mine:
            lo, hi = bounds[shard_no]
            local = sample[(sample >= lo) & (sample < hi)] - lo
            if not len(local):
                continue
            raw = np.load(store.shard_path(out, "raw", shard_no), mmap_mode="r")
            train.update(torch.from_numpy(np.asarray(raw[local])))
            if update is not None:
                update(len(local))
    finally:
        close()
    train.all_reduce(dist.all_reduce_)
    return train


def _checksummed_files(out: Path, n_shards: int) -> list[str]:
    """Files besides the shards whose sha256 the manifest records (a rerun verifies them)."""
    names = ["normalizer.safetensors", "normalizer.json", "preconditioner.safetensors", "preconditioner.json", store.DOCS]
    for kind in store.KINDS:
        names += [f"{kind}/{store.shard_name(s)}.json" for s in range(n_shards)]
    return [n for n in names if (out / n).exists()]


def _write_manifest(out: Path, base: dict, opts: BuildOptions, precond: Preconditioner, n_shards: int,
                    previous: dict | None = None, timer: PhaseTimer | None = None) -> None:
    from tracestar.corpus import write_jsonl

    timer = timer or PhaseTimer()

    shards: list[dict] = []
    counts = {"tokens": 0, "truncated": 0}

    def doc_rows():
        """Stream the doc table from the shards' sidecars (memory independent of corpus size)."""
        row = 0
        for shard_no in range(n_shards):
            raw_info = json.loads(_sidecar(out, "raw", shard_no).read_text())
            vec_info = json.loads(_sidecar(out, "vectors", shard_no).read_text())
            shards.append({"name": store.shard_name(shard_no), "start": raw_info["start"], "rows": raw_info["rows"],
                           "raw_sha256": raw_info["sha256"], "vectors_sha256": vec_info["sha256"]})
            for doc_id, toks, trunc in raw_info["docs"]:
                yield {"row": row, "doc_id": doc_id, "n_tokens": toks, "truncated": trunc}
                row += 1
                counts["tokens"] += toks
                counts["truncated"] += int(trunc)

    with timer.phase("writes"):
        write_jsonl(out / store.DOCS, doc_rows())
        checksums = {name: store.sha256_file(out / name) for name in _checksummed_files(out, n_shards)}
    n_tokens, n_truncated = counts["tokens"], counts["truncated"]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = {
        **base,
        "created": (previous or {}).get("created", now),
        "variant": opts.variant or _variant_name(opts),
        "unit_norm": opts.unit_norm,
        "dtype": opts.dtype,
        "preconditioner": precond.to_json(),
        "n_tokens": n_tokens,
        "n_truncated": n_truncated,
        "world_size": dist.world(),
        "shards": shards,
        "files": {"normalizer": "normalizer.safetensors", "preconditioner": "preconditioner.safetensors", "docs": store.DOCS},
        "checksums": checksums,
    }
    # Wall seconds per phase of the build that wrote this index (not part of any checksum). A
    # repair keeps the original's, so that the repaired manifest differs only by `repaired`.
    timings = timer.snapshot() if previous is None else previous.get("timings")
    if timings is not None:
        manifest["timings"] = timings
    if previous is not None:
        manifest["repaired"] = now
        compressed = _surviving_compressed(previous, shards)
        if compressed:
            manifest["compressed"] = compressed
        elif any(f in (previous.get("compressed") or {}) for f in ("int8", "pq")):
            for _, rel, _ in _compressed_files(out, previous):
                (out / rel).unlink(missing_ok=True)
            _say(opts, f"{out}: the final vectors changed, so the compressed forms made from them were dropped; "
                       f"run `tracestar compress` again")
    store.write_manifest(out, manifest)
    _say(opts, f"{out}: {base['n_docs']:,} documents, {n_tokens:,} tokens ({n_truncated} truncated at {opts.max_length}), dim {base['dim']:,}, {opts.dtype}")


# --- rerun: verify, repair ------------------------------------------------------------------------


def _start_repair(out: Path, opts: BuildOptions) -> dict | None:
    """Verify a finished index against its manifest. None when every listed file matches.

    Otherwise the damaged files and everything derived from them are removed, and so is the
    manifest (until the repair finishes the index is an unfinished build, which resumes); the
    build then recomputes what is missing. Returns the old manifest ({} if it was unreadable).
    """
    previous = damaged = None
    n_files = 0
    if dist.rank() == 0:
        previous, damaged, n_files = _verify_built(out, opts)
        if damaged:
            _say(opts, f"{out}: damaged: {', '.join(f'{rel} ({problem})' for rel, problem in damaged)}; repairing")
            _remove_damaged(out, previous, damaged, opts)
    previous, damaged, n_files = dist.broadcast_object((previous, damaged, n_files))
    dist.barrier()
    if not damaged:
        _say(opts, f"{out}: already built with these arguments; {n_files} files verified; nothing to do")
        return None
    return previous


def _verify_built(out: Path, opts: BuildOptions) -> tuple[dict, list[tuple[str, str]], int]:
    """(manifest, [(relative path, problem)], number of files checked) for every file it lists."""
    try:
        manifest = store.read_manifest(out)
        files = _listed_files(out, manifest)
    except (IndexStoreError, KeyError, TypeError, ValueError):
        return {}, [(store.MANIFEST, "unreadable")], 1
    damaged = []
    for rel, sha in _loop_bars(opts, unit="file")(files, "verifying"):
        path = out / rel
        if not path.is_file():
            damaged.append((rel, "missing"))
        elif store.sha256_file(path) != sha:
            damaged.append((rel, "checksum mismatch"))
    return manifest, damaged, len(files)


def _listed_files(out: Path, manifest: dict) -> list[tuple[str, str]]:
    """(relative path, sha256) of every file a manifest vouches for: shards, sidecars, V, R, the
    doc table, compressed forms. Manifests written before `checksums` existed list the shards only."""
    files = []
    for info in manifest["shards"]:
        files.append((f"raw/{info['name']}.npy", info["raw_sha256"]))
        if info.get("vectors_sha256"):  # None once `compress --drop-exact` removed them
            files.append((f"vectors/{info['name']}.npy", info["vectors_sha256"]))
    files += sorted((manifest.get("checksums") or {}).items())
    files += [(rel, sha) for _, rel, sha in _compressed_files(out, manifest)]
    return files


def _compressed_files(out: Path, manifest: dict) -> list[tuple[str, str, str]]:
    """(form, relative path, sha256) of the compressed forms' files."""
    comp = manifest.get("compressed") or {}
    found = []
    if "int8" in comp:
        from tracestar.index.compress import int8_paths

        for shard_no, info in enumerate(comp["int8"]["shards"]):
            codes, scales = int8_paths(out, shard_no)
            found += [("int8", str(codes.relative_to(out)), info["codes_sha256"]),
                      ("int8", str(scales.relative_to(out)), info["scales_sha256"])]
    if "pq" in comp:
        found.append(("pq", comp["pq"]["path"], comp["pq"]["sha256"]))
    return found


def _remove_damaged(out: Path, manifest: dict, damaged: list[tuple[str, str]], opts: BuildOptions) -> None:
    """Delete each damaged file and what is computed from it, so the resumed build redoes them.

    raw shard → it and its final vectors (R is refitted only if its sample read that shard, see
    `_r_inputs`); final vectors → them; V → everything; R → R (vectors follow if it changes);
    doc table → nothing (always rewritten); a compressed form → the form (`tracestar compress` again).
    """
    doomed: set[str] = set()
    forms = {rel: form for form, rel, _ in _compressed_files(out, manifest)} if manifest else {}
    for rel, _ in damaged:
        top, _, name = rel.partition("/")
        if top in store.KINDS:
            stem = name.split(".")[0]
            for kind in (("raw", "vectors") if top == "raw" else ("vectors",)):
                doomed |= {f"{kind}/{stem}.npy", f"{kind}/{stem}.json"}
        elif rel.startswith("normalizer."):
            doomed |= {"normalizer.safetensors", "normalizer.json", "preconditioner.safetensors", "preconditioner.json"}
            doomed |= {str(p.relative_to(out)) for kind in store.KINDS for p in (out / kind).glob("shard-*")}
        elif rel.startswith("preconditioner."):
            doomed |= {"preconditioner.safetensors", "preconditioner.json"}
        elif rel in forms:
            form = forms[rel]
            doomed |= {r for r, f in forms.items() if f == form}
            manifest.get("compressed", {}).pop(form, None)
            _say(opts, f"{out}: compressed form {form} dropped; run `tracestar compress --index {out} --kind {form}` again")
    for rel in sorted(doomed):
        (out / rel).unlink(missing_ok=True)
    (out / store.MANIFEST).unlink(missing_ok=True)


def _surviving_compressed(previous: dict, shards: list[dict]) -> dict | None:
    """The old compressed forms, if the final vectors they were made from are byte-identical."""
    comp = dict(previous.get("compressed") or {})
    forms = [f for f in ("int8", "pq") if f in comp]
    if not forms:
        return None
    old = {s["name"]: s.get("vectors_sha256") or s.get("vectors_sha256_dropped") for s in previous.get("shards", [])}
    if all(old.get(s["name"]) == s["vectors_sha256"] for s in shards):
        comp["exact_dropped"] = False  # the repair wrote the exact vectors again
        comp.pop("exact_dropped_at", None)
        return comp
    return None


def _describe_work(raw_done: list[int], summary: dict) -> str:
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


def _variant_name(opts: BuildOptions) -> str:
    for name, spec in VARIANTS.items():
        if all(getattr(opts, k) == v for k, v in spec.items()):
            return name
    return "custom"


# --- refit --------------------------------------------------------------------------------------


def refit(
    index_dir: str | Path,
    out: str | Path,
    *,
    eval_queries: str | Path | None = None,
    preconditioner: str | None = None,
    lam: float | None = None,
    fit_docs: int | None = None,
    damping: float | None = None,
    model_dir: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """A new index with another preconditioner, from `index_dir`'s raw shards (no pass over the corpus).

    Raw shards, sidecars, the doc table and V are hard-linked (copied where links are impossible).
    The model runs only on the eval queries.
    """
    src, out = Path(index_dir), Path(out)
    timer = PhaseTimer()
    manifest = store.read_manifest(src)
    if not (src / BUILD_FILE).is_file():
        raise IndexStoreError(f"{src}: no {BUILD_FILE} (the arguments it was built with), so it cannot be refitted")
    prev = json.loads((src / BUILD_FILE).read_text())
    opts = BuildOptions(
        **{k: v for k, v in prev.items() if k in {f.name for f in dataclasses.fields(BuildOptions)}},
        quiet=quiet,
        overwrite=overwrite,
    )
    opts.eval_queries = str(eval_queries) if eval_queries else None
    opts.preconditioner = preconditioner
    opts.lam = lam
    opts.fit_docs = fit_docs if fit_docs is not None else opts.fit_docs
    opts.damping = damping if damping is not None else opts.damping
    opts.variant = None
    opts = opts.resolved()
    queries = read_queries(opts.eval_queries) if opts.eval_queries else None
    tracer = capture = None
    if opts.preconditioner == "mixed":
        with timer.phase("load"):
            tracer = Tracer(model_dir or manifest["model"]["path"], opts.device)
        if tracer.fingerprint != manifest["model"]["fingerprint"]:
            raise UserError(f"{model_dir}: model fingerprint differs from the index's ({src}); refusing to mix them")
        encode_queries(tracer.tokenizer, queries, opts.max_length)  # a target too long for the window
        normalizer = Normalizer.load(src / "normalizer.safetensors", manifest["normalizer"])
        blocks = [Block.from_json(b) for b in manifest["projection"]["blocks"]]
        capture = tracer.capture(blocks, normalizer, manifest["projection"]["seed"], manifest.get("autocast"))
    identity = {**opts.identity(), "model_fingerprint": manifest["model"]["fingerprint"], "corpus": prev["corpus"]}
    with _undo_on_failure(out, overwrite, lambda: _any_sidecar(out, "vectors")):
        previous = None
        with timer.phase("verify"):
            if _prepare_dir(out, identity, overwrite) == "built":
                previous = _start_repair(out, opts)
                if previous is None:
                    return out
            if dist.rank() == 0:
                raw_files = [f"raw/{p.name}" for p in sorted((src / "raw").iterdir()) if ".tmp-" not in p.name]
                for rel in ["normalizer.safetensors", "normalizer.json", store.DOCS, *raw_files]:
                    _link(src / rel, out / rel)
                _verify_source_raw(src, out, manifest, opts)
            dist.barrier()
        keys = ("format_version", "tracestar_version", "model", "corpus", "projection", "dim", "normalizer",
                "optimizer_correction", "autocast", "max_length", "max_length_requested", "model_window", "shard_docs", "n_docs")
        base = {k: manifest[k] for k in keys if k in manifest}
        base["refit_from"] = str(src.resolve())
        summary = finalize(out, base, opts, queries=queries, query_capture=capture, tracer=tracer, previous=previous,
                           timer=timer)
    if previous is not None:
        _say(opts, f"{out}: repaired: {_describe_work([], summary)}")
    _say(opts, timer.line())
    return out


def _verify_source_raw(src: Path, out: Path, manifest: dict, opts: BuildOptions) -> None:
    """The raw shards a refit reads are the source index's: a damaged one is repaired there, not here."""
    for info in _loop_bars(opts, unit="shard")(manifest["shards"], "verifying raw shards"):
        path = out / "raw" / f"{info['name']}.npy"
        if not path.is_file() or store.sha256_file(path) != info["raw_sha256"]:
            raise IndexStoreError(f"{src / 'raw' / path.name}: checksum mismatch; rerun the `tracestar index` command "
                                  f"that built {src} to repair it, then refit again")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
