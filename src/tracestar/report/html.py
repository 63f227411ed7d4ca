"""One self-contained HTML file showing, per query, the proponents and opponents TrackStar found.

`render_report` works on plain dicts and needs no model or index (an eval directory's section
takes its method labels from `tracestar.evaluate.run`, so the page and the printed table agree);
`build_report` loads an index's corpus and (optionally) per-token explanations and then calls it.

Everything that comes from the corpus or the queries is untrusted. It is HTML-escaped before it
enters the page, and no data is embedded as inline JSON or script: the page is rendered on the
server side, and the one inline script (search and navigation) reads only `data-*` attributes and
`textContent`. A Content-Security-Policy meta tag allows that one script by its hash, inline
styles, and `data:` images, and nothing else (no network at all).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

_HEAT_LEVELS = 8  # colour steps per sign; tokens are binned per document by |score| / max |score|
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# one position of a heat map: (text, score) or (text, score, is a special token of the tokenizer)
Token = tuple[str, float] | tuple[str, float, bool]


def _esc(value: Any) -> str:
    """Escape any value for HTML text or a double-quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


# --------------------------------------------------------------------------------------------------
# pieces


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
        out.append(f'<span class="{cls}" title="{_esc(f"position {i}: {s:+.3g}")}">{_esc(tok)}</span>')
    rest = [t for t in tokens[max_tokens:] if not _is_special(t)]
    if rest:
        rest_sum = sum(float(t[1]) for t in rest)
        out.append(
            f'<span class="trunc">… {len(rest)} more tokens not shown (their sum {_esc(f"{rest_sum:+.3g}")})</span>'
        )
    return "".join(out)


def _is_special(token: Token) -> bool:
    return len(token) > 2 and bool(token[2])


def _plain_text(text: str | None, max_chars: int) -> str:
    if text is None:
        return '<span class="missing">(document text not available)</span>'
    if len(text) > max_chars:
        return _esc(text[:max_chars]) + f'<span class="trunc">… {len(text) - max_chars} more characters</span>'
    return _esc(text)


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
        extra = f'<span class="tsum" title="{_esc(note)}">Σ tok {_esc(_fmt(total))}</span>'
    else:
        body = f'<div class="doc">{_plain_text(docs.get(doc_id), max_chars)}</div>'
    if link is not None:  # the document's own page (`tracestar serve`); the URL is escaped like any value
        body += f'<a class="fulltext" href="{_esc(link)}" target="_blank" rel="noopener noreferrer">full text ↗</a>'
    badge = '<span class="badge" title="in both the TrackStar and BM25 lists">both</span>' if doc_id in marks else ""
    return (
        f'<li class="hit"><details{" open" if open_ else ""}><summary>'
        f'<span class="rank">{rank}</span>'
        f'<span class="docid" title="{_esc(doc_id)}">{_esc(doc_id)}</span>'
        f"{_bar(score, scale)}"
        f'<span class="score">{_esc(_fmt(score))}</span>{extra}<span class="mark">{badge}</span>'
        f"</summary>{body}</details></li>"
    )


def _doc_list(
    items: Sequence[Mapping[str, Any]],
    query_id: str,
    docs: Mapping[str, str],
    token_scores: Mapping[tuple[str, str], Sequence[Token]] | None,
    *,
    kind: str,
    scale: float,
    marks: set[str],
    open_first: int,
    max_tokens: int,
    max_chars: int,
    links: Mapping[str, str] | None = None,
) -> str:
    if not items:
        return f'<p class="empty">no {kind}</p>'
    rows = []
    for rank, item in enumerate(items, 1):
        toks = None
        if token_scores is not None:
            toks = token_scores.get((query_id, str(item.get("doc_id"))))
        rows.append(
            _doc_entry(
                rank, item, docs, toks, scale, marks=marks, open_=rank <= open_first,
                max_tokens=max_tokens, max_chars=max_chars, link=(links or {}).get(str(item.get("doc_id"))),
            )
        )
    return f'<ol class="hits {kind}">{"".join(rows)}</ol>'


