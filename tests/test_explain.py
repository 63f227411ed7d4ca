"""Per-token attribution adds up to the score that `query` reports; the report reuses each
document's backward pass for every query that retrieved it."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny import cli

from tracestar.api import build_index, open_index
from tracestar.corpus import read_queries
from tracestar.explain import explain_pairs, explain_tokens


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
            # the document ends with the tokenizer's eos (as the trainer appended it): flagged, and as
            # the last position it feeds no later prediction, so it carries nothing
            assert att.tokens[-1][0] == "<eos>" and att.special[-1] and not any(att.special[:-1])
            assert att.tokens[-1][1] == 0.0


def test_reused_backward_passes_match_the_one_pair_path(world, index, monkeypatch):
    """Pairs grouped by document: one backward pass per distinct document, same numbers as one pair at a time."""
    from tracestar.capture import FactoredCapture

    idx = open_index(index)
    queries = read_queries(world["queries"])[:3]
    doc_ids = [d.doc_id for d in idx.store.docs[:2]]
    pairs = [(q, d) for d in doc_ids for q in queries] + [(queries[0], doc_ids[0])]  # 7 pairs (one repeated), 2 documents
    calls: list[int] = []
    original = FactoredCapture.token_vectors

    def counting(self, batch):
        calls.append(int(batch.input_ids.shape[0]))
        return original(self, batch)

    monkeypatch.setattr(FactoredCapture, "token_vectors", counting)
    batched = explain_pairs(idx, pairs)
    assert calls == [1, 1]  # one single-document backward pass per distinct document
    assert set(batched) == {(q.id, d) for q, d in pairs} and len(batched) == 6

    calls.clear()
    for q, d in pairs[:6]:
        one = explain_tokens(idx, q, d)
        many = batched[(q.id, d)]
        assert [t for t, _ in one.tokens] == [t for t, _ in many.tokens] and one.special == many.special
        assert max(abs(a - b) for (_, a), (_, b) in zip(one.tokens, many.tokens)) <= 1e-5
        assert abs(one.doc_score - many.doc_score) <= 1e-6
    assert len(calls) == 6
    # different queries give different heat maps of the same document (columns were not mixed up)
    a, b = batched[(queries[0].id, doc_ids[0])], batched[(queries[1].id, doc_ids[0])]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a.tokens, b.tokens)) > 1e-4


def test_explain_pairs_reports_a_failing_document_and_goes_on(world, index):
    idx = open_index(index)
    q = read_queries(world["queries"])[0]
    good = idx.store.docs[0].doc_id
    failed = []
    out = explain_pairs(idx, [(q, "no-such-doc"), (q, good)], on_error=lambda d, exc: failed.append((d, str(exc))))
    assert list(out) == [(q.id, good)]
    assert failed and failed[0][0] == "no-such-doc" and "no-such-doc" in failed[0][1]


def test_explain_cli_json(world, index):
    proc = cli("explain", "--index", str(index), "--queries", str(world["queries"]), "--query-id", "q0",
                "--doc-id", "d0", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["doc_id"] == "d0" and set(out["tokens"][0]) == {"position", "token", "score", "special"}
    assert [t["position"] for t in out["tokens"]] == list(range(len(out["tokens"])))
    assert "from 0" in out["position_convention"]
    assert abs(sum(t["score"] for t in out["tokens"]) - out["doc_score"]) <= 1e-3 * abs(out["doc_score"])
    assert [t["special"] for t in out["tokens"]][-1] is True and not any(t["special"] for t in out["tokens"][:-1])
    # the fact's own tokens carry more of the score than the closing period
    scores = {t["token"]: t["score"] for t in out["tokens"]}
    assert out["doc_score"] > 0 and max(scores.values()) > abs(scores[" ."])


def test_explain_cli_text_prints_positions_and_their_convention(world, index):
    # d6, "the river in the north was large .", holds "the" twice
    proc = cli("explain", "--index", str(index), "--queries", str(world["queries"]), "--query-id", "q0",
                "--doc-id", "d6", "--json")
    tokens = json.loads(proc.stdout)["tokens"]
    proc = cli("explain", "--index", str(index), "--queries", str(world["queries"]), "--query-id", "q0", "--doc-id", "d6")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "positions count the document's tokens from 0" in proc.stdout
    rows = [ln.split() for ln in lines if ln.startswith("  ") and ln.split()[0].isdigit()]
    assert len(rows) == min(15, len(tokens))
    for pos, score, *_ in rows:  # each printed position names the token at that position, with its score
        t = tokens[int(pos)]
        assert abs(float(score) - t["score"]) <= 5e-6 and repr(t["token"]) in next(ln for ln in lines if ln.split()[:1] == [pos])
    # the repeated token is listed once per position, each with its own score
    the_positions = [t["position"] for t in tokens if t["token"].strip() == "the"]
    assert the_positions == [0, 3] and {0, 3} <= {int(r[0]) for r in rows}


def test_query_cli_names_the_form_it_searched(world, index, tmp_path):
    from tracestar.index import compress as compress_mod
    from tracestar.index.store import COMPRESSED_FORMS

    assert COMPRESSED_FORMS == compress_mod.FORMS
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    args = ["query", "--index", str(copy), "--queries", str(world["queries"]), "--out", str(tmp_path / "r.jsonl"), "--top-k", "2"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("searched: exact (full-precision vectors)")
    compress_mod.compress(copy, "int8")
    proc = cli(*args)
    assert proc.stdout.strip().endswith("searched: int8 (candidates re-scored exactly)"), proc.stdout
    proc = cli(*args, "--rerank", "0")
    assert proc.stdout.strip().endswith("searched: int8 (approximate scores)"), proc.stdout
    proc = cli(*args, "--exact")
    assert proc.stdout.strip().endswith("searched: exact (full-precision vectors)"), proc.stdout


def test_report_from_a_real_index_has_token_heat_maps(world, index, tmp_path):
    from tracestar.api import query_file
    from tracestar.report import build_report

    results = tmp_path / "results.jsonl"
    query_file(index, world["queries"], results, top_k=2)
    page = build_report(results, index, tmp_path / "report.html", quiet=True).read_text(encoding="utf-8")
    assert page.count('class="heat ') >= 2 * len(read_queries(world["queries"]))  # every proponent explained
    assert "the capital of france is" in page
    assert "&lt;eos&gt;" not in page and "<eos>" not in page  # the tokenizer's eos is not shown
    # positions stay those of `explain`: the first token is position 0, and the hidden eos still counts
    assert 'title="position 0: ' in page


def test_report_refuses_a_model_that_is_not_the_index_model(world, index, tmp_path):
    import tiny

    other = tiny.save(tiny.gpt2(seed=7), tmp_path / "other-model")
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"query_id": "q0", "prompt": "the capital of france is", "target": " paris",
                                   "proponents": [{"doc_id": "d0", "score": 0.5}], "opponents": []}) + "\n")
    out = tmp_path / "report.html"
    proc = cli("report", "--results", str(results), "--index", str(index), "--out", str(out), "--model", str(other))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "fingerprint" in err[0] and str(other) in err[0], proc.stderr
    assert not out.exists()


def test_text_form_lists_the_top_positions_by_magnitude():
    from tracestar.explain import POSITION_CONVENTION, TokenAttribution

    att = TokenAttribution("d7", 0.5, [("Paris", 0.375), ("<|eos|>", -0.5), (" is", 0.625)], [False, True, False])
    lines = att.to_text(top=2).splitlines()
    assert lines[0] == "d7: score +0.50000 (sum over its 3 positions +0.50000)"
    assert lines[1] == POSITION_CONVENTION + "."
    assert lines[2] == "top 2 of 3 positions by |score| (--json lists all):"
    assert lines[4:] == ["      2  +0.62500  ' is'", "      1  -0.50000  '<|eos|>'  (special token)"]
