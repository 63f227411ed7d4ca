"""The HTML report: escaping and self-containment (fast, no browser) and behaviour in headless Chromium.

The browser tests use Debian's Chromium (/usr/bin/chromium) driven by Playwright for Python; they
are skipped, with the reason, only when either cannot be found. No browser is downloaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import struct
import sys
import types
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tracestar.report import build_report, render_report

HOSTILE = '<script>window.__pwned=1</script> and <img src=x onerror="window.__pwned=1"> end'


def _results():
    return [
        {
            "query_id": "capital-fr",
            "prompt": "The capital of France is",
            "target": " Paris",
            "proponents": [
                {"doc_id": "d-paris", "score": 0.052},
                {"doc_id": "d-evil", "score": 0.031},
                {"doc_id": "d-plain", "score": 0.012},
            ],
            "opponents": [{"doc_id": "d-rome", "score": -0.020}],
        },
        {
            "query_id": "capital-it",
            "prompt": "The capital of Italy is",
            "target": " Rome",
            "proponents": [{"doc_id": "d-rome", "score": 0.044}],
            "opponents": [{"doc_id": "d-paris", "score": -0.010}],
        },
        {
            "query_id": "currency-jp",
            "prompt": "The currency of Japan is the",
            "target": " yen",
            "proponents": [{"doc_id": "d-yen", "score": 0.040}],
            "opponents": [{"doc_id": "d-evil", "score": -0.015}],  # no token scores: plain text
        },
    ]


def _docs():
    return {
        "d-paris": "Paris is the capital of France.",
        "d-evil": HOSTILE,
        "d-plain": "A document with no per-token scores.",
        "d-rome": "Rome is the capital of Italy.",
        "d-yen": "The yen is the currency of Japan.",
    }


def _token_scores():
    return {
        ("capital-fr", "d-paris"): [("Paris", 0.03), (" is", 0.002), (" the", -0.001), (" capital", 0.015),
                                    (" of", 0.0), (" France", 0.006), (".", 0.0), ("<|endoftext|>", 0.0, True)],
        ("capital-fr", "d-evil"): [("<script>", 0.01), ("window.__pwned=1", 0.02), ("</script>", -0.005),
                                   (' <img src=x onerror="window.__pwned=1">', 0.006)],
        ("capital-it", "d-rome"): [("Rome", 0.04), (" is the capital of Italy.", 0.004)],
    }


def _bm25():
    return {
        "capital-fr": [{"doc_id": "d-paris", "score": 7.5}, {"doc_id": "d-rome", "score": 3.1}],
        "capital-it": [{"doc_id": "d-rome", "score": 8.0}],
    }


def _png(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


ACCURACY_WARNING = "the model's first-token accuracy (39.8%) is below 60%: <b>do not</b> expect the paper's findings"


def _metrics(with_model: bool = True) -> dict:
    """metrics.json as `tracestar eval` writes it (two methods, buckets, tail-patch, settings)."""
    metrics = {
        "trackstar": {"mrr": 0.29, "recall@1": 0.2, "recall@10": 0.5, "n": 10,
                      "by_bucket": {"1-10": {"mrr": 0.25, "recall@10": 0.4, "n": 6}, "10+": {"mrr": 0.35, "recall@10": 0.65, "n": 4}},
                      "tailpatch": {"1": {"delta_logprob": 0.0123, "delta_prob": 0.00004}, "10": {"delta_logprob": 0.005, "delta_prob": 0.001}}},
        "bm25": {"mrr": 0.41, "recall@1": 0.3, "recall@10": 0.6, "n": 10,
                 "by_bucket": {"1-10": {"mrr": 0.4, "recall@10": 0.5, "n": 6}, "10+": {"mrr": 0.42, "recall@10": 0.75, "n": 4}}},
        "_settings": {"index": "runs/<b>idx</b>", "queries": "q.jsonl", "n_queries": 10, "n_queries_with_relevant": 10,
                      "ks": [1, 10], "model": "runs/model", "variants": {}, "index_preconditioner": "mixed",
                      "tailpatch": {"optimizer": "adafactor", "optimizer_state": "model/optimizer.pt", "lr": 0.01,
                                    "n_queries": 10, "seconds": 3.5},
                      "timings": {"query_s": 1.5, "total_s": 9.0}},
    }
    if with_model:
        metrics["model"] = {"first_token_accuracy": 0.398, "accuracy_warning": ACCURACY_WARNING, "accuracy_threshold": 0.6,
                            "n_queries": 10}
    return metrics


@pytest.fixture()
def eval_dir(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    (d / "mrr.png").write_bytes(_png())
    (d / "fake.png").write_bytes(b"<svg onload=alert(1)>")  # not a PNG: must be skipped
    # report.md is for reading in a terminal; the HTML section is built from metrics.json, not from this
    (d / "report.md").write_text(
        "# Evaluation\n\n- **index**: `runs/idx`\n- model: `runs/model`\n\n![mrr.png](mrr.png)\n", encoding="utf-8",
    )
    (d / "metrics.json").write_text(json.dumps(_metrics()), encoding="utf-8")
    return d


@pytest.fixture()
def report(tmp_path, eval_dir):
    return render_report(
        _results(), _docs(), tmp_path / "r" / "report.html",
        token_scores=_token_scores(), bm25=_bm25(), eval_dir=eval_dir, title="test <report>",
    )


# ---- fast checks, no browser ---------------------------------------------------------------------


def test_hostile_text_is_escaped(report):
    page = report.read_text(encoding="utf-8")
    assert page.count("<script") == 1  # only our own script
    assert "<img src=x" not in page
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page  # plain text (an opponent)
    assert "&lt;script&gt;</span>" in page  # as heat-map tokens (a proponent)
    assert "&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;" in page
    assert "<b>" not in page and "runs/&lt;b&gt;idx&lt;/b&gt;" in page  # from metrics.json
    assert "&lt;b&gt;do not&lt;/b&gt;" in page  # the accuracy warning too
    assert "test &lt;report&gt;" in page


def test_attribute_injection_in_ids_and_prompts(tmp_path):
    evil_id = '"><script>alert(1)</script><a x="'
    res = [{"query_id": evil_id, "prompt": "p\u2028'\"<>&", "target": "</script>",
            "proponents": [{"doc_id": evil_id, "score": 1.0}], "opponents": []}]
    page = render_report(res, {evil_id: "x"}, tmp_path / "r.html",
                         token_scores={(evil_id, evil_id): [('"><b>', 1.0)]}).read_text(encoding="utf-8")
    assert page.count("<script") == 1
    assert "<b>" not in page and "&quot;&gt;&lt;b&gt;" in page
    # every attribute value is well formed: no raw quote from the data survives
    assert evil_id not in page
    assert "&quot;&gt;&lt;script&gt;" in page


def test_self_contained_and_csp(report):
    page = report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page
    m = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert m, "CSP meta tag missing"
    csp = m.group(1).replace("&#x27;", "'")
    assert "default-src 'none'" in csp and "img-src data:" in csp
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    assert "'unsafe-eval'" not in csp and "script-src 'unsafe-inline'" not in csp


def test_heat_map_and_plain_text(report):
    page = report.read_text(encoding="utf-8")
    assert page.count('class="heat p8"') >= 3  # the top token of each explained document
    assert 'class="heat n' in page  # negative contributions are coloured too
    assert 'title="position 0: +0.03"' in page  # hover: position (as `tracestar explain` numbers it) and value
    assert "A document with no per-token scores." in page  # plain text when no token scores


def test_special_tokens_are_hidden_but_keep_their_positions(tmp_path):
    toks = [("<|endoftext|>", 0.5, True), ("Paris", 0.25), (" is", -0.125), ("<|endoftext|>", 0.0, True)]
    page = render_report([{"query_id": "q", "proponents": [{"doc_id": "a", "score": 0.625}]}], {"a": "Paris is"},
                         tmp_path / "r.html", token_scores={("q", "a"): toks}).read_text(encoding="utf-8")
    assert "endoftext" not in page.split("</style>", 1)[1].replace("special token(s) not shown", "")
    assert 'title="position 1: +0.25">Paris<' in page and 'title="position 2: -0.125"> is<' in page
    assert "Σ tok 0.625" in page  # the sum still counts every position
    assert "2 special token(s) not shown contribute +0.5" in page


def test_eval_section_is_rendered_from_metrics_json(report):
    page = report.read_text(encoding="utf-8")
    section = page[page.index('<section class="query evaluation"'):]
    assert section.count('src="data:image/png;base64,') == 1  # fake.png is not a PNG and is skipped
    assert "onload=alert" not in page
    assert "**" not in section and "`" not in section and "![" not in section  # report.md is not parsed
    assert "<li>model: <code>runs/model</code></li>" in section
    assert "<th>method</th>" in section and "<td>trackstar</td>" in section and "<td>BM25</td>" in section
    assert '<td class="num">0.290</td>' in section and '<td class="num">0.410</td>' in section
    assert '<td class="num">0.0123</td>' in section and '<td class="num">4.00e-05</td>' in section  # tail-patch
    assert "<th>bucket</th>" in section and "<td>1-10</td>" in section and "<td>10+</td>" in section
    assert "<code>adafactor</code>" in section and "lr = 0.01" in section
    assert "Timings (s): query_s 1.5, total_s 9.0" in section
    assert "trackstar.mrr" in section  # the raw metrics, collapsed
    # the model's accuracy and its warning: in the section and at the top of the page
    assert page.count("first-token accuracy <strong>39.8%</strong> on 10 queries.") == 2
    assert "“fact-stating documents” = up to k" in section  # eval's labels
    assert "<td>model</td>" not in section  # "model" is not a method
    assert page.count('<p class="warn" role="note">') == 2


def test_eval_section_without_accuracy_says_so(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(_metrics(with_model=False)), encoding="utf-8")
    page = render_report(_results(), _docs(), tmp_path / "r.html", eval_dir=d).read_text(encoding="utf-8")
    assert "first-token accuracy not recorded in metrics.json" in page and 'class="warn"' not in page
    assert "<td>trackstar</td>" in page
    unknown = _metrics(with_model=False)
    unknown["model"] = {"first_token_accuracy": None, "accuracy_warning": "the accuracy is unknown", "n_queries": 3}
    (d / "metrics.json").write_text(json.dumps(unknown), encoding="utf-8")
    page = render_report(_results(), _docs(), tmp_path / "r.html", eval_dir=d).read_text(encoding="utf-8")
    assert "first-token accuracy <strong>unknown</strong> on 3 queries." in page
    assert "<strong>Warning:</strong> The accuracy is unknown.</p>" in page


def test_bm25_column_from_results_field(tmp_path):
    res = _results()
    res[0]["bm25"] = [{"doc_id": "d-paris", "score": 5.0}]
    page = render_report(res, _docs(), tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<h3>BM25</h3>" in page and page.count("<h3>BM25</h3>") == 1


def test_long_documents_are_cut(tmp_path):
    res = [{"query_id": "q", "proponents": [{"doc_id": "a", "score": 1.0}, {"doc_id": "b", "score": 0.5}],
            "opponents": []}]
    toks = [(f"t{i} ", 0.01) for i in range(50)]
    page = render_report(res, {"a": "x", "b": "y" * 500}, tmp_path / "r.html",
                         token_scores={("q", "a"): toks}, max_tokens=10, max_chars=100).read_text(encoding="utf-8")
    assert "40 more tokens" in page and "400 more characters" in page
    assert "t10 " not in page


def _fake_index(tmp_path: Path) -> tuple[Path, Path]:
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as fh:
        for doc_id, text in _docs().items():
            fh.write(json.dumps({"key": doc_id, "body": text}) + "\n")
        fh.write(json.dumps({"key": "unused", "body": "not in any result"}) + "\n")
    index = tmp_path / "index"
    index.mkdir()
    (index / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "corpus": {"path": str(corpus), "text_field": "body", "id_field": "key"}}))
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _results()), encoding="utf-8")
    return index, results


def test_build_report_without_explain(tmp_path, eval_dir):
    index, results = _fake_index(tmp_path)
    out = build_report(results, index, tmp_path / "out.html", eval_dir=eval_dir, explain=False)
    page = out.read_text(encoding="utf-8")
    assert "Paris is the capital of France." in page
    assert "&lt;script&gt;window.__pwned=1" in page
    assert 'class="heat' not in page.split("</p>", 1)[1]  # no heat map past the legend
    assert "not in any result" not in page


def test_build_report_explain_failures_fall_back(tmp_path, monkeypatch):
    index, results = _fake_index(tmp_path)
    calls = []

    def explain_pairs(index_arg, pairs, *, texts, model_dir, quiet, on_error):
        calls.append([(q.id, d) for q, d in pairs])
        out = {}
        for q, d in pairs:
            if d == "d-evil":
                on_error(d, RuntimeError("boom"))
                continue
            out[(q.id, d)] = types.SimpleNamespace(tokens=[("Tok", 0.5), ("en", -0.1), ("<eos>", 0.0)], doc_score=0.4,
                                                   is_special=lambda i: i == 2)
        return out

    monkeypatch.setitem(sys.modules, "tracestar.explain", types.SimpleNamespace(explain_pairs=explain_pairs))
    monkeypatch.setattr("tracestar.api.open_index", lambda path: "opened index")
    page = build_report(results, index, tmp_path / "out.html", quiet=True).read_text(encoding="utf-8")
    assert len(calls) == 1 and len(calls[0]) == 5  # one call with every proponent, not opponents
    assert ("capital-fr", "d-evil") in calls[0]
    assert page.count('class="heat p8"') == 4  # 4 explained proponents (+ none in legend: it uses p6)
    assert "&lt;eos&gt;" not in page
    assert "&lt;script&gt;window.__pwned=1" in page  # the failed one is plain text


def test_build_report_refuses_a_mismatched_model(tmp_path, monkeypatch):
    from tracestar.errors import UserError

    index, results = _fake_index(tmp_path)

    def explain_pairs(*args, **kw):
        raise UserError("other-model: model fingerprint 0123 differs from the index's 4567 (index); refusing to mix them")

    monkeypatch.setitem(sys.modules, "tracestar.explain", types.SimpleNamespace(explain_pairs=explain_pairs))
    monkeypatch.setattr("tracestar.api.open_index", lambda path: "opened index")
    with pytest.raises(UserError, match="fingerprint"):
        build_report(results, index, tmp_path / "out.html", model_dir="other-model")
    assert not (tmp_path / "out.html").exists()


def test_build_report_when_explain_missing(tmp_path, monkeypatch):
    index, results = _fake_index(tmp_path)
    monkeypatch.setitem(sys.modules, "tracestar.explain", None)  # import fails
    page = build_report(results, index, tmp_path / "out.html").read_text(encoding="utf-8")
    assert "Paris is the capital of France." in page


def test_cli_report(tmp_path, eval_dir, capsys):
    from tracestar.cli import main

    index, results = _fake_index(tmp_path)
    out = tmp_path / "cli.html"
    rc = main(["report", "--results", str(results), "--index", str(index), "--out", str(out),
               "--eval", str(eval_dir), "--no-explain"])
    assert rc == 0 and out.is_file()
    assert str(out) in capsys.readouterr().out


# ---- headless Chromium ---------------------------------------------------------------------------

_CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium_path() -> str | None:
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and Path(cand).exists():
            return cand
    return None


@contextmanager
def headless_chromium() -> Iterator:
    """Debian's Chromium through Playwright (never a browser download); skips when either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    exe = _chromium_path()
    if exe is None:
        pytest.skip("no Chromium found (/usr/bin/chromium); install it with `apt-get install -y chromium`")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=_CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def page(report):
    with headless_chromium() as browser:
        pg = browser.new_page(viewport={"width": 1366, "height": 768})
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        requests: list[str] = []
        pg.on("request", lambda req: requests.append(req.url))
        pg.goto(report.as_uri())
        pg.wait_for_load_state("load")
        pg.errors, pg.requests = errors, requests
        yield pg