def hit_list(
    items: Sequence[Mapping[str, Any]],
    docs: Mapping[str, str],
    token_scores: Mapping[str, Sequence[Token]] | None = None,
    *,
    kind: str,
    scale: float | None = None,
    links: Mapping[str, str] | None = None,
    marks: set[str] | frozenset[str] = frozenset(),
    open_first: int = 3,
    max_tokens: int = 3000,
    max_chars: int = 20000,
) -> str:
    """A ranked list of documents drawn as the report draws it (rank, id, score bar, per-token heat
    map or escaped text), for pages that show results outside a report (`tracestar serve`), so one
    escaping and one heat map serve both. token_scores: doc_id -> tokens; links: doc_id -> URL of the
    document's own page; scale: the score that fills a bar (default: the largest |score| here).
    """
    keyed = None if token_scores is None else {("", str(d)): t for d, t in token_scores.items()}
    return _doc_list(
        items, "", docs, keyed, kind=kind, scale=_scale(items) if scale is None else scale, marks=set(marks),
        open_first=open_first, max_tokens=max_tokens, max_chars=max_chars, links=links,
    )


def _scale(*lists: Iterable[Mapping[str, Any]]) -> float:
    vals = [abs(float(it.get("score", 0.0))) for lst in lists for it in lst]
    vals = [v for v in vals if math.isfinite(v)]
    return max(vals, default=0.0)


def _query_section(
    idx: int,
    res: Mapping[str, Any],
    docs: Mapping[str, str],
    token_scores,
    bm25_hits: Sequence[Mapping[str, Any]] | None,
    *,
    max_tokens: int,
    max_chars: int,
) -> str:
    qid = str(res.get("query_id", f"#{idx}"))
    prompt, target = res.get("prompt"), res.get("target")
    pros = list(res.get("proponents") or [])
    opps = list(res.get("opponents") or [])
    scale = _scale(pros, opps)
    ts_ids = {str(it.get("doc_id")) for it in pros}
    bm_ids = {str(it.get("doc_id")) for it in (bm25_hits or [])}
    both = ts_ids & bm_ids

    qtext = ""
    if prompt is not None or target is not None:
        qtext = (
            f'<p class="qtext"><span class="prompt">{_esc(prompt or "")}</span>'
            f'<span class="target" title="target">{_esc(target or "")}</span></p>'
        )
    common = dict(max_tokens=max_tokens, max_chars=max_chars)
    pro_html = _doc_list(pros, qid, docs, token_scores, kind="proponents", scale=scale, marks=both,
                         open_first=3, **common)
    opp_html = _doc_list(opps, qid, docs, token_scores, kind="opponents", scale=scale, marks=set(),
                         open_first=0, **common)
    cols = f'<div class="col"><h3>TrackStar proponents</h3>{pro_html}</div>'
    if bm25_hits is not None:
        bm_html = _doc_list(list(bm25_hits), qid, docs, None, kind="bm25", scale=_scale(bm25_hits),
                            marks=both, open_first=0, **common)
        cols += f'<div class="col"><h3>BM25</h3>{bm_html}</div>'
    return (
        f'<section class="query" id="q{idx}" data-qi="{idx}">'
        f'<h2><span class="qid">{_esc(qid)}</span></h2>{qtext}'
        f'<div class="cols{" two" if bm25_hits is not None else ""}">{cols}</div>'
        f'<details class="opps"><summary>Opponents ({len(opps)})</summary>{opp_html}</details>'
        f"</section>"
    )


def _sidebar_item(idx: int, res: Mapping[str, Any]) -> str:
    qid = str(res.get("query_id", f"#{idx}"))
    prompt, target = res.get("prompt") or "", res.get("target") or ""
    search = " ".join([qid, prompt, target]).lower()
    label = (prompt + " " + target).strip()
    if len(label) > 90:
        label = label[:90] + "…"
    return (
        f'<li data-qi="{idx}" data-search="{_esc(search)}"><a href="#q{idx}">'
        f'<span class="qid">{_esc(qid)}</span><span class="qlabel">{_esc(label)}</span></a></li>'
    )


# --------------------------------------------------------------------------------------------------
# evaluation directory
#
# Drawn from metrics.json through `tracestar.evaluate.summary`, the blocks report.md is drawn from
# too: the figures and labels are computed once, and here every value is escaped into real elements.


def _inline(parts: Sequence[tuple[str, str]]) -> str:
    return "".join(f"<code>{_esc(text)}</code>" if style == "code" else _esc(text) for style, text in parts)


