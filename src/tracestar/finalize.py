"""Phases 3–4 of a build, shared by `build_index` and `refit`: R, the final vectors, the manifest.

3. R: Σ g gᵀ over a seeded sample of raw rows (and over the eval queries' vectors), all-reduced,
   mixed, inverted (`preconditioner.py`); rank 0 writes it, every rank reads it back. R is
   reused when everything it depends on is unchanged (`_r_inputs`), so a resumed or repaired
   build refits it only when its inputs changed.
4. final vectors: unit(R^{-1/2} g) in the stored dtype, for every shard not yet finished with
   this R; with `--raw-dtype none` the raw shards are then deleted (their sidecars stay); then
   rank 0 writes the doc table and, last, the manifest (`index/writer.py`).

Raw rows are read as `--raw-dtype` stored them (`writer.load_raw`): with bfloat16, R and the final
vectors are computed from the bf16-rounded rows, and the manifest's `raw_dtype` says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracestar import dist, files
from tracestar.corpus import Query
from tracestar.index import writer
from tracestar.index.store import encode_dtype
from tracestar.options import VARIANTS, BuildOptions
from tracestar.preconditioner import Preconditioner, QueryStats, RStats, fit, r_ranges
from tracestar.progress import PhaseTimer, bar, loop_bars, say
from tracestar.projection import Block
from tracestar.tracer import Tracer, finalize_vectors


def finalize(out: Path, base: dict, opts: BuildOptions, *, queries: list[Query] | None, query_capture, tracer,
             previous: dict | None = None, timer: PhaseTimer | None = None) -> dict:
    """Fit R on `out`'s raw shards (and the eval queries), write final vectors and the manifest.

    `previous`: the manifest being repaired (its creation time, still-valid compressed forms and
    timings carry over). `timer`: the build's phase timer (a new one if None). Returns what was
    done: {"r_refit": bool, "vectors": [shard numbers written]}.
    """
    timer = timer or PhaseTimer()
    n_docs = base["n_docs"]
    layout = ShardLayout.read(out, shard_count(base))
    precond, r_refit = _fit_preconditioner(out, base, layout, opts, queries, query_capture, tracer, timer)
    written = _final_vectors(out, precond, layout, opts, timer)
    n_shards = layout.n_shards
    dist.barrier()
    if opts.raw_dtype == "none":  # every final vector is written: the raw shards have served
        for shard_no in range(n_shards):
            if owns(shard_no):
                writer.drop_raw(out, shard_no)
        dist.barrier()
    if dist.rank() == 0:
        fields = {"variant": opts.variant or _variant_name(opts), "unit_norm": opts.unit_norm, "dtype": opts.dtype,
                  "raw_dtype": opts.raw_dtype, "preconditioner": precond.to_json()}
        n_tokens, n_truncated = writer.finish(out, base, fields, n_shards, previous=previous, timer=timer, quiet=opts.quiet)
        chunking = base.get("chunking")
        rows = (f"{n_docs:,} windows of {chunking['n_documents']:,} documents" if chunking else f"{n_docs:,} documents")
        say(opts.quiet, f"{out}: {rows}, {n_tokens:,} tokens ({n_truncated} truncated at {opts.max_length}), "
                        f"dim {base['dim']:,}, {opts.dtype}")
        if layout.nonfinite.size:
            first = json.loads((out / writer.MANIFEST).read_text())["nonfinite_first"]
            say(opts.quiet, f"{out}: {layout.nonfinite.size} row(s) had a NaN or inf gradient (an fp16 overflow?), "
                            f"first {', '.join(map(repr, first))}: flagged \"nonfinite\" in {writer.DOCS}, stored as "
                            f"zeros (score 0 for every query) and left out of R")
    dist.barrier()
    return {"r_refit": r_refit, "vectors": written}


def _final_vectors(out: Path, precond: Preconditioner, layout: ShardLayout, opts: BuildOptions,
                   timer: PhaseTimer) -> list[int]:
    """Write unit(R^{-1/2} g) for this rank's shards not yet done with this R; returns their numbers."""
    precond_sha = files.sha256_file(out / writer.PRECONDITIONER)
    todo = [s for s in range(layout.n_shards)
            if owns(s) and not writer.done(out, writer.VECTORS, s, {"preconditioner": precond_sha})]
    update, close = bar(sum(layout.rows[s] for s in todo), opts.quiet, "final vectors")
    try:
        with timer.phase("final vectors"):
            for shard_no in todo:
                writer.clear_partial(out, writer.VECTORS, shard_no)
                raw = torch.from_numpy(writer.load_raw(out, shard_no, opts.raw_dtype))
                final = finalize_vectors(raw, precond, opts.unit_norm).numpy()
                with timer.phase("writes"):
                    writer.write_done_shard(out, writer.VECTORS, shard_no, encode_dtype(final, opts.dtype),
                                            {"preconditioner": precond_sha})
                if update is not None:
                    update(raw.shape[0])
    finally:
        close()
    return todo


