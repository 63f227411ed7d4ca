"""What an evaluation report says, built once from metrics.json and drawn by two renderers.

`summary(metrics, figures)` turns the metrics into a short list of blocks (the model's accuracy,
the settings, the results table, the tail-patch note, the bucket table, the plots, the timings).
`to_markdown` draws them as report.md here; `tracestar.report.html` draws the same blocks as the
report page's evaluation section. Neither renderer computes a figure or a label, so the terminal,
report.md and the HTML page cannot disagree, and nothing is ever parsed back from Markdown.

Cells and texts in the blocks are plain text: each renderer escapes them its own way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

from tracestar.evaluate.metrics import sort_buckets
from tracestar.options import DEFAULT_KS
#: How the tables and the plots name a method (metrics.json keeps the keys).
METHOD_LABELS = {"bm25": "BM25", "relevant": "fact-stating documents"}
#: Top-level keys of the metrics that are not methods (besides those starting with "_").
NOT_METHODS = frozenset({"model"})

ABOUT_ATTRIBUTION = ("Attribution: MRR of the first document that states the fact; R@k = share of queries with one "
                     "in the top k.")
ABOUT_INFLUENCE = ("Influence (tail-patch): mean increase of the target's log-probability (Δlogp) and probability "
                   "(Δp) after one training step on a single proponent, averaged over the top-k proponents and "
                   "the queries.")

#: A run of inline text: ("text", s) or ("code", s), so each renderer marks code its own way.
Inline = tuple[str, str]


@dataclass(frozen=True)
class Accuracy:
    """The model's first-token accuracy ("39.8%", "unknown"; None: not recorded) and eval's warning."""

    value: str | None
    n_queries: Any = None
    warning: str | None = None


@dataclass(frozen=True)
class Heading:
    text: str


@dataclass(frozen=True)
class Paragraph:
    parts: tuple[Inline, ...]


@dataclass(frozen=True)
class Bullets:
    items: tuple[tuple[Inline, ...], ...]


@dataclass(frozen=True)
class Table:
    """A table of text cells; columns from `numeric_from` on hold numbers (right-aligned)."""

    head: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric_from: int = 1


@dataclass(frozen=True)
class Figure:
    name: str  # a PNG file beside metrics.json


Block = Accuracy | Heading | Paragraph | Bullets | Table | Figure


# --- what the metrics hold --------------------------------------------------------------------------


def methods_of(metrics: Mapping[str, Any]) -> list[str]:
    """The method keys of a metrics dict, in order (not "model", not the "_" keys, only dict entries)."""
    return [m for m in metrics if not m.startswith("_") and m not in NOT_METHODS and isinstance(metrics[m], dict)]


def method_label(method: str) -> str:
    """The name a reader sees: "BM25", "fact-stating documents"; variants keep their own."""
    return METHOD_LABELS.get(method, method)


def ks_of(metrics: Mapping[str, Any]) -> list[int]:
    """The k of recall@k and tail-patch: as eval recorded them, else as the method entries hold them."""
    ks = (metrics.get("_settings") or {}).get("ks")
    if ks:
        return [int(k) for k in ks]
    found: set[int] = set()
    for m in methods_of(metrics):
        found |= {int(k[7:]) for k in metrics[m] if k.startswith("recall@") and k[7:].isdigit()}
        found |= {int(k) for k in (metrics[m].get("tailpatch") or {}) if str(k).isdigit()}
    return sorted(found) or list(DEFAULT_KS)


def number(x: Any, digits: int = 3) -> str:
    """A metric as text: fixed decimals, tiny values in e-notation, '–' when absent."""
    if x is None:
        return "–"
    if isinstance(x, float) and math.isfinite(x):
        return f"{x:.2e}" if x != 0 and abs(x) < 10**-digits else f"{x:.{digits}f}"
    return str(x)


def accuracy_of(metrics: Mapping[str, Any]) -> Accuracy:
    """The "model" entry as a block; `value` None when metrics.json does not record the accuracy."""
    model = metrics.get("model")
    if not isinstance(model, Mapping) or "first_token_accuracy" not in model:
        return Accuracy(None)
    acc = model["first_token_accuracy"]
    known = isinstance(acc, (int, float)) and not isinstance(acc, bool) and math.isfinite(acc)
    warning = model.get("accuracy_warning")
    return Accuracy(f"{acc:.1%}" if known else "unknown", model.get("n_queries"),
                    str(warning).rstrip(".") if warning else None)


# --- the tables -------------------------------------------------------------------------------------


def results_table(metrics: Mapping[str, Any]) -> Table:
    """One row per method: MRR and recall@k, then tail-patch Δlogprob@k and Δprob@k when measured."""
    ks, methods = ks_of(metrics), methods_of(metrics)
    has_tp = any(metrics[m].get("tailpatch") for m in methods)
    head = ["method", "MRR"] + [f"R@{k}" for k in ks]
    if has_tp:
        head += [f"Δlogp@{k}" for k in ks] + [f"Δp@{k}" for k in ks]
    rows = []
    for m in methods:
        d = metrics[m]
        row = [method_label(m), number(d.get("mrr"))] + [number(d.get(f"recall@{k}")) for k in ks]
        if has_tp:
            tp = d.get("tailpatch") or {}
            row += [number((tp.get(str(k)) or {}).get("delta_logprob"), 4) for k in ks]
            row += [number((tp.get(str(k)) or {}).get("delta_prob"), 4) for k in ks]
        rows.append(tuple(row))
    return Table(tuple(head), tuple(rows))


def bucket_table(metrics: Mapping[str, Any]) -> Table | None:
    """One row per bucket: its query count, then each method's MRR and R@10; None without buckets."""
    methods = [m for m in methods_of(metrics) if isinstance(metrics[m].get("by_bucket"), dict)]
    if not methods:
        return None
    buckets = sort_buckets({b for m in methods for b in metrics[m]["by_bucket"]})
    head = ["bucket", "n"] + [f"{method_label(m)} MRR" for m in methods] + [f"{method_label(m)} R@10" for m in methods]
    rows = []
    for b in buckets:
        cells = [metrics[m]["by_bucket"].get(b) or {} for m in methods]
        n = next((c["n"] for c in cells if "n" in c), 0)
        rows.append((b, str(n), *[number(c.get("mrr")) for c in cells], *[number(c.get("recall@10")) for c in cells]))
    return Table(tuple(head), tuple(rows))


