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
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from tracestar import __version__, dist
from tracestar.batching import bucketed, collate, encode_document, encode_query, forward_loss, pad_id
from tracestar.capture import FactoredCapture
from tracestar.corpus import Document, Query, corpus_format, iter_documents, read_queries, validate_corpus
from tracestar.errors import UserError
from tracestar.index import store
from tracestar.model import coverage, load_model, model_fingerprint, tokenizer_hash, tracked_matrices
from tracestar.normalizer import Normalizer, estimate, from_optimizer_state, identity
from tracestar.preconditioner import DEFAULT_DAMPING, DEFAULT_R_BLOCK, Preconditioner, RStats, fit, r_ranges
from tracestar.projection import DEFAULT_DIM, Block, layout_dim, make_layout

BUILD_FILE = "build.json"

#: The paper's ablation ladder, each rung adding one thing.
VARIANTS: dict[str, dict] = {
    "dot": {"optimizer_correction": False, "unit_norm": False, "preconditioner": "none"},
    "opt": {"optimizer_correction": True, "unit_norm": False, "preconditioner": "none"},
    "opt-norm": {"optimizer_correction": True, "unit_norm": True, "preconditioner": "none"},
    "train-r": {"optimizer_correction": True, "unit_norm": True, "preconditioner": "train"},
    "trackstar": {"optimizer_correction": True, "unit_norm": True, "preconditioner": "mixed"},
}


@dataclass
class BuildOptions:
    optimizer_state: str | None = None
    proj_dim: int = DEFAULT_DIM
    blocks: str = "paper"
    max_length: int = 512
    batch_tokens: int = 4096
    seed: int = 0
    optimizer_correction: bool = True
    unit_norm: bool = True
    preconditioner: str | None = None  # none | train | mixed; default: mixed with eval queries, else train
    eval_queries: str | None = None
    lam: float | None = None
    fit_docs: int | None = None  # default: all documents, at most 10,000
    damping: float = DEFAULT_DAMPING
    r_block: int = DEFAULT_R_BLOCK
    dtype: str | None = None  # default float16 (float32 when vectors are not unit-normalized)
    shard_docs: int = 1024
    normalizer_docs: int = 128
    text_field: str = "text"
    id_field: str = "id"
    variant: str | None = None
    padding_side: str = "right"
    autocast: str | None = None  # "bfloat16": the model's forward/backward in bf16 (GPU, or CPUs with AVX512-BF16)
    device: str | None = None
    quiet: bool = False
    overwrite: bool = False

    def resolved(self) -> "BuildOptions":
        """Apply the variant shorthand and the defaults that depend on other options."""
        o = dataclasses.replace(self)
        if o.variant is not None:
            if o.variant not in VARIANTS:
                raise UserError(f"unknown --variant {o.variant!r}; choose from {', '.join(VARIANTS)}")
            for key, value in VARIANTS[o.variant].items():
                setattr(o, key, value)
        if o.preconditioner is None:
            o.preconditioner = "mixed" if o.eval_queries else "train"
        if o.preconditioner not in ("none", "train", "mixed"):
            raise UserError(f"unknown --preconditioner {o.preconditioner!r} (none, train or mixed)")
        if o.preconditioner == "mixed" and not o.eval_queries:
            raise UserError("a mixed preconditioner (and --variant trackstar) needs --eval-queries")
        if o.dtype is None:
            o.dtype = "float16" if o.unit_norm else "float32"
        if o.dtype not in ("float16", "bfloat16", "float32"):
            raise UserError(f"unknown --dtype {o.dtype!r} (float16, bfloat16 or float32)")
        if o.device is None:
            o.device = "cuda" if torch.cuda.is_available() else "cpu"
        if o.autocast not in (None, "bfloat16"):
            raise UserError(f"unknown --autocast {o.autocast!r} (bfloat16)")
        return o

    def identity(self) -> dict:
        """The options that determine the index's bytes (a rerun with others is refused)."""
        skip = {"quiet", "overwrite", "device", "variant"}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        for key in ("optimizer_state", "eval_queries"):
            if d[key]:
                d[key] = str(Path(d[key]).resolve())
        return d


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

    def normalizer(self, opts: BuildOptions, sample: list[Document] | None) -> Normalizer:
        if not opts.optimizer_correction:
            return identity(self.tracked)
        if opts.optimizer_state:
            return from_optimizer_state(opts.optimizer_state, self.model, self.tracked)
        batches = (
            collate([encode_document(self.tokenizer, d.text, i, opts.max_length)], self.pad).to(self.device)
            for i, d in enumerate(sample or [])
        )
        return estimate(self.model, self.tracked, batches, forward_loss, reduce=dist.all_reduce_)

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

    def query_vectors(self, capture: FactoredCapture, queries: list[Query], opts: BuildOptions) -> np.ndarray:
        examples = [encode_query(self.tokenizer, q.prompt, q.target, i, opts.max_length) for i, q in enumerate(queries)]
        return self.raw_vectors(capture, examples, opts)


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