def _fit_preconditioner(out: Path, base: dict, layout: ShardLayout, opts: BuildOptions, queries: list[Query] | None,
                        query_capture, tracer, timer: PhaseTimer) -> tuple[Preconditioner, bool]:
    """(R^{-1/2}, whether it was fitted now): reused when its inputs are unchanged, else fitted."""
    path, info_path = out / writer.PRECONDITIONER, out / writer.PRECONDITIONER_INFO
    kind = opts.preconditioner
    ranges = r_ranges([Block.from_json(b) for b in base["projection"]["blocks"]], opts.r_block)
    sample = r_sample(layout, opts) if kind != "none" else np.zeros(0, dtype=np.int64)
    inputs = _r_inputs(out, opts, sample, layout)
    reused = dist.broadcast_object(_reusable_preconditioner(out, inputs) is not None if dist.rank() == 0 else None)
    if reused:
        return Preconditioner.load(path, json.loads(info_path.read_text())), False
    stats: dict[str, RStats | QueryStats] = {}
    with timer.phase("R statistics"):
        if kind != "none":
            stats["train"] = _train_stats(out, ranges, sample, layout, opts)
        if kind == "mixed":
            stats["eval"] = _eval_stats(ranges, base["dim"], queries, query_capture, tracer, opts)
    if dist.rank() == 0:
        with timer.phase("eigendecomposition"):
            precond = fit(kind, stats.get("train"), stats.get("eval"), lam=opts.lam, damping=opts.damping,
                          dim=base["dim"], factor=opts.r_factor, progress=loop_bars(opts.quiet), device=opts.device)
        stats.clear()  # the sums are not stored (refit recomputes them from the raw shards)
        _return_freed_memory()
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


def _return_freed_memory() -> None:
    """Give the heap's freed pages back to the system (glibc `malloc_trim`; elsewhere nothing).

    Why: the statistics and each range's float64 temporaries are tens of MB apiece; once glibc has
    freed one such block it serves the next ones from the heap instead of fresh mappings, and the
    freed holes stay resident through the final vectors. At 2^16 (35 ranges) a `--r-factor
    cholesky` build peaked 0.6-0.7 GB above an eigh build without this, and level with it after.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def r_sample(layout: ShardLayout, opts: BuildOptions) -> np.ndarray:
    """The sorted rows R_train's statistics read: a seeded sample of the rows whose gradient is finite.

    Without a flagged row this is `sample_rows` of all rows, as it always was; a flagged row is
    taken out before sampling, so R never sees its (zeroed) vector.
    """
    usable = np.setdiff1d(np.arange(layout.n_rows), layout.nonfinite)  # [n] sorted
    return usable[sample_rows(len(usable), min(len(usable), opts.fit_docs or 10_000), opts.seed, 2)]


def _r_inputs(out: Path, opts: BuildOptions, sample: np.ndarray, layout: ShardLayout) -> str:
    """sha256 of everything R depends on: its options, the bytes of the raw shards its sample
    reads (from their verified sidecars), and the eval queries' file. Equal ⇒ R can be reused."""
    n_shards = layout.n_shards
    touched = sorted(set(layout.shard_of(sample).tolist())) if opts.preconditioner != "none" else []
    spec = {
        "kind": opts.preconditioner,
        "lambda": opts.lam,
        "damping": opts.damping,
        "r_block": opts.r_block,
        "sample": [len(sample), opts.seed],
        "raw": {s: writer.read_sidecar(out, writer.RAW, s)["sha256"] for s in touched if s < n_shards},
        "eval_queries": files.sha256_file(opts.eval_queries) if opts.preconditioner == "mixed" else None,
    }
    if opts.r_factor != "eigh":  # an eigh R's inputs hash as they always did, so its R is reused
        spec["r_factor"] = opts.r_factor
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


