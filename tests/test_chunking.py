"""Long documents as token windows (`--chunk-tokens`, `--chunk-stride`): each window is one row with
its (doc_id, chunk, start, end); its vector is the vector of those token ids read alone; `--by-doc`
ranks documents by their best window; a resumed chunked build writes the same bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import FACTS, FILLER, all_vectors, cli, write_corpus

from tracestar.api import build_index, by_document, open_index
from tracestar.batching import Example, chunk_spans, document_ids
from tracestar.corpus import read_queries
from tracestar.errors import OptionError
from tracestar.explain import explain_tokens
from tracestar.tracer import finalize_vectors

N, STRIDE = 8, 5  # windows of 8 tokens, a new one every 5: 3 tokens of overlap

# Documents of 2 to ~40 tokens: several windows each, one short enough to be a single window.
LONG = [" ".join(FACTS[i : i + 4]) for i in range(0, 6, 2)] + [FILLER[0] + " " + FILLER[2], "paris ."]


@pytest.fixture(scope="module")
def chunked(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("chunking")
    corpus = write_corpus(root / "long.jsonl", LONG, prefix="long")
    out = build_index(world["model"], corpus, root / "index", optimizer_state=world["optimizer"], proj_dim=1024,
                      r_block=256, shard_docs=2, chunk_tokens=N, chunk_stride=STRIDE, quiet=True, device="cpu")
    return {"corpus": corpus, "index": out, "root": root}


def _doc_table(index: Path) -> list[dict]:
    return [json.loads(line) for line in (index / "docs.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("n_tokens,size,stride", [(1, 4, 4), (4, 4, 4), (10, 4, 4), (9, 4, 4), (10, 4, 2), (37, 8, 5),
                                                   (16, 8, 1), (17, 8, 8)])
def test_windows_cover_the_document_in_order(n_tokens, size, stride):
    spans = chunk_spans(n_tokens, size, stride)
    assert spans[0][0] == 0 and spans[-1][1] == n_tokens
    covered = set()
    for i, (s, e) in enumerate(spans):
        assert 0 <= s < e <= n_tokens and e - s <= size
        assert e - s >= min(2, n_tokens)  # every window predicts a token (unless the document has only one)
        if i:
            assert spans[i - 1][0] < s <= spans[i - 1][0] + stride  # starts advance by the stride (the last may be pulled back)
        covered |= set(range(s, e))
    assert covered == set(range(n_tokens))
    if n_tokens > size:
        assert [s for s, _ in spans[:-1]] == list(range(0, stride * (len(spans) - 1), stride))


def test_doc_table_records_each_window_and_covers_each_document(world, chunked):
    idx = open_index(chunked["index"])
    tok = idx.tracer().tokenizer
    rows = _doc_table(chunked["index"])
    assert [r["row"] for r in rows] == list(range(len(rows)))
    lengths = {f"long{i}": len(document_ids(tok, t)) for i, t in enumerate(LONG)}
    assert [d for d in dict.fromkeys(r["doc_id"] for r in rows)] == list(lengths)  # corpus order
    for doc_id, n_tokens in lengths.items():
        mine = [r for r in rows if r["doc_id"] == doc_id]
        assert [(r["start"], r["end"]) for r in mine] == chunk_spans(n_tokens, N, STRIDE)
        assert [r["chunk"] for r in mine] == list(range(len(mine)))
        assert all(r["n_tokens"] == r["end"] - r["start"] and r["truncated"] is False for r in mine)
    assert max(len(chunk_spans(n, N, STRIDE)) for n in lengths.values()) >= 5  # the test has real long documents
    m = idx.manifest
    assert m["n_docs"] == len(rows) == idx.store.n_rows and m["n_truncated"] == 0
    assert m["chunking"] == {"tokens": N, "stride": STRIDE, "n_documents": len(LONG)}
    assert sum(s["rows"] for s in m["shards"]) == len(rows) and len(m["shards"]) == 3  # 2 documents a shard
    # sidecars hold the same spans the doc table does
    side = json.loads((chunked["index"] / "raw" / "shard-00001.json").read_text())
    first = next(r for r in rows if r["doc_id"] == "long2")
    assert side["start"] == first["row"] and side["docs"][0] == ["long2", N, False, {"chunk": 0, "start": 0, "end": N}]


def test_a_window_is_the_vector_of_its_token_ids_read_alone(chunked):
    """Raw and final vectors of every window equal those of its token-id window run through the
    capture path on its own (one example per batch, so no batching is shared with the build)."""
    idx = open_index(chunked["index"])
    tracer = idx.tracer()
    texts = dict(zip((f"long{i}" for i in range(len(LONG))), LONG))
    rows = _doc_table(chunked["index"])
    stored_raw = np.concatenate([a for _, a in idx.store.iter_shards("raw")])  # [N, D] float32
    alone = np.concatenate([
        tracer.raw_vectors(idx._capture, [Example(r["row"], document_ids(tracer.tokenizer, texts[r["doc_id"]])[r["start"]:r["end"]], 1)],
                           idx.options)
        for r in rows
    ])
    scale = np.abs(stored_raw).max(axis=1, keepdims=True)
    assert np.all(scale > 0)
    assert np.abs(alone - stored_raw).max(axis=1, initial=0).max() <= 1e-4 * scale.max()
    final = finalize_vectors(torch.from_numpy(alone), idx.preconditioner, True).numpy()
    assert np.abs(final - all_vectors(idx)).max() < 2e-3  # fp16 storage
    # and the windows differ from each other: a wrong cut would not go unnoticed
    assert np.abs(stored_raw[1] - stored_raw[2]).max() > 1e-2 * scale.max()


def test_query_hits_carry_the_span_and_by_doc_takes_each_documents_best_window(world, chunked):
    idx = open_index(chunked["index"])
    queries = read_queries(world["queries"])[:3]
    rows = idx.store.docs
    plain = idx.query(queries, top_k=4)
    for r in plain:
        for h in r["proponents"] + r["opponents"]:
            assert list(h) == ["doc_id", "chunk", "start", "end", "score"]
            d = rows[idx.store.row_of(h["doc_id"], h["chunk"])]
            assert (d.start, d.end) == (h["start"], h["end"])
    q = idx.query_vectors(queries)  # [Q, D]
    scores = q @ all_vectors(idx).T  # [Q, rows] brute force
    docs = list(dict.fromkeys(d.doc_id for d in rows))
    top_k = 3
    results = idx.query(queries, top_k=top_k, by_doc=True)
    for qi, r in enumerate(results):
        best = {d: max(scores[qi, i] for i, x in enumerate(rows) if x.doc_id == d) for d in docs}
        worst = {d: min(scores[qi, i] for i, x in enumerate(rows) if x.doc_id == d) for d in docs}
        want_p = sorted(docs, key=lambda d: -best[d])[:top_k]
        want_o = sorted(docs, key=lambda d: worst[d])[:top_k]
        assert [h["doc_id"] for h in r["proponents"]] == want_p
        assert [h["doc_id"] for h in r["opponents"]] == want_o
        for h in r["proponents"]:
            assert abs(h["score"] - best[h["doc_id"]]) < 1e-3
            row = idx.store.row_of(h["doc_id"], h["chunk"])  # the hit names the window that scored best
            assert abs(scores[qi, row] - best[h["doc_id"]]) < 1e-3
        for h in r["opponents"]:
            assert abs(h["score"] - worst[h["doc_id"]]) < 1e-3
    # a plain top-k lists windows, so it repeats documents; --by-doc does not
    assert any(len({h["doc_id"] for h in r["proponents"]}) < len(r["proponents"]) for r in idx.query(queries, top_k=6))
    # the library function is what query(by_doc=True) returns
    props, opps = by_document(idx, q, top_k)
    assert props == [r["proponents"] for r in results] and opps == [r["opponents"] for r in results]


def test_by_doc_from_the_command_line(world, chunked, tmp_path):
    out = tmp_path / "results.jsonl"
    run = cli("query", "--index", str(chunked["index"]), "--queries", str(world["queries"]), "--out", str(out),
              "--top-k", "2", "--by-doc")
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == len(read_queries(world["queries"]))
    for r in results:
        assert len({h["doc_id"] for h in r["proponents"]}) == 2 and {"chunk", "start", "end"} <= set(r["proponents"][0])


def test_explain_a_window_sums_to_its_score(world, chunked):
    idx = open_index(chunked["index"])
    q = read_queries(world["queries"])[0]
    hit = idx.query([q], top_k=2)[0]["proponents"][0]
    att = explain_tokens(idx, q, hit["doc_id"], chunk=hit["chunk"])
    assert len(att.tokens) == hit["end"] - hit["start"]
    assert (att.chunk, att.start, att.end) == (hit["chunk"], hit["start"], hit["end"])
    assert abs(att.doc_score - hit["score"]) <= 1e-6 + 1e-4 * abs(hit["score"])
    assert abs(sum(s for _, s in att.tokens) - att.doc_score) <= 2e-3 * abs(att.doc_score) + 1e-5
    assert att.to_json()["start"] == hit["start"] and "start + position" in att.to_json()["position_convention"]
    with pytest.raises(OptionError, match="--chunk: document 'long0' is split into"):
        explain_tokens(idx, q, "long0")
    single = explain_tokens(idx, q, f"long{len(LONG) - 1}")  # one window: no chunk needed
    assert single.chunk == 0 and len(single.tokens) == single.end


def test_report_shows_the_span(world, chunked, tmp_path):
    from tracestar.report import build_report

    idx = open_index(chunked["index"])
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in idx.query(read_queries(world["queries"])[:1], top_k=2)))
    hit = json.loads(results.read_text())["proponents"][0]
    page = build_report(results, chunked["index"], tmp_path / "report.html", quiet=True).read_text()
    assert f'#{hit["chunk"]} [{hit["start"]}, {hit["end"]})' in page
    assert page.count('class="heat ') >= hit["end"] - hit["start"] - 1  # the window was explained, per token


def _shas(index: Path) -> dict[str, str]:
    out = {}
    for p in sorted(index.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":
                m = json.loads(data)
                for key in ("created", "timings", "manifest_sha256"):  # when it was written, and its own hash
                    m.pop(key, None)
                data = json.dumps(m, sort_keys=True).encode()
            out[str(p.relative_to(index))] = hashlib.sha256(data).hexdigest()
    return out


def test_a_resumed_chunked_build_writes_the_same_bytes(world, chunked, tmp_path):
    """An interrupted build (the middle shard and everything after the corpus pass lost) resumes to
    the same files: the missing shard's first row comes from the windows of the documents before it."""
    out = tmp_path / "index"
    shutil.copytree(chunked["index"], out)
    before = _shas(out)
    for rel in ("manifest.json", "docs.jsonl", "raw/shard-00001.npy", "raw/shard-00001.json", "preconditioner.safetensors",
                "preconditioner.json", *(f"vectors/shard-0000{s}.{x}" for s in range(3) for x in ("npy", "json"))):
        (out / rel).unlink()
    build_index(world["model"], chunked["corpus"], out, optimizer_state=world["optimizer"], proj_dim=1024, r_block=256,
                shard_docs=2, chunk_tokens=N, chunk_stride=STRIDE, quiet=True, device="cpu")
    assert _shas(out) == before