def _table(table) -> str:
    """A `summary.Table` as HTML; columns from `numeric_from` on are right-aligned."""
    def row(cells: Sequence[str], tag: str) -> str:
        attrs = ["" if j < table.numeric_from else ' class="num"' for j in range(len(cells))]
        return "<tr>" + "".join(f"<{tag}{a}>{_esc(c)}</{tag}>" for a, c in zip(attrs, cells)) + "</tr>"

    return f'<table class="md">{row(table.head, "th")}{"".join(row(r, "td") for r in table.rows)}</table>'


def _accuracy(acc) -> str:
    """A `summary.Accuracy` as a sentence, and the warning eval attached to it in a note box."""
    if acc.value is None:
        return '<p class="accuracy">Model: first-token accuracy not recorded in metrics.json.</p>'
    on = f"on {_esc(acc.n_queries)} queries" if acc.n_queries is not None else "on the evaluation queries"
    out = f'<p class="accuracy">Model: first-token accuracy <strong>{_esc(acc.value)}</strong> {on}.</p>'
    if acc.warning:
        text = acc.warning[:1].upper() + acc.warning[1:]
        out += f'<p class="warn" role="note"><strong>Warning:</strong> {_esc(text)}.</p>'
    return out


def _figure(eval_dir: Path, name: str) -> str:
    data = (eval_dir / name).read_bytes()
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{_esc(name)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{_esc(name)}</figcaption></figure>")


def _block(block, eval_dir: Path) -> str:
    from tracestar.evaluate import summary as sm

    if isinstance(block, sm.Accuracy):
        return _accuracy(block)
    if isinstance(block, sm.Heading):
        return f"<h3>{_esc(block.text)}</h3>"
    if isinstance(block, sm.Paragraph):
        return f"<p>{_inline(block.parts)}</p>"
    if isinstance(block, sm.Bullets):
        return f'<ul class="settings">{"".join(f"<li>{_inline(item)}</li>" for item in block.items)}</ul>'
    if isinstance(block, sm.Table):
        return _table(block)
    return _figure(eval_dir, block.name)


def model_accuracy_note(metrics: Mapping[str, Any]) -> str:
    """The model's first-token accuracy (and the warning eval attached to it) as HTML; says so
    when metrics.json does not record it."""
    from tracestar.evaluate.summary import accuracy_of

    return _accuracy(accuracy_of(metrics))


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        rows = []
        for k, v in obj.items():
            rows.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return rows
    return [(prefix, obj)]


def read_metrics(eval_dir: str | Path) -> dict | None:
    """metrics.json of an eval directory, or None when there is none or it is not a JSON object."""
    try:
        metrics = json.loads((Path(eval_dir) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def _pngs(eval_dir: Path) -> list[str]:
    """The PNG files of an eval directory, by name; a file that only says it is a PNG is left out."""
    names = []
    for png in sorted(eval_dir.glob("*.png")):
        with open(png, "rb") as fh:
            if fh.read(len(_PNG_MAGIC)) == _PNG_MAGIC:
                names.append(png.name)
    return names


def _eval_section(eval_dir: str | Path) -> str:
    from tracestar.evaluate.summary import summary

    d = Path(eval_dir)
    metrics = read_metrics(d)
    if metrics is None:  # the plots alone
        parts = [_figure(d, name) for name in _pngs(d)]
        if (d / "metrics.json").exists():
            parts.insert(0, '<p class="missing">metrics.json is unreadable or not a JSON object</p>')
    else:
        parts = [_block(b, d) for b in summary(metrics, _pngs(d))]
        rows = "".join(
            f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v) if isinstance(v, float) else json.dumps(v))}</td></tr>"
            for k, v in _flatten(metrics)
        )
        parts.append(f'<details class="metrics"><summary>metrics.json</summary><table class="md">{rows}</table></details>')
    if not parts:
        parts.append(f'<p class="missing">no metrics.json or plots in {_esc(d)}</p>')
    return f'<section class="query evaluation" id="evaluation"><h2>Evaluation results</h2>{"".join(parts)}</section>'


# --------------------------------------------------------------------------------------------------
# page

