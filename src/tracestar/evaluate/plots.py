"""The evaluation's two plots: MRR and recall@10 per bucket, and tail-patch Δ per k (PNG, matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tracestar.evaluate.metrics import sort_buckets
from tracestar.evaluate.summary import method_label, methods_of
from tracestar.files import replacing


def plot(metrics: Mapping[str, Any], out: Path) -> list[str]:
    """Write attribution_by_bucket.png and tailpatch.png (each when the metrics hold its data); their names."""
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
        written.append(_save(fig, out, "attribution_by_bucket.png"))
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
        written.append(_save(fig, out, "tailpatch.png"))
    return written


def _save(fig, out: Path, name: str) -> str:
    """Write one figure as `out/name` atomically (a killed run leaves no half-written plot); close it."""
    import matplotlib.pyplot as plt

    with replacing(out / name) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return name