# --- the report -------------------------------------------------------------------------------------


def _settings(s: Mapping[str, Any]) -> Bullets | None:
    items: list[tuple[Inline, ...]] = []
    if s.get("index") is not None:
        items.append((("text", "index: "), ("code", str(s["index"])),
                      ("text", f" (preconditioner: {s.get('index_preconditioner')})")))
    if s.get("model") is not None:
        items.append((("text", "model: "), ("code", str(s["model"]))))
    if s.get("queries") is not None:
        items.append((("text", "queries: "), ("code", str(s["queries"])),
                      ("text", (f" — {s.get('n_queries')} queries, {s.get('n_queries_with_relevant')} with "
                                f"ground-truth documents"))))
    for name, path in (s.get("variants") or {}).items():
        items.append((("text", "variant "), ("code", str(name)), ("text", ": "), ("code", str(path))))
    return Bullets(tuple(items)) if items else None


def _tailpatch_note(tps: Mapping[str, Any]) -> Paragraph:
    lr = tps.get("lr")
    lr_text = f"{lr:g}" if isinstance(lr, (int, float)) else str(lr)
    return Paragraph((
        ("text", "Tail-patch: one "), ("code", str(tps.get("optimizer"))), ("text", " step (state: "),
        ("code", str(tps.get("optimizer_state"))),
        ("text", (f") at lr = {lr_text} on each proponent, dropout off, from the final checkpoint, restored "
                  f"between documents; {tps.get('n_queries')} queries (bucket-stratified sample), "
                  f"{tps.get('seconds')} s. “{method_label('relevant')}” = up to k of the documents that state the "
                  f"fact (the ground truth).")),
    ))


