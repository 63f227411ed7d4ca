"""The paper's evaluation (docs/ARCHITECTURE.md, “Evaluation”) end to end: attribution (MRR,
recall@k, per bucket) and influence (tail-patch) for tracestar, BM25, the ground-truth documents
and any index variants; written as `metrics.json`, `report.md` and PNG plots.

metrics.json::

    {"tracestar": {"mrr": x, "recall@1": x, ..., "recall@10": x, "n": n,
                   "by_bucket": {bucket: {"mrr", "recall@1", ..., "recall@10", "n"}},
                   "tailpatch": {"1": {"delta_logprob": x, "delta_prob": x, "n_queries": n}, "3": ..., ...}},
     "bm25": {same keys},
     "relevant": {"tailpatch": {...}},
     "<variant>": {same keys as tracestar},
     "model": {"first_token_accuracy": x, "accuracy_warning": str or null, "accuracy_threshold": x,
               "n_queries": n},
     "_settings": {...}}          # "model" and keys starting with "_" are not methods

The model's first-token accuracy comes first because it decides how to read the rest: a model
that has not learned the facts has little to attribute, and below `ACCURACY_THRESHOLD` the
figures need not show the paper's findings (BM25 far ahead on attribution, TrackStar ahead on
influence).

`rankings/<method>.jsonl` keeps every method's result lists.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from tracestar.corpus import Query, read_queries, write_jsonl
from tracestar.errors import OptionError, check_float, check_int
from tracestar.files import remove_temporaries, write_json, write_text
from tracestar.evaluate.metrics import attribution_metrics, relevant_ids, sort_buckets
from tracestar.options import DEFAULT_KS
from tracestar.evaluate.summary import (  # noqa: F401 (format_table, methods_of, method_label: re-exported)
    NOT_METHODS,
    format_table,
    method_label,
    methods_of,
    summary,
    to_markdown,
)

#: Below this first-token accuracy the report warns. The figures move with what the model has
#: learned; on the demo's world (same index settings, fewer epochs for lower accuracy) TrackStar's
#: MRR was 0.27 at 87.9% accuracy, 0.56 at 79.6%, 0.73 at 62.5% and 0.74-0.76 at 37-40%: below
#: about 70% the figures look like an untrained model's, not like the paper's (measured).
ACCURACY_THRESHOLD = 0.70


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def sample_queries(queries: Sequence[Query], max_queries: int | None, *, seed: int = 0) -> list[Query]:
    """At most `max_queries` queries, drawn round-robin over buckets from a seeded shuffle (so every
    bucket keeps its share), returned in file order."""
    qs = list(queries)
    if max_queries is None or max_queries >= len(qs):
        return qs
    rng = random.Random(f"tracestar-eval:{seed}")
    by_b: dict[str, list[int]] = {}
    for i, q in enumerate(qs):
        by_b.setdefault(str(q.extra.get("bucket", "all")), []).append(i)
    for v in by_b.values():
        rng.shuffle(v)
    picked: list[int] = []
    buckets = sort_buckets(by_b)
    while len(picked) < max_queries:
        for b in buckets:
            if by_b[b] and len(picked) < max_queries:
                picked.append(by_b[b].pop())
    return [qs[i] for i in sorted(picked)]


def evaluate_results(
    queries: Sequence[Query],
    method_results: Mapping[str, Sequence[dict[str, Any]]],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    patcher=None,
    doc_texts=None,
    tail_patch_methods: Sequence[str] | None = None,
    max_queries: int | None = None,
    tail_patch_threads: int | None = 1,
    quiet: bool = True,
) -> dict[str, Any]:
    """Metrics for already-computed result lists (no index needed).

    `method_results`: {method: results}; a method named "relevant" gets tail-patch only. With a
    `patcher` (`TailPatcher`) and `doc_texts` ({doc_id: text} or a callable), tail-patch runs over
    `tail_patch_methods` (default: all) on a sample of at most `max_queries` queries.
    """
    ks = tuple(sorted({int(k) for k in ks}))
    out: dict[str, Any] = {}
    for method, results in method_results.items():
        if method == "relevant":
            out[method] = {}
            continue
        out[method] = attribution_metrics(queries, results, ks)
    if patcher is not None:
        from tracestar.evaluate.tailpatch import tail_patch

        tp_queries = sample_queries(queries, max_queries)
        ids = {q.id for q in tp_queries}
        methods = list(tail_patch_methods) if tail_patch_methods is not None else list(method_results)
        sub = {m: [r for r in method_results[m] if str(r["query_id"]) in ids] for m in methods}
        t0 = time.time()
        tp = tail_patch(patcher, tp_queries, sub, doc_texts, ks, progress=not quiet, threads=tail_patch_threads)
        for m, v in tp.items():
            out[m]["tailpatch"] = v
        out["_tailpatch"] = {**patcher.describe(), "n_queries": len(tp_queries), "methods": methods,
                             "seconds": round(time.time() - t0, 1)}
    return out


def _index_name(manifest: Mapping[str, Any], path: Path, taken: set[str]) -> str:
    name = str(manifest.get("variant") or (manifest.get("preconditioner") or {}).get("variant") or path.name)
    base, n = name, 2
    while name in taken:
        name = f"{base}-{n}"
        n += 1
    return name


def _optimizer_state_for(model_dir: Path, manifest: Mapping[str, Any]) -> Path | None:
    """The state inside the model directory (a Trainer checkpoint), else the one the index read."""
    from tracestar.optim_state import find_in_dir

    cand = find_in_dir(model_dir)
    if cand is not None:
        return cand
    norm = manifest.get("normalizer") or {}
    for src in (norm.get("optimizer_state"), norm.get("source")):
        if isinstance(src, str) and src and Path(src).exists():
            return Path(src)
    return None


def check_eval_options(ks: Sequence[int], lr: float | None, max_queries: int | None) -> None:
    """Range checks, before anything is read or written (each error names the option)."""
    if not ks:
        raise OptionError("--k", "expected at least one k")
    for k in ks:
        check_int("--k", k, minimum=1)
    check_float("--lr", lr, above=0.0, optional=True)
    check_int("--max-queries", max_queries, minimum=1, optional=True)


def evaluate(
    index_dir: str | Path,
    queries_path: str | Path,
    out_dir: str | Path,
    *,
    bm25: bool = True,
    tail_patch: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
    variants: Sequence[str | Path] = (),
    model_dir: str | Path | None = None,
    lr: float | None = None,
    max_queries: int | None = None,
    tail_patch_variants: bool = True,
    tail_patch_threads: int | None = 1,
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate an index (and optional variant indexes) on a query file with ground truth.

    Attribution uses every query; tail-patch uses at most `max_queries` of them (a bucket-stratified
    seeded sample) and, when `tail_patch_variants`, the variants too, on `tail_patch_threads` torch
    threads (None: torch's setting). `model_dir` defaults to the
    index's model; `lr` to the trainer's (train_log.json). Writes `out_dir/metrics.json`,
    `report.md`, `attribution_by_bucket.png`, `tailpatch.png`, `rankings/*.jsonl`; returns the metrics.
    """
    from tracestar.api import open_index

    t_start = time.time()
    check_eval_options(ks, lr, max_queries)
    out = Path(out_dir)
    ks = tuple(sorted({int(k) for k in ks}))
    top_k = max(ks)
    queries = read_queries(queries_path)
    n_rel = sum(1 for q in queries if relevant_ids(q))

    idx = open_index(index_dir)
    out.mkdir(parents=True, exist_ok=True)  # once the inputs are known to be readable: a typo writes nothing
    remove_temporaries(out)  # what a killed evaluation left
    manifest = idx.manifest
    model_dir = Path(model_dir) if model_dir is not None else Path(manifest["model"]["path"])
    corpus_path = (manifest.get("corpus") or {}).get("path")

    method_results, variant_names, timings = _rank_all(idx, index_dir, queries, variants, top_k=top_k, model_dir=model_dir,
                                                       bm25=bm25, quiet=quiet)
    patcher = doc_texts = tp_methods = None
    if tail_patch:
        tp_methods = [m for m in method_results if tail_patch_variants or m not in variant_names]
        patcher, doc_texts = _tail_patch_inputs(index_dir, manifest, model_dir, queries, method_results, tp_methods,
                                                top_k=top_k, lr=lr, max_queries=max_queries, quiet=quiet)

    metrics = evaluate_results(queries, method_results, ks=ks, patcher=patcher, doc_texts=doc_texts,
                               tail_patch_methods=tp_methods, max_queries=max_queries,
                               tail_patch_threads=tail_patch_threads, quiet=quiet)
    tp_settings = metrics.pop("_tailpatch", None)
    metrics["model"] = model_summary(model_accuracy(model_dir, queries), len(queries))
    metrics["_settings"] = {
        "index": str(index_dir), "queries": str(queries_path), "n_queries": len(queries),
        "n_queries_with_relevant": n_rel, "ks": list(ks), "model": str(model_dir), "corpus": corpus_path,
        "variants": {n: str(v) for n, v in zip(variant_names, variants)},
        "index_preconditioner": (manifest.get("preconditioner") or {}).get("kind"),
        "tailpatch": tp_settings, "timings": {**timings, "total_s": round(time.time() - t_start, 1)},
    }
    rank_dir = out / "rankings"
    for m, results in method_results.items():
        write_jsonl(rank_dir / f"{m}.jsonl", results)
    write_report(metrics, out)
    return metrics


