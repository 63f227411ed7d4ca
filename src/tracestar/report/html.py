"""One self-contained HTML file showing, per query, the proponents and opponents TrackStar found.

`render_report` works on plain dicts and needs no model or index; `build_report` loads an index's
corpus and (optionally) per-token explanations and then calls it. The page is assembled here from
the hit lists (`report.hits`), the evaluation section (`report.evaluation`, drawn from the same
blocks as report.md, so the page and the printed table agree) and the style and script
(`report.style`).

Everything that comes from the corpus or the queries is untrusted. It is HTML-escaped before it
enters the page, and no data is embedded as inline JSON or script: the page is rendered on the
server side, and the one inline script (search and navigation) reads only `data-*` attributes and
`textContent`. A Content-Security-Policy meta tag allows that one script by its hash, inline
styles, and `data:` images, and nothing else (no network at all).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tracestar.report.evaluation import eval_section, model_accuracy_note, read_metrics
from tracestar.report.hits import Token, doc_list, escape, score_scale
from tracestar.report.hits import hit_list  # noqa: F401 (re-exported: `tracestar serve` draws its lists with it)
from tracestar.report.style import CSS, SCRIPT, csp

log = logging.getLogger(__name__)

#: The report's style sheet, for other pages that draw hit lists (`tracestar serve`).
REPORT_CSS = CSS


# --------------------------------------------------------------------------------------------------
# pieces


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
    scale = score_scale(pros, opps)
    ts_ids = {str(it.get("doc_id")) for it in pros}
    bm_ids = {str(it.get("doc_id")) for it in (bm25_hits or [])}
    both = ts_ids & bm_ids

    qtext = ""
    if prompt is not None or target is not None:
        qtext = (
            f'<p class="qtext"><span class="prompt">{escape(prompt or "")}</span>'
            f'<span class="target" title="target">{escape(target or "")}</span></p>'
        )
    common = dict(max_tokens=max_tokens, max_chars=max_chars)
    pro_html = doc_list(pros, qid, docs, token_scores, kind="proponents", scale=scale, marks=both,
                         open_first=3, **common)
    opp_html = doc_list(opps, qid, docs, token_scores, kind="opponents", scale=scale, marks=set(),
                         open_first=0, **common)
    cols = f'<div class="col"><h3>TrackStar proponents</h3>{pro_html}</div>'
    if bm25_hits is not None:
        bm_html = doc_list(list(bm25_hits), qid, docs, None, kind="bm25", scale=score_scale(bm25_hits),
                            marks=both, open_first=0, **common)
        cols += f'<div class="col"><h3>BM25</h3>{bm_html}</div>'
    return (
        f'<section class="query" id="q{idx}" data-qi="{idx}">'
        f'<h2><span class="qid">{escape(qid)}</span></h2>{qtext}'
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
        f'<li data-qi="{idx}" data-search="{escape(search)}"><a href="#q{idx}">'
        f'<span class="qid">{escape(qid)}</span><span class="qlabel">{escape(label)}</span></a></li>'
    )


# --------------------------------------------------------------------------------------------------
# page


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
    eval_html = eval_section(eval_dir) if eval_dir is not None else ""
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
        f'<meta http-equiv="Content-Security-Policy" content="{escape(csp(SCRIPT))}">'
        '<meta name="referrer" content="no-referrer">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f'<nav id="side"><header><h1>{escape(title)}</h1>'
        '<input id="search" type="search" placeholder="Filter queries (id, prompt, target)" autocomplete="off">'
        f'<div id="count">{len(results)} queries</div></header>'
        f'<ul id="qlist">{"".join(side)}</ul></nav>'
        f"<main>{legend}{eval_link}{''.join(sections)}{eval_html}</main>"
        f"<script>{SCRIPT}</script></body></html>\n"
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
    from tracestar.corpus import indexed_texts
    from tracestar.index.store import read_manifest

    spec = read_manifest(index_dir)["corpus"]  # a missing or unfinished index: one line, not a traceback
    return indexed_texts(spec, index_dir, wanted)


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
        from tracestar.report.hits import hit_key

        index = open_index(index_dir)
    except Exception as exc:  # noqa: BLE001 - explain is optional for the report
        log.warning("per-token explanations unavailable (%s); showing plain text", exc)
        return {}
    pairs = []
    for res in results:
        if res.get("prompt") is None or res.get("target") is None:
            continue
        query = Query(id=str(res["query_id"]), prompt=res["prompt"], target=res["target"])
        pairs += [(query, hit_key(hit)) for hit in res.get("proponents") or []]
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