def _progress(total: int, quiet: bool, desc: str):
    """A tqdm bar with tokens/s; returns (callback, close)."""
    if quiet or dist.rank() != 0:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="doc", dynamic_ncols=True)
    start, tokens = time.perf_counter(), [0]

    def update(n_docs: int, n_tokens: int) -> None:
        tokens[0] += n_tokens
        bar.update(n_docs)
        bar.set_postfix_str(f"{tokens[0] / max(time.perf_counter() - start, 1e-9):,.0f} tok/s")

    return update, bar.close


# --- the build ---------------------------------------------------------------------------------


def _prepare_dir(out: Path, identity: dict, overwrite: bool) -> bool:
    """Create or check the output directory. Returns True if a finished identical index is there."""
    build_file = out / BUILD_FILE
    if out.exists() and overwrite and dist.rank() == 0:
        shutil.rmtree(out)
    dist.barrier()
    if out.exists() and any(out.iterdir()):
        if not build_file.exists():
            raise UserError(f"{out}: exists and is not a tracestar build; choose another --out or pass --overwrite")
        previous = json.loads(build_file.read_text())
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise UserError(
                f"{out}: holds a build with different arguments ({', '.join(changed)}); use another --out or --overwrite"
            )
        return (out / store.MANIFEST).exists()
    dist.barrier()
    if dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        store.write_json(build_file, identity)
    dist.barrier()
    return False


def build_index(model_dir: str | Path, corpus: str | Path, out: str | Path, options: BuildOptions | None = None, **kw) -> Path:
    """Build a TrackStar index of `corpus` for the model in `model_dir` into `out`. Returns `out`.

    Keyword arguments override fields of `options` (see `BuildOptions`).
    """
    opts = dataclasses.replace(options or BuildOptions(), **kw).resolved()
    corpus, out = Path(corpus), Path(out)
    dist.init_from_env(opts.device)
    # Everything the user can get wrong is checked before anything is written.
    n_docs = validate_corpus(corpus, text_field=opts.text_field, id_field=opts.id_field)
    queries = read_queries(opts.eval_queries) if opts.eval_queries else None
    tracer = Tracer(model_dir, opts.device)
    identity = {**opts.identity(), "model_fingerprint": tracer.fingerprint, "corpus": _corpus_identity(corpus)}
    if _prepare_dir(out, identity, opts.overwrite):
        _say(opts, f"{out}: already built with these arguments; nothing to do")
        return out
    blocks = make_layout(tracer.tracked, kind=opts.blocks, dim=opts.proj_dim)
    normalizer = _normalizer(tracer, corpus, n_docs, opts, out)
    capture = tracer.capture(blocks, normalizer, opts.seed, opts.autocast)
    _say(opts, f"tracking {len(tracer.tracked)} matrices, {tracer.coverage['share']:.2%} of {tracer.coverage['n_params']:,} parameters; dim {capture.dim:,} in {len(blocks)} blocks")
    _raw_phase(tracer, capture, corpus, n_docs, opts, out)
    base = _base_manifest(tracer, corpus, blocks, normalizer, opts, n_docs)
    finalize(out, base, opts, queries=queries, query_capture=capture, tracer=tracer)
    return out


def _say(opts: BuildOptions, msg: str) -> None:
    if not opts.quiet and dist.rank() == 0:
        print(msg, flush=True)