def summary(metrics: Mapping[str, Any], figures: Sequence[str] = ()) -> list[Block]:
    """The report of an evaluation as blocks, in reading order; `figures`: PNG names to show."""
    s = metrics.get("_settings") if isinstance(metrics.get("_settings"), dict) else {}
    blocks: list[Block] = [accuracy_of(metrics)]
    settings = _settings(s)
    if settings is not None:
        blocks.append(settings)
    methods = methods_of(metrics)
    if methods:
        about = ABOUT_ATTRIBUTION
        if any(metrics[m].get("tailpatch") for m in methods):
            about += " " + ABOUT_INFLUENCE
        blocks += [Heading("Results"), Paragraph((("text", about),)), results_table(metrics)]
    if isinstance(s.get("tailpatch"), dict):
        blocks.append(_tailpatch_note(s["tailpatch"]))
    buckets = bucket_table(metrics)
    if buckets is not None:
        blocks += [Heading("Attribution by bucket"), buckets]
    blocks += [Figure(name) for name in figures]
    if isinstance(s.get("timings"), dict) and s["timings"]:
        blocks.append(Paragraph((("text", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in s["timings"].items())),)))
    return blocks


# --- Markdown ---------------------------------------------------------------------------------------


def _md_inline(parts: Sequence[Inline]) -> str:
    return "".join(f"`{text}`" if style == "code" else text for style, text in parts)


def _md_table(table: Table) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    align = [" --- " if j < table.numeric_from else " ---: " for j in range(len(table.head))]
    return "\n".join([line(table.head), "|" + "|".join(align) + "|", *map(line, table.rows)])


def _md_accuracy(acc: Accuracy) -> list[str]:
    if acc.value is None:
        return ["Model: first-token accuracy not recorded in metrics.json."]
    lines = [f"> **Warning:** {acc.warning}.", ""] if acc.warning else []
    n = f"on {acc.n_queries} queries" if acc.n_queries is not None else "on the evaluation queries"
    return lines + [f"Model: first-token accuracy {acc.value} {n}."]


def _md_block(block: Block) -> list[str]:
    if isinstance(block, Accuracy):
        return _md_accuracy(block)
    if isinstance(block, Heading):
        return [f"## {block.text}"]
    if isinstance(block, Paragraph):
        return [_md_inline(block.parts)]
    if isinstance(block, Bullets):
        return [f"- {_md_inline(item)}" for item in block.items]
    if isinstance(block, Table):
        return [_md_table(block)]
    return [f"![{block.name}]({block.name})"]


def to_markdown(blocks: Sequence[Block], title: str = "tracestar evaluation") -> str:
    """report.md: a title, then each block followed by a blank line."""
    lines = [f"# {title}", ""]
    for block in blocks:
        lines += _md_block(block) + [""]
    return "\n".join(lines)


def accuracy_lines(metrics: Mapping[str, Any]) -> list[str]:
    """For the terminal: the model's first-token accuracy and, when it is too low or unknown, the
    warning; no lines when the metrics hold no "model" entry (`evaluate_results` alone knows no model)."""
    acc = accuracy_of(metrics)
    if acc.value is None:
        return []
    n = acc.n_queries if acc.n_queries is not None else "?"
    lines = [f"model: first-token accuracy {acc.value} on {n} queries (greedy next token after the prompt = the "
             f"target's first token)"]
    if acc.warning:
        lines.append(f"WARNING: {acc.warning}.")
    return lines


def format_table(metrics: Mapping[str, Any]) -> str:
    """The headline for the terminal: the model's accuracy (and its warning) when the metrics hold it,
    then the results table in Markdown."""
    return "\n\n".join(accuracy_lines(metrics) + [_md_table(results_table(metrics))])
