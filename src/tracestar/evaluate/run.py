"""The paper's evaluation (DESIGN §2) end to end: attribution (MRR, recall@k, per bucket) and
influence (tail-patch) for tracestar, BM25, the ground-truth documents and any index variants;
written as `metrics.json`, `report.md` and PNG plots.

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

import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from tracestar.corpus import Query, read_queries, write_jsonl
from tracestar.errors import OptionError, check_float, check_int
from tracestar.evaluate.metrics import attribution_metrics, relevant_ids, sort_buckets

DEFAULT_KS = (1, 3, 5, 10)

#: Below this first-token accuracy the report warns. The figures move with what the model has
#: learned; on the demo's world (same index settings, fewer epochs for lower accuracy) TrackStar's
#: MRR was 0.27 at 87.9% accuracy, 0.56 at 79.6%, 0.73 at 62.5% and 0.74-0.76 at 37-40%: below
#: about 70% the figures look like an untrained model's, not like the paper's (measured).
ACCURACY_THRESHOLD = 0.70
#: How the table and the plots name a method (metrics.json keeps the keys).
METHOD_LABELS = {"bm25": "BM25", "relevant": "fact-stating documents"}
#: Top-level keys of the metrics that are not methods (besides those starting with "_").
NOT_METHODS = frozenset({"model"})


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
    manifest = idx.manifest
    model_dir = Path(model_dir) if model_dir is not None else Path(manifest["model"]["path"])
    corpus = manifest.get("corpus") or {}
    corpus_path = corpus.get("path")
    text_field, id_field = corpus.get("text_field", "text"), corpus.get("id_field", "id")

    method_results: dict[str, list[dict[str, Any]]] = {}
    t0 = time.time()
    _log(f"tracestar: querying {len(queries)} queries ...", quiet)
    method_results["tracestar"] = list(idx.query(queries, top_k=top_k, model_dir=model_dir))
    timings = {"tracestar_query_s": round(time.time() - t0, 1)}
    if bm25:
        from tracestar.evaluate.bm25 import bm25_results

        if not corpus_path:
            raise ValueError(f"{index_dir}: manifest names no corpus; BM25 needs the corpus text")
        t0 = time.time()
        method_results["bm25"] = bm25_results(corpus_path, queries, top_k=top_k, text_field=text_field, id_field=id_field)
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
        method_results[name] = list(vidx.query(queries, top_k=top_k, model_dir=model_dir))
        timings[f"{name}_query_s"] = round(time.time() - t0, 1)
    method_results["relevant"] = _relevant_results(queries, top_k)

    patcher = doc_texts = None
    tp_methods = None
    if tail_patch:
        from tracestar.evaluate.tailpatch import TailPatcher, load_doc_texts

        if not corpus_path:
            raise ValueError(f"{index_dir}: manifest names no corpus; tail-patch needs the document text")
        patcher = TailPatcher.from_dir(model_dir, optimizer_state=_optimizer_state_for(model_dir, manifest) or False, lr=lr)
        tp_methods = [m for m in method_results if tail_patch_variants or m not in variant_names]
        tp_ids = {q.id for q in sample_queries(queries, max_queries)}
        need = {str(p["doc_id"]) for m in tp_methods for r in method_results[m] if str(r["query_id"]) in tp_ids
                for p in r["proponents"][:top_k]}
        doc_texts = load_doc_texts(corpus_path, need, text_field=text_field, id_field=id_field)
        _log(f"tracestar: tail-patch over {len(tp_ids)} queries, {len(need)} documents "
             f"({patcher.optimizer_kind}, lr={patcher.lr:g}) ...", quiet)

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


# --- report ----------------------------------------------------------------------------------------


def methods_of(metrics: Mapping[str, Any]) -> list[str]:
    """The method keys of a metrics dict, in order (not "model", not the "_" keys)."""
    return [m for m in metrics if not m.startswith("_") and m not in NOT_METHODS]


def method_label(method: str) -> str:
    """The name a reader sees: "BM25", "fact-stating documents"; variants keep their own."""
    return METHOD_LABELS.get(method, method)


def _accuracy_text(model: Mapping[str, Any]) -> str:
    acc = model.get("first_token_accuracy")
    return ("unknown" if acc is None else f"{acc:.1%}") + f" on {model.get('n_queries', '?')} queries"


def accuracy_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The model's first-token accuracy and, when it is too low or unknown, the warning; no lines
    when the metrics hold no "model" entry (`evaluate_results` alone knows no model)."""
    model = metrics.get("model")
    if not isinstance(model, Mapping) or "first_token_accuracy" not in model:
        return []
    lines = [f"model: first-token accuracy {_accuracy_text(model)} "
             f"(greedy next token after the prompt = the target's first token)"]
    if model.get("accuracy_warning"):
        lines.append(f"WARNING: {model['accuracy_warning']}.")
    return lines


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and abs(x) < 10 ** -digits:
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def _ks_of(metrics: Mapping[str, Any]) -> list[int]:
    ks = (metrics.get("_settings") or {}).get("ks")
    if ks:
        return [int(k) for k in ks]
    found = set()
    for m in methods_of(metrics):
        found |= {int(k.split("@")[1]) for k in metrics[m] if k.startswith("recall@")}
        found |= {int(k) for k in (metrics[m].get("tailpatch") or {})}
    return sorted(found) or list(DEFAULT_KS)


def format_table(metrics: Mapping[str, Any]) -> str:
    """The headline Markdown table: one row per method, attribution then tail-patch Δlogprob/Δprob,
    after the model's first-token accuracy (and its warning) when the metrics hold it."""
    return "\n\n".join(accuracy_lines(metrics) + [method_table(metrics)])


