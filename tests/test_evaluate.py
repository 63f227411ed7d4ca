"""Evaluation: MRR / recall@k, BM25 baseline, tail-patch, report, CLI; a slow end-to-end demo."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import tiny
import torch

from tracestar.corpus import Query, write_jsonl
from tracestar.evaluate.bm25 import BM25Retriever, bm25_results, query_text
from tracestar.evaluate.metrics import attribution_metrics, mrr, recall_at_k, sort_buckets

# --- metrics -------------------------------------------------------------------------------------


def _res(qid, docs):
    return {"query_id": qid, "proponents": [{"doc_id": d, "score": 1.0 / (i + 1)} for i, d in enumerate(docs)],
            "opponents": []}


def _q(qid, rel, bucket):
    return Query(qid, "p", " t", extra={"relevant": rel, "bucket": bucket})


@pytest.fixture
def ranked():
    queries = [
        _q("q1", ["a"], "1"),            # rank 1
        _q("q2", ["c"], "1"),            # rank 3
        _q("q3", ["x", "y"], "2-3"),     # rank 2 (y)
        _q("q4", ["z"], "2-3"),          # not in the list
        _q("q5", [], "2-3"),             # no ground truth: not scored
        _q("q6", ["a"], "11+"),          # no result at all: a miss
    ]
    results = [_res("q1", ["a", "b", "c"]), _res("q2", ["a", "b", "c"]), _res("q3", ["a", "y", "x"]),
               _res("q4", ["a", "b"]), _res("q5", ["a"])]
    return queries, results


def test_mrr_and_recall_exact(ranked):
    queries, results = ranked
    m = attribution_metrics(queries, results, ks=(1, 3, 10))
    assert m["n"] == 5
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 0 + 0) / 5, abs=1e-12)
    assert m["recall@1"] == pytest.approx(1 / 5)
    assert m["recall@3"] == pytest.approx(3 / 5)
    assert m["recall@10"] == pytest.approx(3 / 5)
    assert mrr(queries, results) == pytest.approx(m["mrr"])
    assert recall_at_k(queries, results, 2) == pytest.approx(2 / 5)


def test_metrics_per_bucket(ranked):
    queries, results = ranked
    b = attribution_metrics(queries, results, ks=(1, 3, 10))["by_bucket"]
    assert list(b) == ["1", "2-3", "11+"]
    assert b["1"] == {"mrr": pytest.approx(2 / 3), "recall@1": 0.5, "recall@3": 1.0, "recall@10": 1.0, "n": 2}
    assert b["2-3"] == {"mrr": pytest.approx(0.25), "recall@1": 0.0, "recall@3": 0.5, "recall@10": 0.5, "n": 2}
    assert b["11+"] == {"mrr": 0.0, "recall@1": 0.0, "recall@3": 0.0, "recall@10": 0.0, "n": 1}


def test_sort_buckets_natural_order():
    assert sort_buckets(["11+", "1", "4-10", "2-3", "all"]) == ["1", "2-3", "4-10", "11+", "all"]


# --- BM25 ----------------------------------------------------------------------------------------

TOY_DOCS = {
    "d0": "The capital of France is Paris. France uses the euro.",
    "d1": "Berlin is the capital of Germany.",
    "d2": "The cat sat on the mat.",
    "d3": "Madrid is in Spain. The capital of Spain is Madrid.",
    "d4": "The currency of Japan is the yen.",
    "d5": "The capital of Italy is Rome.",
}


def test_bm25_exact_match_first(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"id": k, "text": v} for k, v in TOY_DOCS.items()])
    queries = [Query("qa", "The currency of Japan is", " the yen"), Query("qb", "The capital of Italy is", " Rome"),
               Query("qc", "zzz", " qqq")]
    res = bm25_results(corpus, queries, top_k=3)
    assert [r["query_id"] for r in res] == ["qa", "qb", "qc"]
    assert res[0]["proponents"][0]["doc_id"] == "d4"
    assert res[1]["proponents"][0]["doc_id"] == "d5"
    assert res[2]["proponents"] == [] and res[2]["opponents"] == []
    scores = [p["score"] for p in res[1]["proponents"]]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores) and len(scores) <= 3
    assert query_text(Query("x", "a b", "c")) == "a b c" and query_text(Query("x", "a b", " c")) == "a b c"


def test_bm25_keeps_digits():
    r = BM25Retriever(["a", "b"], ["route 7 north", "route 66 south"])
    assert r.search(["7"], top_k=2)[0][0][0] == "a"


# --- tail-patch ----------------------------------------------------------------------------------

WORDS = sorted({w for t in TOY_DOCS.values() for w in t.replace(".", " .").split()} | {"zzz", "qqq"})


def _tiny_model_dir(path: Path, *, optimizer_state: bool = True) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<eos>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                     eos_token_id=2, bos_token_id=2, pad_token_id=1,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(path)
    if optimizer_state:  # a couple of real Adafactor steps, so the state is non-trivial
        opt = torch.optim.Adafactor(model.parameters(), lr=0.02)
        for text in list(TOY_DOCS.values())[:3]:
            ids = torch.tensor([tok(text)["input_ids"] + [2]])
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        torch.save(opt.state_dict(), path / "optimizer.pt")
        (path / "train_log.json").write_text(json.dumps({"peak_lr": 0.05, "final_lr": 0.02}))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


QUERIES = [Query("qa", "The currency of Japan is", " the yen", extra={"relevant": ["d4"], "bucket": "1"}),
           Query("qb", "The capital of Italy is", " Rome", extra={"relevant": ["d5", "d0"], "bucket": "2-3"}),
           Query("qc", "Berlin is the capital of", " Germany", extra={"relevant": ["d1"], "bucket": "1"})]


def test_tailpatch_restores_model_and_optimizer(model_dir):
    from tracestar.evaluate.tailpatch import TailPatcher

    p = TailPatcher.from_dir(model_dir)
    assert p.optimizer_kind == "adafactor" and p.lr == pytest.approx(0.02)  # final lr from train_log.json
    before = [t.detach().clone() for t in p.model.parameters()]
    opt_before = {i: {k: v.clone() for k, v in p.optimizer.state[t].items()} for i, t in enumerate(p.params)}
    base = p.logprobs(QUERIES)
    d1 = p.patched_logprobs(TOY_DOCS["d5"], QUERIES) - base
    d2 = p.patched_logprobs(TOY_DOCS["d5"], QUERIES) - base
    assert (d1 != 0).all()
    assert d1.tolist() == d2.tolist()
    assert all(torch.equal(a, b) for a, b in zip(before, p.model.parameters()))
    for i, t in enumerate(p.params):
        st = p.optimizer.state[t]
        assert set(st) == set(opt_before[i])
        assert all(torch.equal(st[k], opt_before[i][k]) for k in st)
    assert p.logprobs(QUERIES).tolist() == base.tolist()
    # a step on the document that states the fact raises the target's probability
    assert d1[1] > 0


def test_tailpatch_sgd_without_state(tmp_path):
    from tracestar.evaluate.tailpatch import DEFAULT_LR, TailPatcher

    p = TailPatcher.from_dir(_tiny_model_dir(tmp_path / "m", optimizer_state=False))
    assert p.optimizer_kind == "sgd" and p.lr == DEFAULT_LR
    before = [t.detach().clone() for t in p.model.parameters()]
    base = p.logprobs(QUERIES)
    d1 = p.patched_logprobs(TOY_DOCS["d1"], QUERIES) - base
    d2 = p.patched_logprobs(TOY_DOCS["d1"], QUERIES) - base
    assert d1.tolist() == d2.tolist() and (d1 != 0).any()
    assert all(torch.equal(a, b) for a, b in zip(before, p.model.parameters()))


def test_tail_patch_averages(model_dir):
    import math

    from tracestar.evaluate.tailpatch import TailPatcher, relevant_results, tail_patch

    p = TailPatcher.from_dir(model_dir, lr=0.05)
    methods = {"m": [_res("qa", ["d4", "d0"]), _res("qb", ["d5"]), _res("qc", [])], "relevant": relevant_results(QUERIES)}
    tp = tail_patch(p, QUERIES, methods, TOY_DOCS, ks=(1, 3))
    base = p.logprobs(QUERIES)
    da4 = p.patched_logprobs(TOY_DOCS["d4"], QUERIES[:1])[0] - base[0]
    da0 = p.patched_logprobs(TOY_DOCS["d0"], QUERIES[:1])[0] - base[0]
    db5 = p.patched_logprobs(TOY_DOCS["d5"], QUERIES[1:2])[0] - base[1]
    assert tp["m"]["1"]["n_queries"] == 2  # qc has no proponents
    assert tp["m"]["1"]["delta_logprob"] == pytest.approx((da4 + db5) / 2, abs=1e-6)
    assert tp["m"]["3"]["delta_logprob"] == pytest.approx(((da4 + da0) / 2 + db5) / 2, abs=1e-6)
    dp = (math.exp(base[0] + da4) - math.exp(base[0]) + math.exp(base[1] + db5) - math.exp(base[1])) / 2
    assert tp["m"]["1"]["delta_prob"] == pytest.approx(dp, rel=1e-4, abs=1e-9)
    assert tp["relevant"]["1"]["n_queries"] == 3


# --- report and the evaluate() glue --------------------------------------------------------------


class _FakeIndex:
    """Stands in for tracestar.api's index: ranks documents by a fixed rule."""

    def __init__(self, path, model_dir, corpus, variant=None, reverse=False):
        self.manifest = {"model": {"path": str(model_dir)}, "normalizer": {"source": None},
                         "corpus": {"path": str(corpus), "text_field": "text", "id_field": "id"},
                         "preconditioner": {"kind": "mixed"}}
        if variant:
            self.manifest["variant"] = variant
        self.doc_ids = list(TOY_DOCS)
        self.reverse = reverse
        self.store = types.SimpleNamespace(chunked=False)  # one row per document

    def query(self, queries, top_k=10, model_dir=None, by_doc=False):
        ids = self.doc_ids[::-1] if self.reverse else self.doc_ids
        return [_res(q.id, ids[:top_k]) for q in queries]