def _section(pg, query_id: str):
    return pg.locator("section.query", has=pg.locator("h2 .qid", has_text=query_id))


def test_browser_proponents_and_heat_map(page):
    sec = _section(page, "capital-fr")
    assert sec.count() == 1
    ids = sec.locator("ol.proponents .docid").all_inner_texts()
    assert ids == ["d-paris", "d-evil", "d-plain"]
    heat = sec.locator("ol.proponents .heat")
    assert heat.count() == 7 + 4
    colours = heat.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
    coloured = [c for c in colours if c not in ("rgba(0, 0, 0, 0)", "transparent")]
    assert len(coloured) >= 8
    assert any("46, 160, 90" in c for c in colours) and any("214, 60, 50" in c for c in colours)
    assert heat.first.get_attribute("title") == "position 0: +0.03"
    # the tokenizer's special tokens are not part of the displayed text
    docs_text = sec.locator("ol.proponents .doc").all_inner_texts()
    assert docs_text[0] == "Paris is the capital of France."
    assert not any("endoftext" in t for t in page.locator("main").all_inner_texts())
    bars = sec.locator("ol.proponents .fill.pos")
    assert bars.count() == 3 and bars.first.evaluate("e => e.getBoundingClientRect().width") > 0


def test_browser_hostile_document_is_inert(page):
    assert page.evaluate("typeof window.__pwned") == "undefined"
    sec = _section(page, "capital-fr")
    # the hostile document is rendered as visible text, both as a heat map and as plain text
    heat_doc = sec.locator("ol.proponents .doc.heatmap").nth(1)
    assert heat_doc.is_visible()
    text = heat_doc.inner_text()
    assert "<script>" in text and "window.__pwned=1" in text and 'onerror="window.__pwned=1"' in text
    assert page.locator("main img").count() == 1  # only the embedded plot, no injected <img>
    assert page.locator("script").count() == 1
    assert page.errors == []
    assert all(u.startswith(("file:", "data:")) for u in page.requests), page.requests
    # plain-text rendering too (no token scores for that query/doc)
    plain = render_report([{"query_id": "q", "proponents": [{"doc_id": "d-evil", "score": 1.0}]}],
                          _docs(), Path(page.url[len("file://"):]).parent / "plain.html")
    page.goto(plain.as_uri())
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert HOSTILE in page.locator(".doc").first.inner_text()