def test_refit_keeps_the_windows(chunked, tmp_path):
    from tracestar.api import refit

    out = refit(chunked["index"], tmp_path / "refit", preconditioner="none", quiet=True)
    m, src = open_index(out).manifest, open_index(chunked["index"]).manifest
    assert m["chunking"] == src["chunking"] and m["n_docs"] == src["n_docs"]
    assert (out / "docs.jsonl").read_text() == (chunked["index"] / "docs.jsonl").read_text()


@pytest.mark.parametrize("kw,option", [
    ({"chunk_tokens": 1}, "--chunk-tokens"),
    ({"chunk_tokens": 8, "chunk_stride": 9}, "--chunk-stride"),
    ({"chunk_tokens": 8, "chunk_stride": 0}, "--chunk-stride"),
    ({"chunk_stride": 4}, "--chunk-stride"),
    ({"chunk_tokens": 600}, "--chunk-tokens"),  # longer than --max-length (512)
    ({"chunk_tokens": 100, "max_length": 128}, "--chunk-tokens"),  # longer than the model's window (64)
])
def test_bad_chunk_options_are_refused_before_anything_is_written(world, tmp_path, kw, option):
    out = tmp_path / "index"
    with pytest.raises(OptionError) as refused:
        build_index(world["model"], world["corpus"], out, proj_dim=256, device="cpu", quiet=True, **kw)
    assert refused.value.option == option and "\n" not in str(refused.value)
    assert not out.exists()