def _rank_all(idx, index_dir, queries: list[Query], variants: Sequence[str | Path], *, top_k: int, model_dir: Path,
              bm25: bool, quiet: bool) -> tuple[dict[str, list[dict[str, Any]]], list[str], dict[str, float]]:
    """Every method's ranked lists for every query: tracestar, BM25, the variant indexes, and the
    fact-stating documents themselves; with the variants' names and the time each method took."""
    from tracestar.api import open_index

    corpus = idx.manifest.get("corpus") or {}
    method_results: dict[str, list[dict[str, Any]]] = {}
    t0 = time.time()
    _log(f"tracestar: querying {len(queries)} queries ...", quiet)
    # relevance is labelled per document: an index of windows (--chunk-tokens) ranks documents by their best window
    method_results["tracestar"] = list(idx.query(queries, top_k=top_k, model_dir=model_dir, by_doc=idx.store.chunked))
    timings = {"tracestar_query_s": round(time.time() - t0, 1)}
    if bm25:
        from tracestar.evaluate.bm25 import bm25_results

        if not corpus.get("path"):
            raise ValueError(f"{index_dir}: manifest names no corpus; BM25 needs the corpus text")
        t0 = time.time()
        method_results["bm25"] = bm25_results(corpus["path"], queries, top_k=top_k, text_field=corpus.get("text_field", "text"),
                                              id_field=corpus.get("id_field", "id"))
        timings["bm25_s"] = round(time.time() - t0, 1)
    variant_names: list[str] = []
    taken = {"tracestar", "bm25", "relevant", *NOT_METHODS}
    for v in variants:
        vidx = open_index(v)
        name = _index_name(vidx.manifest, Path(v), taken)
        taken.add(name)
        variant_names.append(name)
        t0 = time.time()
        _log(f"tracestar: querying variant {name} ...", quiet)
        method_results[name] = list(vidx.query(queries, top_k=top_k, model_dir=model_dir, by_doc=vidx.store.chunked))
        timings[f"{name}_query_s"] = round(time.time() - t0, 1)
    method_results["relevant"] = _relevant_results(queries, top_k)
    return method_results, variant_names, timings