_CSS = """
*{box-sizing:border-box}
html,body{margin:0;height:100%}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2330;background:#f4f5f8;display:flex}
#side{width:300px;min-width:220px;height:100vh;display:flex;flex-direction:column;background:#fff;border-right:1px solid #d9dce3}
#side header{padding:12px 12px 8px;border-bottom:1px solid #e4e6eb}
#side h1{font-size:15px;margin:0 0 8px}
#search{width:100%;padding:6px 8px;font:inherit;border:1px solid #b9bfcc;border-radius:6px}
#count{font-size:12px;color:#667;margin-top:4px}
#qlist{list-style:none;margin:0;padding:0;overflow-y:auto;flex:1}
#qlist li a{display:block;padding:6px 12px;color:inherit;text-decoration:none;border-bottom:1px solid #f0f1f4}
#qlist li a:hover,#qlist li.cur a{background:#e9effd}
#qlist .qid{display:block;font-weight:600;font-size:12px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
#qlist .qlabel{display:block;font-size:12px;color:#555;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
main{flex:1;height:100vh;overflow-y:auto;padding:16px 24px 64px}
.query{background:#fff;border:1px solid #d9dce3;border-radius:8px;padding:12px 16px;margin:0 0 16px;content-visibility:auto;contain-intrinsic-size:auto 500px}
.query h2{font-size:16px;margin:0 0 4px}
.qtext{margin:0 0 8px;font-size:15px;white-space:pre-wrap;overflow-wrap:anywhere}
.qtext .prompt{color:#333}
.qtext .target{background:#fff1b8;border-bottom:2px solid #e0b400;margin-left:4px;font-weight:600}
.cols{display:grid;grid-template-columns:minmax(0,1fr);gap:16px}
.cols.two{grid-template-columns:minmax(0,2fr) minmax(0,1fr)}
.cols.two .col+.col .docid{width:9em}
.col h3{font-size:13px;text-transform:uppercase;letter-spacing:.04em;color:#556;margin:8px 0 4px}
ol.hits{list-style:none;margin:0;padding:0}
.hit{border-top:1px solid #eef0f3}
.hit summary{display:flex;align-items:center;gap:8px;padding:4px 2px;cursor:pointer}
.rank{width:22px;text-align:right;color:#889;font-size:12px;flex:none}
.docid{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;width:13em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;flex:none}
.bar{flex:1;min-width:60px;height:10px;background:#eef0f3;border-radius:5px;overflow:hidden}
.fill{display:block;height:100%}
.fill.pos{background:#2e8b57}.fill.neg{background:#c0392b}
.score{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;width:5.5em;text-align:right;flex:none}
.tsum{font-size:11px;color:#778;flex:none;width:8.5em;white-space:nowrap}
ol.bm25 .tsum{display:none}
.mark{flex:none;width:3em}
.badge{font-size:10px;background:#e3e8f7;color:#345;border-radius:8px;padding:0 6px}
.doc{margin:2px 0 8px 30px;padding:8px 10px;background:#fafbfc;border:1px solid #eceef2;border-radius:6px;white-space:pre-wrap;overflow-wrap:anywhere;font-size:13.5px;max-height:22em;overflow-y:auto}
.heat{border-radius:2px}
.heat.z{background:transparent}
.p1{background:rgba(46,160,90,.10)}.p2{background:rgba(46,160,90,.18)}.p3{background:rgba(46,160,90,.27)}.p4{background:rgba(46,160,90,.36)}
.p5{background:rgba(46,160,90,.46)}.p6{background:rgba(46,160,90,.56)}.p7{background:rgba(46,160,90,.68)}.p8{background:rgba(46,160,90,.80)}
.n1{background:rgba(214,60,50,.10)}.n2{background:rgba(214,60,50,.18)}.n3{background:rgba(214,60,50,.27)}.n4{background:rgba(214,60,50,.36)}
.n5{background:rgba(214,60,50,.46)}.n6{background:rgba(214,60,50,.56)}.n7{background:rgba(214,60,50,.68)}.n8{background:rgba(214,60,50,.80)}
.heat:hover{outline:1px solid #333}
.trunc,.missing,.empty{color:#889;font-style:italic}
details.opps>summary{cursor:pointer;margin-top:8px;font-size:13px;color:#556;font-weight:600}
.legend{font-size:12px;color:#556;margin:0 0 12px}
.legend .heat{padding:0 4px}
table.md{border-collapse:collapse;margin:8px 0;font-size:13px}
table.md th,table.md td{border:1px solid #d9dce3;padding:3px 8px;text-align:left}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #e4e6eb}figcaption{font-size:12px;color:#667}
pre{background:#fafbfc;padding:8px;overflow-x:auto}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;background:#f0f2f5;padding:0 3px;border-radius:3px}
table.md td.num,table.md th.num{text-align:right}
.evaluation ul{margin:4px 0 8px;padding-left:20px}.evaluation h3{font-size:14px;margin:14px 0 4px}
.accuracy{margin:4px 0}
.warn{background:#fff4e5;border:1px solid #f0b46a;border-radius:6px;padding:6px 10px;margin:6px 0;color:#6b3d00}
.hidden{display:none!important}
@media (max-width:900px){.cols.two{grid-template-columns:minmax(0,1fr)}#side{width:220px}}
"""