@pytest.fixture
def fake_api(monkeypatch, tmp_path, model_dir):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"id": k, "text": v} for k, v in TOY_DOCS.items()])
    qpath = tmp_path / "queries.jsonl"
    write_jsonl(qpath, [{"id": q.id, "prompt": q.prompt, "target": q.target, **q.extra} for q in QUERIES])
    mod = types.ModuleType("tracestar.api")

    def open_index(path):
        path = Path(path)
        return _FakeIndex(path, model_dir, corpus, variant="unit-norm" if path.name == "v1" else None,
                          reverse=path.name != "main")

    mod.open_index = open_index
    monkeypatch.setitem(sys.modules, "tracestar.api", mod)
    import tracestar

    monkeypatch.setattr(tracestar, "api", mod, raising=False)
    return tmp_path, qpath


def test_evaluate_writes_report(fake_api, model_dir):
    from tracestar.evaluate.run import evaluate

    tmp, qpath = fake_api
    out = tmp / "report"
    m = evaluate(tmp / "main", qpath, out, variants=[tmp / "v1", tmp / "v2"], ks=(1, 3, 5, 10), max_queries=2,
                 quiet=True)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    for method in ("tracestar", "bm25", "unit-norm", "v2"):
        d = saved[method]
        assert {"mrr", "recall@1", "recall@10", "by_bucket", "tailpatch"} <= set(d)
        assert set(d["by_bucket"]) == {"1", "2-3"}
        assert set(d["by_bucket"]["1"]) >= {"mrr", "recall@10", "n"}
        assert set(d["tailpatch"]) == {"1", "3", "5", "10"}
        assert set(d["tailpatch"]["3"]) >= {"delta_logprob", "delta_prob"}
    assert set(saved["relevant"]) == {"tailpatch"}
    # fake tracestar ranks d0 first: qb's relevant d0 at rank 1; qa's d4 at 5; qc's d1 at 2
    assert saved["tracestar"]["mrr"] == pytest.approx((1 / 5 + 1 + 1 / 2) / 3)
    assert saved["bm25"]["recall@1"] == pytest.approx(1.0)
    assert saved["_settings"]["tailpatch"]["n_queries"] == 2
    assert saved["_settings"]["tailpatch"]["lr"] == pytest.approx(0.02)
    for png in ("attribution_by_bucket.png", "tailpatch.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| tracestar |" in report and "| BM25 |" in report and "| fact-stating documents |" in report
    assert "| bm25 |" not in report and "lr = 0.02" in report
    for method in ("tracestar", "bm25"):  # the saved rankings are the lists the figures were computed from
        ranked = [json.loads(line) for line in (out / "rankings" / f"{method}.jsonl").read_text().splitlines()]
        assert [r["query_id"] for r in ranked] == [q.id for q in QUERIES]
        assert attribution_metrics(QUERIES, ranked, ks=(1, 3, 5, 10))["mrr"] == pytest.approx(saved[method]["mrr"])
    # the model's accuracy, measured on the index's model, is saved and stated; "model" is no method
    from tracestar.evaluate.run import ACCURACY_THRESHOLD, methods_of
    from tracestar.world.train import first_token_accuracy

    acc = first_token_accuracy(model_dir, None, QUERIES)
    assert saved["model"]["first_token_accuracy"] == pytest.approx(acc) and saved["model"]["n_queries"] == 3
    assert (saved["model"]["accuracy_warning"] is None) == (acc >= ACCURACY_THRESHOLD)
    assert f"first-token accuracy {acc:.1%} on 3 queries" in report
    assert "model" not in methods_of(saved) and "model" not in saved["_settings"]["variants"]


def test_report_without_tailpatch(tmp_path):
    from tracestar.evaluate.run import evaluate_results, format_table, write_report

    queries = [_q("q1", ["a"], "1"), _q("q2", ["b"], "2-3")]
    m = evaluate_results(queries, {"tracestar": [_res("q1", ["a"]), _res("q2", ["a", "b"])],
                                   "bm25": [_res("q1", ["b", "a"]), _res("q2", ["b"])]}, ks=(1, 10))
    write_report(m, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["tracestar"]["mrr"] == pytest.approx(0.75) and saved["bm25"]["mrr"] == pytest.approx(0.75)
    assert (tmp_path / "attribution_by_bucket.png").exists() and not (tmp_path / "tailpatch.png").exists()
    assert "Δlogp" not in format_table(m)
    assert "accuracy" not in format_table(m) and "model" not in saved  # no model: nothing claimed


def _metrics_with_accuracy(acc):
    from tracestar.evaluate.run import evaluate_results, model_summary

    queries = [_q("q1", ["a"], "1"), _q("q2", ["b"], "2-3")]
    m = evaluate_results(queries, {"tracestar": [_res("q1", ["a"])], "bm25": [_res("q1", ["b", "a"])],
                                   "relevant": []}, ks=(1, 10))
    m["model"] = model_summary(acc, 1189)
    return m


@pytest.mark.parametrize("acc", [0.398, 0.896])
def test_table_and_report_state_accuracy_and_warn_when_low(tmp_path, acc):
    from tracestar.evaluate.run import ACCURACY_THRESHOLD, format_table, write_report

    m = _metrics_with_accuracy(acc)
    low = acc < ACCURACY_THRESHOLD
    assert ACCURACY_THRESHOLD == 0.7
    table = format_table(m)
    assert f"first-token accuracy {acc:.1%} on 1189 queries" in table
    assert ("WARNING" in table) == low
    assert table.index("accuracy") < table.index("| method |")  # read before the figures
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["method", "tracestar", "BM25", "fact-stating documents"]
    write_report(m, tmp_path)
    report = (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["model"]["first_token_accuracy"] == pytest.approx(acc)
    assert f"first-token accuracy {acc:.1%}" in report
    if low:
        warning = saved["model"]["accuracy_warning"]
        assert warning.startswith(f"the model's first-token accuracy ({acc:.1%}) is below 70%")
        assert report.splitlines()[2].startswith("> **Warning:** the model's first-token accuracy (39.8%)")
    else:
        assert saved["model"]["accuracy_warning"] is None and "Warning" not in report


def test_unknown_accuracy_is_null_and_warned(tmp_path):
    from tracestar.evaluate.run import format_table, write_report

    m = _metrics_with_accuracy(float("nan"))
    write_report(m, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: no NaN
    assert saved["model"]["first_token_accuracy"] is None and "unknown" in saved["model"]["accuracy_warning"]
    assert "first-token accuracy unknown" in format_table(m)


def test_report_md_and_html_show_the_same_figures(tmp_path):
    """One table model, two renderers: each row of report.md's tables is a row of the HTML section."""
    from tracestar.evaluate.run import evaluate_results, model_summary, write_report
    from tracestar.evaluate.summary import bucket_table, results_table
    from tracestar.report import render_report

    queries = [_q("q1", ["a"], "1"), _q("q2", ["b"], "2-3"), _q("q3", ["c"], "2-3")]
    m = evaluate_results(queries, {"tracestar": [_res("q1", ["a"]), _res("q2", ["a", "b"]), _res("q3", ["c"])],
                                   "bm25": [_res("q1", ["b", "c", "a"]), _res("q2", ["b"])]}, ks=(1, 3))
    m["model"] = model_summary(0.5, 3)
    write_report(m, tmp_path / "eval")
    md = (tmp_path / "eval" / "report.md").read_text()
    page = render_report([], {}, tmp_path / "r.html", eval_dir=tmp_path / "eval").read_text(encoding="utf-8")
    rows = results_table(m).rows
    # tracestar: ranks 1, 2, 1 -> MRR (1 + 1/2 + 1) / 3; BM25: rank 3, rank 1, miss -> (1/3 + 1 + 0) / 3
    assert rows == (("tracestar", "0.833", "0.667", "1.000"), ("BM25", "0.444", "0.333", "0.667"))
    buckets = bucket_table(m).rows
    assert [r[:2] for r in buckets] == [("1", "1"), ("2-3", "2")]
    for row in rows + buckets:
        assert "| " + " | ".join(row) + " |" in md
        html_row = f"<tr><td>{row[0]}</td>" + "".join(f'<td class="num">{c}</td>' for c in row[1:]) + "</tr>"
        assert html_row in page
    for text in ("first-token accuracy 50.0% on 3 queries", "is below 70%"):
        assert text in md and text in page.replace("<strong>", "").replace("</strong>", "")
    assert "attribution_by_bucket.png" in md and page.count('src="data:image/png;base64,') == 1


def test_cli_eval(fake_api, capsys):
    from tracestar.cli import main

    tmp, qpath = fake_api
    rc = main(["eval", "--index", str(tmp / "main"), "--queries", str(qpath), "--bm25", "--tail-patch",
               "--k", "1,3", "--max-queries", "1", "--out", str(tmp / "r")])
    out = capsys.readouterr().out
    assert rc == 0 and "| tracestar |" in out and "| BM25 |" in out and "report.md" in out
    assert "first-token accuracy" in out
    saved = json.loads((tmp / "r" / "metrics.json").read_text())
    assert set(saved["tracestar"]["tailpatch"]) == {"1", "3"}
    assert main(["eval", "--index", "x", "--queries", str(qpath), "--k", "0", "--out", str(tmp / "r2")]) == 2


# --- the demo, end to end (slow) -----------------------------------------------------------------


@pytest.mark.slow
def test_demo_small(tmp_path):
    from tracestar.evaluate.demo import run_demo

    out = tmp_path / "demo"
    threads_before = torch.get_num_threads()
    m = run_demo(out, scale="small", quiet=True)
    for method in ("tracestar", "bm25"):
        assert set(m[method]["tailpatch"]) == {"1", "3", "5", "10"}
    # measured (150 queries, 653 documents): BM25 MRR 1.0, TrackStar 0.27 against 0.04 by chance, and
    # one step on TrackStar's top proponent raises the target's log-probability (Δlogp@1 0.16)
    n_docs = len((out / "world" / "corpus.jsonl").read_text().splitlines())
    queries = [json.loads(line) for line in (out / "world" / "queries.jsonl").read_text().splitlines()]
    chance = sum(tiny.chance_mrr(n_docs, len(q["relevant"])) for q in queries) / len(queries)
    assert m["bm25"]["mrr"] > 0.95 and m["tracestar"]["n"] == len(queries)
    assert 4 * chance < m["tracestar"]["mrr"] < m["bm25"]["mrr"], (m["tracestar"]["mrr"], chance)
    assert m["tracestar"]["tailpatch"]["1"]["delta_logprob"] > 0.05
    assert "tailpatch" in m["relevant"]
    assert (out / "eval" / "metrics.json").exists() and (out / "eval" / "report.md").exists()
    # every planned step taken, and the accuracy the evaluation measured is the trainer's
    log = json.loads((out / "model" / "train_log.json").read_text())
    assert log["steps"] == log["planned_steps"] == 30 * -(-log["n_docs"] // 32) and "stopped_early" not in log
    assert m["model"]["first_token_accuracy"] == pytest.approx(log["first_token_accuracy"], abs=1e-9)
    assert "first-token accuracy" in (out / "eval" / "report.md").read_text()
    assert m["_demo"]["threads"] == 1 and torch.get_num_threads() == threads_before
    # everything cached: a second run redoes nothing and returns the same metrics
    m2 = run_demo(out, scale="small", quiet=True)
    assert m2["tracestar"] == m["tracestar"] and m2["_demo"]["cached"] == {"world": True, "train": True,
                                                                             "index": True, "eval": True}