def test_browser_search_filters(page):
    box = page.locator("#search")
    items = page.locator("#qlist li")
    assert items.count() == 3
    assert page.locator("#count").inner_text() == "3 of 3 queries"
    box.fill("italy")
    assert page.locator("#qlist li:not(.hidden)").all_inner_texts()[0].startswith("capital-it")
    assert page.locator("#qlist li:not(.hidden)").count() == 1
    assert _section(page, "capital-it").is_visible()
    assert not _section(page, "capital-fr").is_visible()
    assert page.locator("#count").inner_text() == "1 of 3 queries"
    box.fill("capital")  # by id
    assert page.locator("#qlist li:not(.hidden)").count() == 2
    box.fill(" yen")  # by target
    assert page.locator("#qlist li:not(.hidden)").count() == 1
    box.fill("no such query")
    assert page.locator("#qlist li:not(.hidden)").count() == 0
    box.fill("")
    assert page.locator("#qlist li:not(.hidden)").count() == 3
    # the sidebar links jump to the query
    page.locator("#qlist li a", has_text="currency-jp").click()
    assert page.url.endswith("#q2")
    assert _section(page, "currency-jp").is_visible()


def test_browser_evaluation_section(page):
    sec = page.locator("section#evaluation")
    sec.scroll_into_view_if_needed()
    assert sec.locator("ul.settings > li").count() == 3  # index, model, queries: real list items
    assert sec.locator("ul.settings > li").nth(1).inner_text() == "model: runs/model"
    assert sec.locator("code").count() >= 4 and sec.locator("code").first.inner_text() == "runs/<b>idx</b>"
    img = sec.locator("figure img")
    assert img.count() == 1
    assert img.evaluate("e => e.complete && e.naturalWidth") == 2  # the PNG decoded (2 × 2)
    text = sec.inner_text()
    assert "**" not in text and "`" not in text and "![" not in text
    assert "first-token accuracy 39.8% on 10 queries" in text
    warn = sec.locator(".warn")
    # escaped: the markup shows as text
    assert warn.is_visible() and warn.inner_text() == "Warning: The" + ACCURACY_WARNING[3:] + "."
    # also at the top of the page, before the queries
    top = page.locator("main > .top-eval")
    assert "first-token accuracy 39.8%" in top.inner_text() and top.locator(".warn").is_visible()
    rows = sec.locator("table.md").first.locator("tr")
    assert rows.first.locator("th").all_inner_texts()[:3] == ["method", "MRR", "R@1"]
    assert rows.nth(1).locator("td").first.inner_text() == "trackstar"