_JS = """
(function(){
  var input=document.getElementById('search');
  var items=Array.prototype.slice.call(document.querySelectorAll('#qlist li[data-qi]'));
  var sections={};
  Array.prototype.forEach.call(document.querySelectorAll('section.query[data-qi]'),function(s){sections[s.getAttribute('data-qi')]=s;});
  var count=document.getElementById('count');
  function apply(){
    var terms=input.value.toLowerCase().split(/\\s+/).filter(function(t){return t.length>0;});
    var shown=0;
    items.forEach(function(li){
      var hay=li.getAttribute('data-search')||'';
      var ok=terms.every(function(t){return hay.indexOf(t)>=0;});
      li.classList.toggle('hidden',!ok);
      var s=sections[li.getAttribute('data-qi')];
      if(s){s.classList.toggle('hidden',!ok);}
      if(ok){shown++;}
    });
    count.textContent=shown+' of '+items.length+' queries';
  }
  input.addEventListener('input',apply);
  document.addEventListener('keydown',function(e){
    if(e.key==='/'&&document.activeElement!==input){e.preventDefault();input.focus();input.select();}
    else if(e.key==='Escape'&&document.activeElement===input){input.value='';apply();}
  });
  items.forEach(function(li){
    li.addEventListener('click',function(){
      items.forEach(function(o){o.classList.remove('cur');});
      li.classList.add('cur');
    });
  });
  apply();
})();
"""


#: The report's style sheet and its escaping, for other pages that draw hit lists (`tracestar serve`).
REPORT_CSS = _CSS
escape = _esc


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


def render_report(
    results: Sequence[Mapping[str, Any]],
    docs: Mapping[str, str],
    out_path: str | Path,
    *,
    token_scores: Mapping[tuple[str, str], Sequence[Token]] | None = None,
    bm25: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    eval_dir: str | Path | None = None,
    title: str = "tracestar report",
    max_tokens: int = 3000,
    max_chars: int = 20000,
) -> Path:
    """Write one self-contained HTML page for `results` and return its path.

    results: dicts as in RESULTS.jsonl (`query_id`, optional `prompt`/`target`, `proponents` and
    `opponents` as lists of `{"doc_id", "score"}`; an optional `bm25` list is used when `bm25` is
    not given). docs: doc_id -> text. token_scores: (query_id, doc_id) -> [(token, score), ...],
    rendered as a heat map scaled per document. bm25: query_id -> [{"doc_id", "score"}, ...],
    shown beside the TrackStar list. eval_dir: a directory written by `tracestar eval`; its
    metrics.json and PNG plots are embedded as a section. Documents longer than `max_tokens`
    tokens / `max_chars` characters are cut (with a note).
    """
    out_path = Path(out_path)
    sections, side = [], []
    for idx, res in enumerate(results):
        qid = str(res.get("query_id", f"#{idx}"))
        hits = bm25.get(qid) if bm25 is not None else res.get("bm25")
        sections.append(
            _query_section(idx, res, docs, token_scores, hits, max_tokens=max_tokens, max_chars=max_chars)
        )
        side.append(_sidebar_item(idx, res))
    eval_html = _eval_section(eval_dir) if eval_dir is not None else ""
    eval_link = ""
    if eval_dir is not None:  # the model's accuracy (and its warning) at the top as well
        metrics = read_metrics(eval_dir)
        eval_link = (
            '<div class="legend top-eval"><a href="#evaluation">Evaluation results ↓</a>'
            f'{model_accuracy_note(metrics) if metrics is not None else ""}</div>'
        )
    legend = (
        '<p class="legend">Scores are TrackStar influence (cosine of corrected, projected gradients). '
        "Token colours: contribution to the document's score, scaled per document — "
        '<span class="heat p6">raises</span> <span class="heat n6">lowers</span>. '
        "Hover a token for its value. Press <kbd>/</kbd> to search.</p>"
    )
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_esc(_csp(_JS))}">'
        '<meta name="referrer" content="no-referrer">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f'<nav id="side"><header><h1>{_esc(title)}</h1>'
        '<input id="search" type="search" placeholder="Filter queries (id, prompt, target)" autocomplete="off">'
        f'<div id="count">{len(results)} queries</div></header>'
        f'<ul id="qlist">{"".join(side)}</ul></nav>'
        f"<main>{legend}{eval_link}{''.join(sections)}{eval_html}</main>"
        f"<script>{_JS}</script></body></html>\n"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8", errors="replace")
    return out_path


