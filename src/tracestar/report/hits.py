"""Ranked document lists as HTML: rank, id, a score bar, and the text or a per-token heat map.

The report's query sections and `tracestar serve`'s pages draw their lists here, so one escaping
and one heat map serve both. Every value that comes from a corpus or a query is escaped
(`escape`) before it enters the markup.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_HEAT_LEVELS = 8  # colour steps per sign; tokens are binned per document by |score| / max |score|

# one position of a heat map: (text, score) or (text, score, is a special token of the tokenizer)
Token = tuple[str, float] | tuple[str, float, bool]


def escape(value: Any) -> str:
    """Escape any value for HTML text or a double-quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_score(x: float) -> str:
    """A score as the report shows it: four significant digits."""
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _heat_tokens(tokens: Sequence[Token], max_tokens: int) -> str:
    """Per-token heat map: class `heat` plus `p<k>` / `n<k>` for the colour level, position and value in title.

    `tokens` holds one entry per position, `(text, score)` or `(text, score, special)`. Special tokens
    of the tokenizer (`<|endoftext|>` and the like) are not shown, but they keep their position, so
    the titles give the same positions as `tracestar explain`.
    """
    shown = [(i, str(t[0]), float(t[1])) for i, t in enumerate(tokens[:max_tokens]) if not _is_special(t)]
    finite = [abs(s) for _, _, s in shown if math.isfinite(s)]
    top = max(finite, default=0.0)
    out = []
    for i, tok, s in shown:
        if top > 0 and math.isfinite(s) and s != 0:
            level = max(1, min(_HEAT_LEVELS, math.ceil(abs(s) / top * _HEAT_LEVELS)))
            cls = f"heat {'p' if s > 0 else 'n'}{level}"
        else:
            cls = "heat z"
        out.append(f'<span class="{cls}" title="{escape(f"position {i}: {s:+.3g}")}">{escape(tok)}</span>')
    rest = [t for t in tokens[max_tokens:] if not _is_special(t)]
    if rest:
        rest_sum = sum(float(t[1]) for t in rest)
        out.append(
            f'<span class="trunc">… {len(rest)} more tokens not shown (their sum {escape(f"{rest_sum:+.3g}")})</span>'
        )
    return "".join(out)


def _is_special(token: Token) -> bool:
    return len(token) > 2 and bool(token[2])


def _plain_text(text: str | None, max_chars: int) -> str:
    if text is None:
        return '<span class="missing">(document text not available)</span>'
    if len(text) > max_chars:
        return escape(text[:max_chars]) + f'<span class="trunc">… {len(text) - max_chars} more characters</span>'
    return escape(text)


def _bar(score: float, scale: float) -> str:
    width = 0.0
    if scale > 0 and math.isfinite(score):
        width = min(100.0, abs(score) / scale * 100.0)
    sign = "pos" if score >= 0 else "neg"
    return f'<span class="bar"><span class="fill {sign}" style="width:{width:.1f}%"></span></span>'


def _doc_entry(
    rank: int,
    item: Mapping[str, Any],
    docs: Mapping[str, str],
    tokens: Sequence[Token] | None,
    scale: float,
    *,
    marks: set[str],
    open_: bool,
    max_tokens: int,
    max_chars: int,
    link: str | None = None,
) -> str:
    doc_id = str(item.get("doc_id"))
    score = float(item.get("score", float("nan")))
    extra = '<span class="tsum"></span>'
    if tokens is not None:
        total = sum(float(t[1]) for t in tokens)
        hidden = [float(t[1]) for t in tokens if _is_special(t)]
        note = "sum of per-token contributions"
        if hidden:
            note += f"; {len(hidden)} special token(s) not shown contribute {sum(hidden):+.3g}"
        body = f'<div class="doc heatmap">{_heat_tokens(tokens, max_tokens)}</div>'
        extra = f'<span class="tsum" title="{escape(note)}">Σ tok {escape(fmt_score(total))}</span>'
    else:
        body = f'<div class="doc">{_plain_text(docs.get(doc_id), max_chars)}</div>'
    if link is not None:  # the document's own page (`tracestar serve`); the URL is escaped like any value
        body += f'<a class="fulltext" href="{escape(link)}" target="_blank" rel="noopener noreferrer">full text ↗</a>'
    badge = '<span class="badge" title="in both the TrackStar and BM25 lists">both</span>' if doc_id in marks else ""
    return (
        f'<li class="hit"><details{" open" if open_ else ""}><summary>'
        f'<span class="rank">{rank}</span>'
        f'<span class="docid" title="{escape(doc_id)}">{escape(doc_id)}</span>{_span_label(item)}'
        f"{_bar(score, scale)}"
        f'<span class="score">{escape(fmt_score(score))}</span>{extra}<span class="mark">{badge}</span>'
        f"</summary>{body}</details></li>"
    )