def test_a_bad_chunk_option_is_one_line_on_the_command_line(world, tmp_path):
    out = tmp_path / "index"
    run = cli("index", "--model", str(world["model"]), "--corpus", str(world["corpus"]), "--out", str(out),
              "--chunk-tokens", "8", "--chunk-stride", "9")
    assert run.returncode == 2 and run.stderr == (
        "tracestar: error: --chunk-stride: must be between 1 and 8, got 9 (a larger stride would skip tokens between "
        "windows)\n")
    assert not out.exists()


def test_without_chunking_rows_and_hits_are_as_before(world, tmp_path, capsys):
    """No --chunk-tokens: no span anywhere (docs.jsonl, sidecars, build.json, manifest, hits), and
    truncation stays a count in the build's summary."""
    out = build_index(world["model"], world["corpus"], tmp_path / "index", optimizer_state=world["optimizer"],
                      proj_dim=256, max_length=6, device="cpu")
    said = capsys.readouterr().out
    rows = _doc_table(out)
    assert all(list(r) == ["row", "doc_id", "n_tokens", "truncated"] for r in rows)
    n_truncated = sum(r["truncated"] for r in rows)
    assert n_truncated == len(FACTS + FILLER) and f"({n_truncated} truncated at 6)" in said  # every document is longer
    assert all(len(d) == 3 for d in json.loads((out / "raw" / "shard-00000.json").read_text())["docs"])
    assert "chunk_tokens" not in json.loads((out / "build.json").read_text())
    idx = open_index(out)
    assert "chunking" not in idx.manifest and "n_nonfinite" not in idx.manifest and not idx.store.chunked
    hits = idx.query(read_queries(world["queries"])[:1], top_k=2)[0]["proponents"]
    assert all(list(h) == ["doc_id", "score"] for h in hits)
    assert idx.query(read_queries(world["queries"])[:1], top_k=2, by_doc=True)[0]["proponents"] == hits
    with pytest.raises(OptionError, match="built without --chunk-tokens"):
        explain_tokens(idx, read_queries(world["queries"])[0], hits[0]["doc_id"], chunk=0)


