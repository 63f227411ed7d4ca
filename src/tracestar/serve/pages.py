"""Server-rendered pages of `tracestar serve` (a document's full text with its heat map).

Built like the static report: every value from the corpus or the request is escaped by the
report's own helpers, and the page carries no script at all.
"""

from __future__ import annotations

from tracestar.report.hits import hit_key
from tracestar.report.html import escape, hit_list


def document_page(engine, doc_id: str, query: dict, att) -> str:
    """One document, all of it: its heat map for the traced query (the positions the index
    scores) and, for a document longer than the index's max_length, the rest as plain text."""
    text = engine.docs.get(doc_id, "")
    tokens = [(t, s, att.is_special(i)) for i, (t, s) in enumerate(att.tokens)]
    span = {} if att.chunk is None else {"chunk": att.chunk, "start": att.start, "end": att.end}  # a window's place
    item = {"doc_id": doc_id, **span, "score": att.doc_score}
    heat = hit_list([item], engine.docs, {hit_key(item): tokens}, kind="proponents", open_first=1,
                    max_tokens=len(tokens) + 1, max_chars=len(text) + 1)
    shown = "".join(t for t, _, special in tokens if not special)
    rest = ""
    row = engine.index.store.row_of(doc_id)
    truncated = row is not None and engine.index.store.docs[row].truncated
    if truncated:
        tail = text[len(shown):] if text.startswith(shown) else None
        note = (f"The index scores the first {engine.index.max_length} tokens of a document (its max_length); "
                "the rest follows as plain text.")
        rest = f'<p class="legend">{escape(note)}</p>'
        if tail:
            rest += f'<div class="doc">{escape(tail)}</div>'
    which = "the whole continuation" if query.get("position") is None else f"token {query['position']} alone"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="referrer" content="no-referrer">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{escape(doc_id)} — tracestar</title>"
        '<link rel="stylesheet" href="/static/report.css"><link rel="stylesheet" href="/static/app.css">'
        '</head><body class="docpage"><main>'
        f'<h1 class="docid-title">{escape(doc_id)}</h1>'
        f'<p class="qtext"><span class="prompt">{escape(query.get("prompt") or "")}</span>'
        f'<span class="target" title="target">{escape(query.get("target") or "")}</span></p>'
        f'<p class="legend">Per-token contributions of this document to its score for {escape(which)} '
        "(they add up to the score) — "
        '<span class="heat p6">raises</span> <span class="heat n6">lowers</span>. '
        "Hover a token for its position and value.</p>"
        f"{heat}{rest}</main></body></html>\n"
    )