def _span_label(item: Mapping[str, Any]) -> str:
    """A window's place in its document (index built with --chunk-tokens), e.g. "#2 tokens 256–512"."""
    if item.get("chunk") is None:
        return ""
    where = f"chunk {item['chunk']}: tokens {item.get('start')}–{item.get('end')}"
    return (f'<span class="span" title="{escape(where + " of the document (the text below is the whole document)")}">'
            f'#{escape(item["chunk"])} [{escape(item.get("start"))}, {escape(item.get("end"))})</span>')


def hit_key(item: Mapping[str, Any]) -> str | tuple[str, int]:
    """What a hit's per-token scores are keyed by (`explain_pairs` keys them so): its doc id, or
    (doc id, chunk) for a window of an index built with --chunk-tokens (`DocRow.key`)."""
    doc_id = str(item.get("doc_id"))
    return doc_id if item.get("chunk") is None else (doc_id, int(item["chunk"]))


def doc_list(
    items: Sequence[Mapping[str, Any]],
    query_id: str,
    docs: Mapping[str, str],
    token_scores: Mapping[tuple[str, str | tuple[str, int]], Sequence[Token]] | None,
    *,
    kind: str,
    scale: float,
    marks: set[str],
    open_first: int,
    max_tokens: int,
    max_chars: int,
    links: Mapping[str | tuple[str, int], str] | None = None,
) -> str:
    if not items:
        return f'<p class="empty">no {kind}</p>'
    rows = []
    for rank, item in enumerate(items, 1):
        toks = None
        if token_scores is not None:
            toks = token_scores.get((query_id, hit_key(item)))
        rows.append(
            _doc_entry(
                rank, item, docs, toks, scale, marks=marks, open_=rank <= open_first,
                max_tokens=max_tokens, max_chars=max_chars, link=(links or {}).get(hit_key(item)),
            )
        )
    return f'<ol class="hits {kind}">{"".join(rows)}</ol>'


def hit_list(
    items: Sequence[Mapping[str, Any]],
    docs: Mapping[str, str],
    token_scores: Mapping[str | tuple[str, int], Sequence[Token]] | None = None,
    *,
    kind: str,
    scale: float | None = None,
    links: Mapping[str | tuple[str, int], str] | None = None,
    marks: set[str] | frozenset[str] = frozenset(),
    open_first: int = 3,
    max_tokens: int = 3000,
    max_chars: int = 20000,
) -> str:
    """A ranked list of documents drawn as the report draws it (rank, id, score bar, per-token heat
    map or escaped text), for pages that show results outside a report (`tracestar serve`), so one
    escaping and one heat map serve both. token_scores: doc_id -> tokens; links: doc_id -> URL of the
    document's own page (both keyed by (doc_id, chunk) for a window: `hit_key`); scale: the score that fills a bar (default: the largest |score| here).
    """
    keyed = None if token_scores is None else {("", d if isinstance(d, tuple) else str(d)): t
                                               for d, t in token_scores.items()}
    return doc_list(
        items, "", docs, keyed, kind=kind, scale=score_scale(items) if scale is None else scale, marks=set(marks),
        open_first=open_first, max_tokens=max_tokens, max_chars=max_chars, links=links,
    )


def score_scale(*lists: Iterable[Mapping[str, Any]]) -> float:
    vals = [abs(float(it.get("score", 0.0))) for lst in lists for it in lst]
    vals = [v for v in vals if math.isfinite(v)]
    return max(vals, default=0.0)