def _corpus_identity(corpus: Path) -> dict:
    p = corpus.resolve()
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return {"path": str(p), "bytes": size}


def _normalizer(tracer: Tracer, corpus: Path, n_docs: int, opts: BuildOptions, out: Path) -> Normalizer:
    path = out / "normalizer.safetensors"
    info_path = out / "normalizer.json"
    if path.exists() and info_path.exists():  # resume: V was fixed by the interrupted run
        return Normalizer.load(path, json.loads(info_path.read_text()))
    sample = None
    if opts.optimizer_correction and not opts.optimizer_state:
        rows = set(_sample_rows(n_docs, opts.normalizer_docs, opts.seed, 1).tolist())
        sample = [
            d
            for i, d in enumerate(iter_documents(corpus, text_field=opts.text_field, id_field=opts.id_field))
            if i in rows and _mine(i // opts.shard_docs)
        ]
        _say(opts, f"no optimizer state: estimating V from the mean squared gradient of {len(rows)} documents")
    normalizer = tracer.normalizer(opts, sample)
    if dist.rank() == 0:
        normalizer.save(path)
        store.write_json(info_path, normalizer.to_json())
    dist.barrier()
    return Normalizer.load(path, json.loads(info_path.read_text()))


def _raw_phase(tracer: Tracer, capture: FactoredCapture, corpus: Path, n_docs: int, opts: BuildOptions, out: Path) -> None:
    n_shards = -(-n_docs // opts.shard_docs)
    mine = [s for s in range(n_shards) if _mine(s)]
    todo = [s for s in mine if _done(out, "raw", s) is None]
    todo_docs = sum(min(opts.shard_docs, n_docs - s * opts.shard_docs) for s in todo)
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


def _write_raw_shard(out: Path, shard_no: int, start: int, raw: np.ndarray, table: list) -> None:
    """The `.npy` first, then the sidecar that marks it complete (with its checksum)."""
    sha = store.write_shard(out, "raw", shard_no, raw)
    store.write_json(_sidecar(out, "raw", shard_no), {"start": start, "rows": len(table), "sha256": sha, "docs": table})


def _base_manifest(tracer: Tracer, corpus: Path, blocks: list[Block], normalizer: Normalizer, opts: BuildOptions, n_docs: int) -> dict:
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
        "max_length": opts.max_length,
        "shard_docs": opts.shard_docs,
        "n_docs": n_docs,
    }


# --- phases 3-5, shared by build and refit ------------------------------------------------------


def finalize(out: Path, base: dict, opts: BuildOptions, *, queries: list[Query] | None, query_capture, tracer) -> None:
    """Fit R on `out`'s raw shards (and the eval queries), write final vectors and the manifest."""
    n_docs, dim = base["n_docs"], base["dim"]
    blocks = [Block.from_json(b) for b in base["projection"]["blocks"]]
    n_shards = -(-n_docs // opts.shard_docs)
    precond = _fit_preconditioner(out, blocks, dim, n_docs, n_shards, opts, queries, query_capture, tracer)
    precond_sha = store.sha256_file(out / "preconditioner.safetensors")
    for shard_no in range(n_shards):
        if not _mine(shard_no) or _done(out, "vectors", shard_no, {"preconditioner": precond_sha}):
            continue
        _clear_partial(out, "vectors", shard_no)
        raw = torch.from_numpy(np.load(store.shard_path(out, "raw", shard_no)))
        final = finalize_vectors(raw, precond, opts.unit_norm).numpy()
        sha = store.write_shard(out, "vectors", shard_no, store.encode_dtype(final, opts.dtype))
        store.write_json(_sidecar(out, "vectors", shard_no), {"sha256": sha, "preconditioner": precond_sha})
    dist.barrier()
    if dist.rank() == 0:
        _write_manifest(out, base, opts, precond, n_shards)
    dist.barrier()


def _fit_preconditioner(out, blocks, dim, n_docs, n_shards, opts, queries, query_capture, tracer) -> Preconditioner:
    path = out / "preconditioner.safetensors"
    kind = opts.preconditioner
    ranges = r_ranges(blocks, opts.r_block)
    stats: dict[str, RStats] = {}
    if kind != "none":
        fit_docs = min(n_docs, opts.fit_docs or 10_000)
        sample = _sample_rows(n_docs, fit_docs, opts.seed, 2)
        train = RStats(ranges)
        for shard_no in range(n_shards):
            if not _mine(shard_no):
                continue
            start = shard_no * opts.shard_docs
            raw = np.load(store.shard_path(out, "raw", shard_no), mmap_mode="r")
            local = sample[(sample >= start) & (sample < start + raw.shape[0])] - start
            if len(local):
                train.update(torch.from_numpy(np.asarray(raw[local])))
        train.all_reduce(dist.all_reduce_)
        stats["train"] = train
    if kind == "mixed":
        mine = [q for i, q in enumerate(queries) if i % dist.world() == dist.rank()]
        evals = RStats(ranges)
        if mine:
            evals.update(torch.from_numpy(tracer.query_vectors(query_capture, mine, opts)))
        evals.all_reduce(dist.all_reduce_)
        stats["eval"] = evals
    if dist.rank() == 0:
        precond = fit(kind, stats.get("train"), stats.get("eval"), lam=opts.lam, damping=opts.damping, dim=dim)
        if kind == "mixed":
            precond.info["eval_queries"] = str(Path(opts.eval_queries).resolve())
        precond.info["fit_docs"] = int(stats["train"].count) if "train" in stats else 0
        precond.info["r_block"] = opts.r_block
        precond.save(path, stats)
        store.write_json(out / "preconditioner.json", precond.to_json())
        if kind == "mixed":
            _say(opts, f"mixed preconditioner: λ = {precond.lam:.4f} ({precond.info.get('lambda_source')})")
    dist.barrier()
    return Preconditioner.load(path, json.loads((out / "preconditioner.json").read_text()))


def _write_manifest(out: Path, base: dict, opts: BuildOptions, precond: Preconditioner, n_shards: int) -> None:
    from tracestar.corpus import write_jsonl

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

    write_jsonl(out / store.DOCS, doc_rows())
    n_tokens, n_truncated = counts["tokens"], counts["truncated"]
    manifest = {
        **base,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "variant": opts.variant or _variant_name(opts),
        "unit_norm": opts.unit_norm,
        "dtype": opts.dtype,
        "preconditioner": precond.to_json(),
        "n_tokens": n_tokens,
        "n_truncated": n_truncated,
        "world_size": dist.world(),
        "shards": shards,
        "files": {"normalizer": "normalizer.safetensors", "preconditioner": "preconditioner.safetensors", "docs": store.DOCS},
    }
    store.write_manifest(out, manifest)
    _say(opts, f"{out}: {base['n_docs']:,} documents, {n_tokens:,} tokens ({n_truncated} truncated at {opts.max_length}), dim {base['dim']:,}, {opts.dtype}")


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
    manifest = store.read_manifest(src)
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
        tracer = Tracer(model_dir or manifest["model"]["path"], opts.device)
        if tracer.fingerprint != manifest["model"]["fingerprint"]:
            raise UserError(f"{model_dir}: model fingerprint differs from the index's ({src}); refusing to mix them")
        normalizer = Normalizer.load(src / "normalizer.safetensors", manifest["normalizer"])
        blocks = [Block.from_json(b) for b in manifest["projection"]["blocks"]]
        capture = tracer.capture(blocks, normalizer, manifest["projection"]["seed"], manifest.get("autocast"))
    identity = {**opts.identity(), "model_fingerprint": manifest["model"]["fingerprint"], "corpus": prev["corpus"]}
    if _prepare_dir(out, identity, overwrite):
        return out
    if dist.rank() == 0:
        raw_files = [f"raw/{p.name}" for p in sorted((src / "raw").iterdir()) if ".tmp-" not in p.name]
        for rel in ["normalizer.safetensors", "normalizer.json", store.DOCS, *raw_files]:
            _link(src / rel, out / rel)
    dist.barrier()
    base = {k: manifest[k] for k in ("format_version", "tracestar_version", "model", "corpus", "projection", "dim", "normalizer", "optimizer_correction", "autocast", "max_length", "shard_docs", "n_docs")}
    base["refit_from"] = str(src.resolve())
    finalize(out, base, opts, queries=queries, query_capture=capture, tracer=tracer)
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