# --------------------------------------------------------------------------------------------------
# from files


def _read_results(path: Path) -> list[dict]:
    from tracestar.errors import InputError

    results = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise InputError(path, n, None, f"not JSON: {exc}") from None
            if not isinstance(rec, dict) or "query_id" not in rec:
                raise InputError(path, n, "query_id", "missing")
            results.append(rec)
    return results


def _load_docs(index_dir: Path, wanted: set[str]) -> dict[str, str]:
    from tracestar.corpus import iter_documents
    from tracestar.index.store import read_manifest

    spec = read_manifest(index_dir)["corpus"]  # a missing or unfinished index: one line, not a traceback
    path = Path(spec["path"])
    if not path.exists() and (index_dir / path).exists():
        path = index_dir / path
    kw = {k: spec[k] for k in ("text_field", "id_field") if spec.get(k)}
    return {d.id: d.text for d in iter_documents(path, **kw) if d.id in wanted}


def _explain_all(
    index_dir: Path, results: list[dict], docs: dict[str, str], model_dir, *, quiet: bool = False
) -> dict[tuple[str, str], list[Token]]:
    """Per-token scores for every proponent, one backward pass per distinct document.

    A model that does not match the index is refused (UserError, as `query` refuses it); any other
    failure leaves the affected documents as plain text.
    """
    from tracestar.errors import UserError

    try:
        from tracestar.api import open_index
        from tracestar.corpus import Query
        from tracestar.explain import explain_pairs

        index = open_index(index_dir)
    except Exception as exc:  # noqa: BLE001 - explain is optional for the report
        log.warning("per-token explanations unavailable (%s); showing plain text", exc)
        return {}
    pairs = []
    for res in results:
        if res.get("prompt") is None or res.get("target") is None:
            continue
        query = Query(id=str(res["query_id"]), prompt=res["prompt"], target=res["target"])
        pairs += [(query, str(hit["doc_id"])) for hit in res.get("proponents") or []]
    failed: list[str] = []

    def on_error(doc_id: str, exc: Exception) -> None:
        failed.append(doc_id)
        log.debug("explain failed for %s: %s", doc_id, exc)

    try:
        found = explain_pairs(index, pairs, texts=docs, model_dir=model_dir, quiet=quiet, on_error=on_error)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        log.warning("per-token explanations failed (%s); showing plain text", exc)
        return {}
    if failed:
        log.warning("per-token explanation failed for %d documents; shown as plain text", len(failed))
    return {
        key: [(str(t), float(s), att.is_special(i)) for i, (t, s) in enumerate(att.tokens)]
        for key, att in found.items()
    }


def build_report(
    results_path: str | Path,
    index_dir: str | Path,
    out_path: str | Path,
    eval_dir: str | Path | None = None,
    explain: bool = True,
    model_dir: str | Path | None = None,
    quiet: bool = False,
) -> Path:
    """Load RESULTS.jsonl and the index's corpus (and per-token explanations) and render.

    With `explain`, a progress bar over the explained documents goes to stderr unless `quiet`.
    """
    index_dir = Path(index_dir)
    results = _read_results(Path(results_path))
    wanted = {
        str(h["doc_id"])
        for r in results
        for key in ("proponents", "opponents", "bm25")
        for h in (r.get(key) or [])
    }
    docs = _load_docs(index_dir, wanted)
    token_scores = _explain_all(index_dir, results, docs, model_dir, quiet=quiet) if explain else None
    return render_report(
        results, docs, out_path, token_scores=token_scores or None, eval_dir=eval_dir,
        title=f"tracestar report — {Path(results_path).name}",
    )
