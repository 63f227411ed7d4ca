"""Index build → open → query, checked against brute force, checksums, fingerprints and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tiny
from tracestar.api import build_index, open_index, refit
from tracestar.corpus import read_queries
from tracestar.errors import IndexStoreError, UserError

DIM = 4096


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index(world["model"], world["corpus"], out, optimizer_state=world["optimizer"], proj_dim=DIM,
                eval_queries=world["queries"], shard_docs=3, quiet=True)
    return out


def test_fact_document_is_top_proponent(world, built):
    queries = read_queries(world["queries"])
    results = open_index(built).query(queries, top_k=3)
    assert [r["query_id"] for r in results] == [q.id for q in queries]
    for i, r in enumerate(results):
        assert r["proponents"][0]["doc_id"] == f"d{i}", r  # the document stating the fact
        assert r["proponents"][0]["score"] > r["proponents"][1]["score"]


def test_search_equals_brute_force(world, built):
    idx = open_index(built)
    queries = read_queries(world["queries"])
    qv = idx.query_vectors(queries)
    scores = qv @ tiny.all_vectors(idx).T  # [Q, N]
    results = idx.query(queries, top_k=4)
    ids = idx.doc_ids
    for qi, r in enumerate(results):
        order = np.argsort(-scores[qi], kind="stable")
        assert [p["doc_id"] for p in r["proponents"]] == [ids[j] for j in order[:4]]
        np.testing.assert_allclose([p["score"] for p in r["proponents"]], scores[qi, order[:4]], atol=1e-4)
        low = np.argsort(scores[qi], kind="stable")
        assert [p["doc_id"] for p in r["opponents"]] == [ids[j] for j in low[:4]]
    # unit-normalised cosines
    np.testing.assert_allclose(np.linalg.norm(tiny.all_vectors(idx), axis=1), 1.0, atol=2e-3)


def test_top_k_larger_than_corpus_returns_every_document(world, built):
    idx = open_index(built)
    r = idx.query(read_queries(world["queries"])[:1], top_k=1000)[0]
    assert sorted(p["doc_id"] for p in r["proponents"]) == sorted(idx.doc_ids)
    assert [p["score"] for p in r["proponents"]] == sorted((p["score"] for p in r["proponents"]), reverse=True)


def test_manifest_records_what_was_done(built):
    m = json.loads((built / "manifest.json").read_text())
    assert m["model"]["coverage"] > 0.95
    assert m["normalizer"]["kind"] == "torch_adafactor"
    assert m["preconditioner"]["kind"] == "mixed" and 0 < m["preconditioner"]["lambda"] < 1
    assert m["dim"] == sum(b["k"] ** 2 for b in m["projection"]["blocks"]) and m["dim"] <= DIM
    assert sum(s["rows"] for s in m["shards"]) == m["n_docs"] == len(tiny.FACTS + tiny.FILLER)
    assert m["dtype"] == "float16" and m["unit_norm"] is True
    for s in m["shards"]:
        assert np.load(built / "vectors" / f"{s['name']}.npy").dtype == np.float16


def test_corrupted_shard_is_detected(world, built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    shard = copy / "vectors" / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IndexStoreError, match="checksum"):
        open_index(copy).query(read_queries(world["queries"])[:1], top_k=2)


def test_a_different_model_is_refused(world, built, tmp_path):
    other = tiny.save(tiny.gpt2(seed=5), tmp_path / "other")
    with pytest.raises(UserError, match="fingerprint"):
        open_index(built).query(read_queries(world["queries"])[:1], model_dir=other)


def test_rerun_is_idempotent_and_other_arguments_are_refused(world, built):
    build_index(world["model"], world["corpus"], built, optimizer_state=world["optimizer"], proj_dim=DIM,
                eval_queries=world["queries"], shard_docs=3, quiet=True)  # nothing to do
    with pytest.raises(UserError, match="different arguments.*seed"):
        build_index(world["model"], world["corpus"], built, optimizer_state=world["optimizer"], proj_dim=DIM,
                    eval_queries=world["queries"], shard_docs=3, seed=9, quiet=True)


def test_variants_follow_the_ladder(world, tmp_path):
    vecs, manifests = {}, {}
    for variant in ("dot", "opt", "opt-norm", "train-r", "trackstar"):
        out = build_index(world["model"], world["corpus"], tmp_path / variant, optimizer_state=world["optimizer"],
                          proj_dim=1024, variant=variant, eval_queries=world["queries"], quiet=True)
        idx = open_index(out)
        manifests[variant], vecs[variant] = idx.manifest, tiny.all_vectors(idx)
    expect = {
        "dot": (False, False, "none"), "opt": (True, False, "none"), "opt-norm": (True, True, "none"),
        "train-r": (True, True, "train"), "trackstar": (True, True, "mixed"),
    }
    for variant, (corr, unit, pre) in expect.items():
        m = manifests[variant]
        assert (m["variant"], m["optimizer_correction"], m["unit_norm"], m["preconditioner"]["kind"]) == (variant, corr, unit, pre)
        assert m["normalizer"]["kind"] == ("torch_adafactor" if corr else "none")
    assert 0 < manifests["trackstar"]["preconditioner"]["lambda"] < 1  # λ = s_t / (s_t + s_e) of two positive eigenvalues
    # each rung changes the vectors
    names = list(expect)
    for a, b in zip(names, names[1:]):
        assert not np.allclose(vecs[a], vecs[b], atol=1e-3), (a, b)
    # opt-norm is opt, unit-normalised
    opt = vecs["opt"] / np.linalg.norm(vecs["opt"], axis=1, keepdims=True)
    np.testing.assert_allclose(vecs["opt-norm"], opt, atol=2e-3)


def test_refit_equals_fresh_build(world, tmp_path):
    kw = dict(optimizer_state=world["optimizer"], proj_dim=1024, quiet=True)
    base = build_index(world["model"], world["corpus"], tmp_path / "train", preconditioner="train", **kw)
    fresh = build_index(world["model"], world["corpus"], tmp_path / "fresh", eval_queries=world["queries"], lam=0.7, **kw)
    refitted = refit(base, tmp_path / "refit", eval_queries=world["queries"], lam=0.7, quiet=True)
    a, b = open_index(fresh), open_index(refitted)
    assert b.manifest["preconditioner"]["kind"] == "mixed" and b.manifest["preconditioner"]["lambda"] == 0.7
    np.testing.assert_allclose(tiny.all_vectors(a), tiny.all_vectors(b), atol=1e-5)
    qs = read_queries(world["queries"])
    np.testing.assert_allclose(a.query_vectors(qs), b.query_vectors(qs), atol=1e-5)


# --- bad input through the CLI -----------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, where",
    [
        (['{"id": "a", "text": "the city"}', '{"id": "b", "text": "the river"', '{"text": "x"}'], (2, None)),
        (['{"id": "a", "text": "the city"}', '{"id": "b", "body": "the river"}'], (2, "text")),
        (['{"id": "a", "text": "the city"}', '{"id": "b", "text": "   "}'], (2, "text")),
        (['{"id": "a", "text": "the city"}', '{"id": "a", "text": "the river"}'], (2, "id")),
    ],
    ids=["malformed-json", "missing-text", "empty-text", "duplicate-id"],
)
def test_bad_corpus_is_one_line_error_and_leaves_nothing(world, tmp_path, lines, where):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "index"
    proc = tiny.cli("index", "--model", str(world["model"]), "--corpus", str(corpus), "--out", str(out), "--quiet")
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    line, field = where
    assert f"{corpus}:{line}:" in err[0]
    if field:
        assert f"field '{field}'" in err[0]
    assert not out.exists()


def test_query_without_target_is_refused(world, built, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "q0", "prompt": "the capital of france is", "target": " paris"}\n{"id": "q1", "prompt": "x"}\n')
    for args in (
        ["query", "--index", str(built), "--queries", str(q), "--out", str(tmp_path / "r.jsonl")],
        ["index", "--model", str(world["model"]), "--corpus", str(world["corpus"]), "--out", str(tmp_path / "i"), "--eval-queries", str(q)],
    ):
        proc = tiny.cli(*args)
        assert proc.returncode != 0
        assert proc.stderr.strip().count("\n") == 0 and f"{q}:2: field 'target': missing" in proc.stderr
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "i").exists()


def test_cli_index_and_query(world, tmp_path):
    out, res = tmp_path / "index", tmp_path / "results.jsonl"
    proc = tiny.cli("index", "--model", str(world["model"]), "--corpus", str(world["corpus"]), "--out", str(out),
                "--optimizer-state", str(world["optimizer"]), "--proj-dim", "1024", "--blocks", "module", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = tiny.cli("query", "--index", str(out), "--queries", str(world["queries"]), "--out", str(res), "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    assert [r["query_id"] for r in rows] == [f"q{i}" for i in range(len(tiny.FACTS))]
    assert set(rows[0]) == {"query_id", "prompt", "target", "proponents", "opponents"}
    assert (rows[0]["prompt"], rows[0]["target"]) == ("the capital of france is", " paris")
    assert len(rows[0]["proponents"]) == 2 and set(rows[0]["proponents"][0]) == {"doc_id", "score"}
    assert rows[0]["opponents"][0]["score"] <= rows[0]["opponents"][1]["score"]


def test_bf16_autocast_is_recorded_and_close_to_fp32(world, tmp_path):
    kw = dict(optimizer_state=world["optimizer"], proj_dim=1024, preconditioner="none", quiet=True)
    fp32 = open_index(build_index(world["model"], world["corpus"], tmp_path / "fp32", **kw))
    bf16 = open_index(build_index(world["model"], world["corpus"], tmp_path / "bf16", autocast="bfloat16", **kw))
    assert bf16.manifest["autocast"] == "bfloat16" and fp32.manifest["autocast"] is None
    a, b = tiny.all_vectors(fp32), tiny.all_vectors(bf16)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.97 and not np.array_equal(a, b)  # bf16 really ran, and stayed close
    results = bf16.query(read_queries(world["queries"]), top_k=1)
    assert [r["proponents"][0]["doc_id"] for r in results] == [f"d{i}" for i in range(len(tiny.FACTS))]


def test_llama_style_model_directory_builds_and_queries(world, tmp_path):
    """Untied head, rotary positions, grouped-query attention: the whole path, not just capture."""
    model_dir = tiny.save(tiny.llama(seed=2), tmp_path / "llama")
    out = build_index(model_dir, world["corpus"], tmp_path / "index", proj_dim=1024, eval_queries=world["queries"], quiet=True)
    idx = open_index(out)
    assert idx.manifest["normalizer"]["kind"] == "estimated"  # no optimizer state given
    assert "lm_head.weight" in idx.manifest["model"]["tracked"] and idx.manifest["model"]["coverage"] > 0.9
    queries = read_queries(world["queries"])
    scores = idx.query_vectors(queries) @ tiny.all_vectors(idx).T
    results = idx.query(queries, top_k=3)
    for qi, r in enumerate(results):
        assert [p["doc_id"] for p in r["proponents"]] == [idx.doc_ids[j] for j in np.argsort(-scores[qi], kind="stable")[:3]]


# --- reruns verify and repair; failures leave nothing behind ------------------------------------


def _build_again(world, out, **kw):
    """The `built` fixture's build (its arguments, overridable)."""
    args = dict(optimizer_state=world["optimizer"], proj_dim=DIM, eval_queries=world["queries"], shard_docs=3, quiet=True)
    return build_index(world["model"], world["corpus"], out, **{**args, **kw})


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_rerun_repairs_corrupted_shards_to_the_same_bytes(world, built, tmp_path, capsys):
    import shutil

    from tracestar.index.compress import compress

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    compress(copy, "int8")  # made from the same final vectors, so it survives the repair
    before = _files(copy)
    _flip_byte(copy / "raw" / "shard-00001.npy")
    _flip_byte(copy / "vectors" / "shard-00002.npy")
    capsys.readouterr()
    _build_again(world, copy, quiet=False)
    out = capsys.readouterr().out
    assert "raw/shard-00001.npy (checksum mismatch)" in out and "vectors/shard-00002.npy (checksum mismatch)" in out
    assert "repaired: recomputed raw shard 1, final vectors of shards 1, 2 and the manifest; R reused" in out
    after = _files(copy)
    assert sorted(before) == sorted(after)
    for name in before:
        if name != "manifest.json":
            assert after[name] == before[name], name
    old, new = (json.loads(d["manifest.json"]) for d in (before, after))
    own = ("repaired", "manifest_sha256")  # the manifest's own digest covers `repaired` too
    assert "repaired" in new and {k: v for k, v in new.items() if k not in own} == {k: v for k, v in old.items() if k not in own}
    assert new["compressed"]["default"] == "int8"
    queries = read_queries(world["queries"])[:1]
    (got,), (want,) = open_index(copy).query(queries, top_k=2), open_index(built).query(queries, top_k=2)  # int8 + rerank
    assert [p["doc_id"] for p in got["proponents"]] == [p["doc_id"] for p in want["proponents"]]
    assert [p["score"] for p in got["proponents"]] == pytest.approx([p["score"] for p in want["proponents"]], abs=1e-5)
    capsys.readouterr()
    _build_again(world, copy, quiet=False)
    assert "files verified; nothing to do" in capsys.readouterr().out


