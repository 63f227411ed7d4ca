"""Per-token attribution adds up to the score that `query` reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tracestar.api import build_index, open_index
from tracestar.corpus import read_queries
from tracestar.explain import explain_tokens


@pytest.fixture(scope="module")
def index(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "index"
    return build_index(world["model"], world["corpus"], out, optimizer_state=world["optimizer"], proj_dim=16384, r_block=512,
                       eval_queries=world["queries"], quiet=True)


def test_token_scores_sum_to_the_query_score(world, index):
    idx = open_index(index)
    queries = read_queries(world["queries"])
    results = idx.query(queries[:2], top_k=3)
    for q, r in zip(queries, results):
        for hit in r["proponents"][:2]:
            att = explain_tokens(idx, q, hit["doc_id"])
            total = sum(s for _, s in att.tokens)
            assert abs(att.doc_score - hit["score"]) <= 1e-6 + 1e-4 * abs(hit["score"])
            assert abs(total - att.doc_score) <= 1e-3 * abs(att.doc_score) + 1e-6, (total, att.doc_score)
            assert "".join(t for t, _ in att.tokens).startswith("the ")


def test_explain_cli_json(world, index):
    proc = subprocess.run(
        [sys.executable, "-m", "tracestar", "explain", "--index", str(index), "--queries", str(world["queries"]),
         "--query-id", "q0", "--doc-id", "d0", "--json"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["doc_id"] == "d0" and set(out["tokens"][0]) == {"token", "score"}
    assert abs(sum(t["score"] for t in out["tokens"]) - out["doc_score"]) <= 1e-3 * abs(out["doc_score"])
    # the fact's own tokens carry more of the score than the closing period
    scores = {t["token"]: t["score"] for t in out["tokens"]}
    assert out["doc_score"] > 0 and max(scores.values()) > abs(scores[" ."])


def test_report_from_a_real_index_has_token_heat_maps(world, index, tmp_path):
    from tracestar.api import query_file
    from tracestar.report import build_report

    results = tmp_path / "results.jsonl"
    query_file(index, world["queries"], results, top_k=2)
    page = build_report(results, index, tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count('class="heat ') >= 2 * len(read_queries(world["queries"]))  # every proponent explained
    assert "the capital of france is" in page