def _tail_patch_inputs(index_dir, manifest: Mapping[str, Any], model_dir: Path, queries: list[Query],
                       method_results: Mapping[str, list[dict[str, Any]]], tp_methods: list[str], *, top_k: int,
                       lr: float | None, max_queries: int | None, quiet: bool):
    """The tail-patcher (the checkpoint's own optimizer, one step) and the texts of every document
    it will patch with: the top-k proponents of the sampled queries, for every patched method."""
    from tracestar.corpus import texts_by_id
    from tracestar.evaluate.tailpatch import TailPatcher

    corpus = manifest.get("corpus") or {}
    if not corpus.get("path"):
        raise ValueError(f"{index_dir}: manifest names no corpus; tail-patch needs the document text")
    patcher = TailPatcher.from_dir(model_dir, optimizer_state=_optimizer_state_for(model_dir, manifest) or False, lr=lr)
    tp_ids = {q.id for q in sample_queries(queries, max_queries)}
    need = {str(p["doc_id"]) for m in tp_methods for r in method_results[m] if str(r["query_id"]) in tp_ids
            for p in r["proponents"][:top_k]}
    doc_texts = texts_by_id(corpus["path"], need, text_field=corpus.get("text_field", "text"),
                            id_field=corpus.get("id_field", "id"))
    _log(f"tracestar: tail-patch over {len(tp_ids)} queries, {len(need)} documents "
         f"({patcher.optimizer_kind}, lr={patcher.lr:g}) ...", quiet)
    return patcher, doc_texts


def model_accuracy(model_dir: str | Path, queries: Sequence[Query]) -> float:
    """The model's first-token accuracy on the queries (the trainer's measure, any causal LM)."""
    from tracestar.world.train import first_token_accuracy

    return first_token_accuracy(model_dir, None, queries)


def accuracy_warning(accuracy: float | None) -> str | None:
    """One sentence when `accuracy` is below `ACCURACY_THRESHOLD` (or unknown), else None."""
    if accuracy is None:
        return "the model's first-token accuracy is unknown, so it is not known whether it learned the facts"
    if accuracy >= ACCURACY_THRESHOLD:
        return None
    return (f"the model's first-token accuracy ({accuracy:.1%}) is below {ACCURACY_THRESHOLD:.0%}: it has not "
            f"learned most of the facts, so the figures need not show the paper's findings (BM25 far ahead on "
            f"attribution, TrackStar ahead on influence); train it longer")


def model_summary(accuracy: float | None, n_queries: int) -> dict[str, Any]:
    """metrics["model"]: the accuracy (None when unknown: NaN is not JSON), the warning (or None),
    the threshold and the query count."""
    if accuracy is not None and accuracy != accuracy:
        accuracy = None
    return {"first_token_accuracy": accuracy, "accuracy_warning": accuracy_warning(accuracy),
            "accuracy_threshold": ACCURACY_THRESHOLD, "n_queries": n_queries}


def _relevant_results(queries: Sequence[Query], top_k: int) -> list[dict[str, Any]]:
    from tracestar.evaluate.tailpatch import relevant_results

    return relevant_results(queries, top_k)


def write_report(metrics: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write metrics.json, the PNG plots and report.md (rendered from the metrics) into out_dir;
    returns report.md's path."""
    from tracestar.evaluate.plots import plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics, ensure_ascii=False)
    pngs = plot(metrics, out)
    write_text(out / "report.md", to_markdown(summary(metrics, pngs)))
    return out / "report.md"