def method_table(metrics: Mapping[str, Any]) -> str:
    """The Markdown table of `format_table` alone."""
    ks = _ks_of(metrics)
    methods = methods_of(metrics)
    has_tp = any(metrics[m].get("tailpatch") for m in methods)
    head = ["method", "MRR"] + [f"R@{k}" for k in ks]
    if has_tp:
        head += [f"Δlogp@{k}" for k in ks] + [f"Δp@{k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(head) - 1)) + "|"]
    for m in methods:
        d = metrics[m]
        row = [method_label(m), _fmt(d.get("mrr"))] + [_fmt(d.get(f"recall@{k}")) for k in ks]
        if has_tp:
            tp = d.get("tailpatch") or {}
            row += [_fmt((tp.get(str(k)) or {}).get("delta_logprob"), 4) for k in ks]
            row += [_fmt((tp.get(str(k)) or {}).get("delta_prob"), 4) for k in ks]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_bucket_table(metrics: Mapping[str, Any]) -> str:
    methods = [m for m in methods_of(metrics) if "by_bucket" in metrics[m]]
    buckets = sort_buckets({b for m in methods for b in metrics[m]["by_bucket"]})
    head = ["bucket", "n"] + [f"{method_label(m)} MRR" for m in methods] + [f"{method_label(m)} R@10" for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(head) - 1)) + "|"]
    for b in buckets:
        n = next((metrics[m]["by_bucket"][b]["n"] for m in methods if b in metrics[m]["by_bucket"]), 0)
        row = [b, str(n)]
        row += [_fmt((metrics[m]["by_bucket"].get(b) or {}).get("mrr")) for m in methods]
        row += [_fmt((metrics[m]["by_bucket"].get(b) or {}).get("recall@10")) for m in methods]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _plot(metrics: Mapping[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    methods = [m for m in methods_of(metrics) if "by_bucket" in metrics[m]]
    if methods:
        buckets = sort_buckets({b for m in methods for b in metrics[m]["by_bucket"]})
        cols = buckets + ["all"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        width = 0.8 / len(methods)
        x = np.arange(len(cols))
        for ax, key, title in ((axes[0], "mrr", "MRR"), (axes[1], "recall@10", "recall@10")):
            for j, m in enumerate(methods):
                vals = [(metrics[m]["by_bucket"].get(b) or {}).get(key, 0.0) for b in buckets] + [metrics[m].get(key, 0.0)]
                ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, label=method_label(m))
            ax.set_xticks(x, cols)
            ax.set_xlabel("bucket (documents stating the fact)")
            ax.set_title(f"Attribution: {title}")
            ax.set_ylim(0, 1)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "attribution_by_bucket.png", dpi=110)
        plt.close(fig)
        written.append("attribution_by_bucket.png")
    tp_methods = [m for m in methods_of(metrics) if metrics[m].get("tailpatch")]
    if tp_methods:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, title in ((axes[0], "delta_logprob", "Δ log p(target | prompt)"),
                               (axes[1], "delta_prob", "Δ p(target | prompt)")):
            for m in tp_methods:
                tp = metrics[m]["tailpatch"]
                ks = sorted(int(k) for k in tp)
                ax.plot(ks, [tp[str(k)][key] for k in ks], marker="o", label=method_label(m))
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("top-k proponents")
            ax.set_title(f"Tail-patch: {title}")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "tailpatch.png", dpi=110)
        plt.close(fig)
        written.append("tailpatch.png")
    return written


def write_report(metrics: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write metrics.json, report.md and the PNG plots into out_dir; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(out / "metrics.json")
    pngs = _plot(metrics, out)
    s = metrics.get("_settings") or {}
    tps = s.get("tailpatch") or {}
    model = metrics.get("model") or {}
    lines = ["# tracestar evaluation", ""]
    if model.get("accuracy_warning"):
        lines += [f"> **Warning:** {model['accuracy_warning']}.", ""]
    if s:
        acc_text = f" — first-token accuracy {_accuracy_text(model)}" if "first_token_accuracy" in model else ""
        lines += [f"- index: `{s.get('index')}` (preconditioner: {s.get('index_preconditioner')})",
                  f"- model: `{s.get('model')}`{acc_text}",
                  f"- queries: `{s.get('queries')}` — {s.get('n_queries')} queries, "
                  f"{s.get('n_queries_with_relevant')} with ground-truth documents"]
        for name, path in (s.get("variants") or {}).items():
            lines.append(f"- variant `{name}`: `{path}`")
        lines.append("")
    elif model:
        lines += accuracy_lines(metrics)[:1] + [""]
    lines += ["## Results", "",
              "Attribution: MRR of the first document that states the fact; R@k = share of queries with one in the top k. "
              "Influence (tail-patch): mean increase of the target's log-probability (Δlogp) and probability (Δp) "
              "after one training step on a single proponent, averaged over the top-k proponents and the queries.", "",
              method_table(metrics), ""]
    if tps:
        lines += [f"Tail-patch: one `{tps.get('optimizer')}` step (state: `{tps.get('optimizer_state')}`) at "
                  f"lr = {tps.get('lr'):g} on each proponent, dropout off, from the final checkpoint, restored "
                  f"between documents; {tps.get('n_queries')} queries (bucket-stratified sample), "
                  f"{tps.get('seconds')} s. {method_label('relevant')} = up to k of the documents that state the fact "
                  f"(the ground truth).", ""]
    if any("by_bucket" in metrics[m] for m in methods_of(metrics)):
        lines += ["## Attribution by bucket", "", format_bucket_table(metrics), ""]
    for p in pngs:
        lines += [f"![{p}]({p})", ""]
    if s.get("timings"):
        lines += ["Timings (s): " + ", ".join(f"{k} {v}" for k, v in s["timings"].items()), ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