def test_rerun_refits_r_only_when_it_is_damaged(world, built, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    _flip_byte(copy / "preconditioner.safetensors")
    capsys.readouterr()
    _build_again(world, copy, quiet=False)
    captured = capsys.readouterr()
    assert "preconditioner.safetensors (checksum mismatch)" in captured.out
    assert "repaired: recomputed R and the manifest" in captured.out  # same R, so no vectors rewritten
    for bar in ("R_train: statistics", "R_eval: eval-query gradients", "R_train spectrum", "R Cholesky (mixed)"):
        assert bar in captured.err, bar
    assert "indexing" not in captured.err and "final vectors" not in captured.err
    assert "resuming: all 4 shards already complete" in captured.out
    assert (copy / "preconditioner.safetensors").read_bytes() == (built / "preconditioner.safetensors").read_bytes()


def test_quiet_build_prints_nothing(world, tmp_path, capsys):
    capsys.readouterr()
    _build_again(world, tmp_path / "index")
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")


def test_a_failing_build_leaves_nothing_but_an_interrupted_one_is_kept(world, built, tmp_path, monkeypatch):
    import shutil

    from tracestar import build

    def fail(*args, **kwargs):
        raise UserError("simulated failure")

    out = tmp_path / "new" / "index"
    monkeypatch.setattr(build, "_normalizer", fail)
    with pytest.raises(UserError, match="simulated"):
        _build_again(world, out)
    assert not (tmp_path / "new").exists()  # the parent it created goes too
    # A previous, interrupted build (raw shards done, no manifest) survives a failure.
    monkeypatch.undo()
    interrupted = tmp_path / "interrupted"
    shutil.copytree(built, interrupted)
    (interrupted / "manifest.json").unlink()
    monkeypatch.setattr(build, "finalize", fail)
    with pytest.raises(UserError, match="simulated"):
        _build_again(world, interrupted)
    assert (interrupted / "build.json").exists() and (interrupted / "raw" / "shard-00003.npy").exists()


def test_refit_rerun_repairs_its_vectors(world, built, tmp_path):
    out = refit(built, tmp_path / "refit", preconditioner="train", quiet=True)
    before = _files(out)
    _flip_byte(out / "vectors" / "shard-00000.npy")
    refit(built, out, preconditioner="train", quiet=True)
    after = _files(out)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {k: v for k, v in before.items() if k != "manifest.json"}


def test_options_are_checked_by_the_library(world, built, tmp_path):
    from tracestar.errors import OptionError

    idx, queries = open_index(built), read_queries(world["queries"])[:1]
    for kw, option in (({"top_k": 0}, "--top-k"), ({"top_k": -1}, "--top-k"), ({"top_k": 3, "rerank": -1}, "--rerank")):
        with pytest.raises(OptionError, match=f"^{option}: must be at least"):
            idx.query(queries, **kw)
    for kw, option in (({"max_length": 0}, "--max-length"), ({"lam": 5.0}, "--lambda"),
                       ({"proj_dim": -5}, "--proj-dim"), ({"damping": 0.0}, "--damping")):
        with pytest.raises(OptionError, match=f"^{option}: "):
            _build_again(world, tmp_path / "index", **kw)
    assert not (tmp_path / "index").exists()


def test_build_json_round_trips_through_build_options(built):
    from tracestar.options import BuildOptions

    recorded = json.loads((built / "build.json").read_text())
    opts = BuildOptions.from_json(recorded, lam=0.25, quiet=True)
    assert opts.quiet is True and opts.lam == 0.25 and opts.shard_docs == 3 and opts.proj_dim == DIM
    again = {**opts.identity(), "lam": recorded["lam"]}
    assert again == {k: v for k, v in recorded.items() if k not in ("model_fingerprint", "corpus")}
