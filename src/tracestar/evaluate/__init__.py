"""The paper's evaluation (docs/ARCHITECTURE.md, “Evaluation”): attribution metrics, the
BM25 baseline, tail-patch, the report.

    from tracestar.evaluate import evaluate
    metrics = evaluate("index/", "queries.jsonl", "report/", bm25=True, tail_patch=True, max_queries=150)

- `metrics`: MRR and recall@k, overall and per bucket (`attribution_metrics`, `mrr`, `recall_at_k`)
- `bm25`: BM25 over the document text, query = prompt + target (`BM25Retriever`, `bm25_results`)
- `tailpatch`: one training step per proponent, Δ log p(target | prompt) (`TailPatcher`, `tail_patch`)
- `run`: `evaluate` (index + queries -> metrics.json, report.md, PNG plots), `write_report`
- `summary`: what a report says, built once from metrics.json (report.md here, HTML in `tracestar.report`);
  `plots`: its PNG plots
- `demo`: `run_demo` (world -> train -> index -> evaluate, cached)
- `lds`: `run_lds` (linear datamodeling score: retrain on subsets, Spearman of predicted vs actual)
"""

from tracestar.evaluate.metrics import attribution_metrics, mrr, recall_at_k

__all__ = ["attribution_metrics", "mrr", "recall_at_k", "BM25Retriever", "bm25_results", "TailPatcher",
           "tail_patch", "evaluate", "evaluate_results", "write_report", "format_table", "run_demo", "run_lds"]

_LAZY = {
    "BM25Retriever": "tracestar.evaluate.bm25", "bm25_results": "tracestar.evaluate.bm25",
    "TailPatcher": "tracestar.evaluate.tailpatch", "tail_patch": "tracestar.evaluate.tailpatch",
    "evaluate": "tracestar.evaluate.run", "evaluate_results": "tracestar.evaluate.run",
    "write_report": "tracestar.evaluate.run", "format_table": "tracestar.evaluate.run",
    "run_demo": "tracestar.evaluate.demo",
    "run_lds": "tracestar.evaluate.lds",
}


def __getattr__(name: str):
    """Import torch-heavy parts (tail-patch, the demo) only when asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