def test_eval_ranks_documents_of_a_chunked_index(chunked, tmp_path):
    """Relevance is labelled per document, so `evaluate` ranks a chunked index's documents by their
    best window: each ranking lists a document once, and its MRR is computed over documents."""
    from tracestar.evaluate.run import evaluate

    pairs = [("the capital of france is", " paris", "long0"), ("the capital of austria is", " vienna", "long2")]
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "target": t, "relevant": [d]}) + "\n"
                               for i, (p, t, d) in enumerate(pairs)))
    evaluate(chunked["index"], queries, tmp_path / "eval", bm25=False, tail_patch=False, ks=(1, 3), quiet=True)
    ranked = [json.loads(line) for line in (tmp_path / "eval" / "rankings" / "tracestar.jsonl").read_text().splitlines()]
    assert len(ranked) == 2
    for r in ranked:
        ids = [h["doc_id"] for h in r["proponents"]]
        assert len(ids) == len(set(ids)) == 3  # the largest k: three documents, each once


def test_trace_shows_each_windows_span(chunked):
    from tracestar.trace import format_trace, trace

    idx = open_index(chunked["index"])
    result = trace(idx, "the capital of france is", target=" paris", top_k=3)
    hits = result["proponents"] + result["opponents"]
    assert len(hits) == 6 and all({"chunk", "start", "end"} <= set(h) for h in hits)
    assert all(len(h["tokens"]) == h["end"] - h["start"] for h in hits)  # each window explained, token by token
    text = format_trace(result, searched="exact")
    assert all(f"#{h['chunk']} [{h['start']}, {h['end']})" in text for h in hits)


def test_serve_lists_windows_with_heat_maps_and_links_to_each_window(chunked):
    from urllib.parse import parse_qs, urlparse

    from tracestar.serve.engine import Engine
    from tracestar.serve.pages import document_page

    engine = Engine(chunked["index"], max_new_tokens=2, top_k=3)
    out = engine.trace("the capital of france is", target=" paris")
    html = out["html"]["proponents"]
    for h in out["proponents"]:
        assert f"#{h['chunk']} [{h['start']}, {h['end']})" in html
    assert html.count('class="heat ') >= sum(h["end"] - h["start"] - 1 for h in out["proponents"])  # heat maps drawn
    links = [a.split('"')[0].replace("&amp;", "&") for a in html.split('href="')[1:]]
    assert len(links) == 3 and all("chunk=" in link for link in links)
    h = out["proponents"][0]
    params = {k: v[0] for k, v in parse_qs(urlparse(links[0]).query).items()}
    assert (params["doc"], int(params["chunk"])) == (h["doc_id"], h["chunk"])
    query, att = engine.document(out["trace_id"], h["doc_id"], None, h["chunk"])
    assert (att.chunk, att.start, att.end) == (h["chunk"], h["start"], h["end"])
    assert abs(att.doc_score - h["score"]) <= 1e-6 + 1e-4 * abs(h["score"])
    page = document_page(engine, h["doc_id"], query, att)
    assert f"#{h['chunk']} [{h['start']}, {h['end']})" in page