def _train_stats(out: Path, ranges, sample: np.ndarray, layout: ShardLayout, opts: BuildOptions) -> RStats:
    """Σ g gᵀ over the sampled raw rows of this rank's shards, all-reduced."""
    train = RStats(ranges)
    mine = [s for s in range(layout.n_shards) if owns(s)]
    bounds = {s: (layout.starts[s], layout.starts[s] + layout.rows[s]) for s in mine}
    n_mine = sum(int(((sample >= lo) & (sample < hi)).sum()) for lo, hi in bounds.values())
    update, close = bar(n_mine, opts.quiet, "R_train: statistics")
    try:
        for shard_no in mine:
            lo, hi = bounds[shard_no]
            local = sample[(sample >= lo) & (sample < hi)] - lo
            if not len(local):
                continue
            train.update(torch.from_numpy(writer.load_raw(out, shard_no, opts.raw_dtype, local)))
            if update is not None:
                update(len(local))
    finally:
        close()
    train.all_reduce(dist.all_reduce_)
    return train


def _eval_stats(ranges, dim: int, queries: list[Query], query_capture, tracer: Tracer,
                opts: BuildOptions) -> QueryStats:
    """The eval queries' raw vectors [n, D] (each rank embeds every W-th query; an all-reduce of
    zero-filled rows gathers them), kept whole: they are fewer bytes than Σ g gᵀ per range when
    there are fewer queries than coordinates in a range, and λ's spectrum comes from their Gram."""
    n = len(queries)
    mine = [i for i in range(n) if i % dist.world() == dist.rank()]
    vectors = torch.zeros(n, dim, dtype=torch.float32)  # [n, D]
    if mine:
        update, close = bar(len(mine), opts.quiet, "R_eval: eval-query gradients", unit="query")
        try:
            vectors[mine] = torch.from_numpy(tracer.query_vectors(query_capture, [queries[i] for i in mine], opts,
                                                                  update)).float()
        finally:
            close()
    dist.all_reduce_(vectors)
    return QueryStats(ranges, vectors)


# --- small helpers shared with the build ---------------------------------------------------------


def owns(shard_no: int) -> bool:
    """Whether this rank owns the shard (shard s belongs to rank s mod W, for any world size)."""
    return shard_no % dist.world() == dist.rank()


def shard_count(base: dict) -> int:
    """Shards of an index (`base`: its manifest so far): one per `shard_docs` documents."""
    n_documents = (base.get("chunking") or {}).get("n_documents", base["n_docs"])
    return -(-n_documents // base["shard_docs"])


@dataclass
class ShardLayout:
    """Where the rows are, read from the raw shards' sidecars: each shard's first row and row
    count (fixed-size shards of documents, or with chunking each shard's windows), and the rows
    flagged nonfinite."""

    starts: list[int]
    rows: list[int]
    nonfinite: np.ndarray  # [f] int64 sorted global rows

    @classmethod
    def read(cls, out: Path, n_shards: int) -> ShardLayout:
        starts, rows, bad = [], [], []
        for s in range(n_shards):
            info = writer.read_sidecar(out, writer.RAW, s)
            starts.append(int(info["start"]))
            rows.append(int(info["rows"]))
            bad += [starts[-1] + i for i, (*_, extra) in enumerate(info["docs"])
                    if isinstance(extra, dict) and extra.get("nonfinite")]
        return cls(starts, rows, np.array(bad, dtype=np.int64))

    @property
    def n_shards(self) -> int:
        return len(self.starts)

    @property
    def n_rows(self) -> int:
        return sum(self.rows)

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        """[n] the shard holding each of `rows` [n]."""
        return np.searchsorted(np.asarray(self.starts, dtype=np.int64), rows, side="right") - 1


def rows_of(shard_no: int, n_docs: int, shard_docs: int) -> int:
    """Documents in the shard (the last one may be short)."""
    return min(shard_docs, n_docs - shard_no * shard_docs)


def sample_rows(n: int, size: int, seed: int, salt: int) -> np.ndarray:
    """`size` sorted rows of `n`, the same on every rank and rerun (`salt` tells V's sample from R's)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, salt]).choice(n, size=size, replace=False))


def _variant_name(opts: BuildOptions) -> str:
    """The rung of the ablation ladder these options amount to, else "custom"."""
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
