"""The linear datamodeling score: its math, its run cache, the exact-gradient reference, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tracestar.corpus import Query
from tracestar.evaluate import lds as L

# --- the math --------------------------------------------------------------------------------------


def test_average_ranks_share_ties():
    assert L.average_ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert L.average_ranks(np.array([5, 5, 5])).tolist() == [2.0, 2.0, 2.0]


def test_spearman_known_values():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert L.spearman(x, x ** 3) == pytest.approx(1.0)  # any increasing map
    assert L.spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    # 1 - 6 Σd² / (n(n²-1)) without ties: ranks of y = [2, 1, 4, 3, 5], Σd² = 4 → 1 - 24/120
    assert L.spearman(x, np.array([20.0, 10.0, 40.0, 30.0, 50.0])) == pytest.approx(0.8)
    # with ties: Pearson of the average ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4.0])
    assert L.spearman(np.array([1.0, 2, 2, 3]), np.array([1.0, 2, 3, 4])) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert np.isnan(L.spearman(np.ones(4), x[:4]))


def test_subset_masks_are_exact_seeded_and_extend():
    m = L.subset_masks(101, 8, 0.5, seed=3)
    assert m.shape == (8, 101) and (m.sum(axis=1) == 50).all()  # round(50.5) = 50 (banker's)
    assert len({r.tobytes() for r in m}) == 8
    assert (L.subset_masks(101, 5, 0.5, seed=3) == m[:5]).all()  # a larger M keeps the first subsets
    assert not (L.subset_masks(101, 8, 0.5, seed=4) == m).all()
    assert (L.subset_masks(40, 3, 0.25).sum(axis=1) == 10).all()


def test_bootstrap_ci_brackets_the_mean_and_narrows():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 1.0, 20), rng.normal(0.3, 1.0, 2000)
    lo, hi = L.bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = L.bootstrap_ci(large)
    assert lo2 < large.mean() < hi2 and (hi2 - lo2) < (hi - lo) / 5  # ~1/√n: 10× the width for 100× the data
    assert L.bootstrap_ci(np.full(7, 0.25)) == (pytest.approx(0.25), pytest.approx(0.25))


def _linear_world(n_docs=60, n_queries=12, subsets=40, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    tau = rng.standard_normal((n_queries, n_docs))
    masks = L.subset_masks(n_docs, subsets, 0.5, seed)
    actual = masks @ tau.T + noise * rng.standard_normal((subsets, n_queries))
    return tau, masks, actual


def test_lds_is_one_for_the_true_scores_and_near_zero_for_noise():
    tau, masks, actual = _linear_world(noise=0.5)
    good = L.lds(tau, masks, actual)
    assert good["lds"] > 0.9 and good["ci"][0] > 0.85 and len(good["per_query"]) == 12
    assert L.lds(-tau, masks, actual)["lds"] < -0.9
    noise = L.lds(np.random.default_rng(9).standard_normal(tau.shape), masks, actual)
    assert abs(noise["lds"]) < 0.15 and noise["ci"][0] < 0 < noise["ci"][1] + 0.1


def test_a_constant_prediction_scores_zero_not_nan():
    tau, masks, actual = _linear_world()
    blank = np.zeros_like(tau)
    blank[0] = tau[0]  # one query predicted, the rest constant
    per_q = L.lds(blank, masks, actual)["per_query"]
    assert per_q[0] > 0.99 and per_q[1:] == [0.0] * 11


def test_rank_metrics_full_rank():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0]])
    # q0: relevant doc 2 is second; q1: best relevant (3) is first; q2: no relevant docs (skipped)
    out = L.rank_metrics(scores, [[2], [0, 3], []], k=1)
    assert out == {"mrr": pytest.approx((0.5 + 1.0) / 2), "recall@1": 0.5}


def test_top_results_are_ranked_lists():
    qs = [Query("a", "p", " t"), Query("b", "p", " u")]
    res = L.top_results(np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]]), ["x", "y", "z"], qs, k=2)
    assert [p["doc_id"] for p in res[0]["proponents"]] == ["y", "z"]
    assert [p["doc_id"] for p in res[1]["proponents"]] == ["x", "y"] and res[1]["query_id"] == "b"


# --- runs: cached, resumable, rank-aware -------------------------------------------------------------


class _Fake:
    """A 'trainer' that returns log-probs from the mask, and can die at a chosen run."""

    def __init__(self, die_at: int | None = None):
        self.calls: list[int] = []
        self.die_at = die_at

    def __call__(self, m: int, mask: np.ndarray) -> np.ndarray:
        if m == self.die_at:
            raise KeyboardInterrupt
        self.calls.append(m)
        return np.array([mask[:5].sum(), -float(m)])


def test_a_killed_job_resumes_where_it_stopped(tmp_path):
    masks = L.subset_masks(20, 6, 0.5)
    key = {"train": "x"}
    first = _Fake(die_at=3)
    with pytest.raises(KeyboardInterrupt):
        L.collect_runs(tmp_path, masks, key, 2, first)
    assert first.calls == [0, 1, 2] and len(list(tmp_path.glob("run-*.json"))) == 3
    assert not list(tmp_path.glob("*.tmp-*"))  # nothing half-written
    second = _Fake()
    out = L.collect_runs(tmp_path, masks, key, 2, second)
    assert second.calls == [3, 4, 5]
    assert out[:, 1].tolist() == [0, -1, -2, -3, -4, -5] and out[:, 0].tolist() == masks[:, :5].sum(axis=1).tolist()
    third = _Fake()
    assert (L.collect_runs(tmp_path, masks, key, 2, third) == out).all() and third.calls == []
    # another training config (or another subset for the same slot) is not served from the cache
    fourth = _Fake()
    L.collect_runs(tmp_path, masks, {"train": "y"}, 2, fourth)
    assert fourth.calls == [0, 1, 2, 3, 4, 5]
    fifth = _Fake()
    L.collect_runs(tmp_path, L.subset_masks(20, 6, 0.5, seed=1), {"train": "y"}, 2, fifth)
    assert fifth.calls == [0, 1, 2, 3, 4, 5]


def test_ranks_share_the_runs(tmp_path):
    masks = L.subset_masks(20, 5, 0.5)
    odd = _Fake()
    assert L.collect_runs(tmp_path, masks, {}, 2, odd, rank=1, world=2) is None  # rank 0's runs are missing
    even = _Fake()
    out = L.collect_runs(tmp_path, masks, {}, 2, even, rank=0, world=2)
    assert odd.calls == [1, 3] and even.calls == [0, 2, 4] and out.shape == (5, 2)


# --- the exact-gradient reference --------------------------------------------------------------------


def test_exact_scores_predict_one_sgd_step(tmp_path):
    """τ(i, q) = ∇L_i · ∇L_q, so one SGD step of size η on document i changes log p(target of q) by ≈ η τ."""
    import tiny

    from tracestar.batching import (
        collate,
        encode_document,
        encode_query,
        forward_loss,
        pad_id,
    )

    model_dir = tiny.save(tiny.gpt2(seed=1), tmp_path / "m")
    texts = ["paris is the capital of france .", "berlin is a city in germany ."]
    queries = [Query("q", "the capital of france is", " paris"), Query("r", "berlin is in", " germany")]
    tau = L.exact_gradient_scores(model_dir, texts, queries)
    assert tau.shape == (2, 2)
    model, tok = tiny.gpt2(seed=1), tiny.make_tokenizer()
    enc = [encode_query(tok, q.prompt, q.target, i, 64) for i, q in enumerate(queries)]
    base = L.target_logprobs(model, enc, tok)
    eta = 1e-5  # small enough for the first-order term to dominate (at 1e-3 the second order is ~70%)
    for i, t in enumerate(texts):
        stepped = tiny.gpt2(seed=1)
        forward_loss(stepped, collate([encode_document(tok, t, 0, 64)], pad_id(tok))).sum().backward()
        with torch.no_grad():
            for p in stepped.parameters():
                p -= eta * p.grad
        delta = L.target_logprobs(stepped, enc, tok) - base
        assert delta == pytest.approx(eta * tau[:, i], rel=0.05)


def test_index_scores_are_the_search_scores(world, tmp_path):
    """τ [Q, N] of an index is what `query` ranks by: same top document, same score (fp16 storage)."""
    from tracestar.api import build_index, open_index
    from tracestar.corpus import read_queries

    d = build_index(world["model"], world["corpus"], tmp_path / "idx", variant="opt-norm", proj_dim=256,
                    optimizer_state=str(world["optimizer"]), quiet=True)
    queries = read_queries(world["queries"])
    tau = L.index_scores(d, queries, world["model"])
    found = open_index(d).query(queries, top_k=1, exact=True)
    ids = open_index(d).doc_ids
    assert tau.shape == (len(queries), len(ids))
    for qi, r in enumerate(found):
        best = r["proponents"][0]
        assert tau[qi, ids.index(best["doc_id"])] == pytest.approx(best["score"], abs=1e-3)
        assert tau[qi].max() == pytest.approx(best["score"], abs=1e-3)


# --- the command line --------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,option", [
    (["--subsets", "2"], "--subsets"), (["--fraction", "1"], "--fraction"), (["--fraction", "0"], "--fraction"),
    (["--variants", "trak"], "--variants"), (["--max-queries", "0"], "--max-queries"),
])
def test_lds_options_are_checked_before_anything_is_written(tmp_path, capsys, extra, option):
    from tracestar.cli import main

    code = main(["lds", "--world", str(tmp_path / "w"), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and option in err[0]
    assert not (tmp_path / "out").exists()


def test_lds_names_a_missing_world_file(tmp_path, capsys):
    from tracestar.cli import main

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "corpus.jsonl").write_text('{"id": "a", "text": "x y"}\n')
    code = main(["lds", "--world", str(tmp_path / "w"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "queries.jsonl" in err[0] and not (tmp_path / "out").exists()


# --- end to end (slow) -------------------------------------------------------------------------------


def _tiny_world(root: Path, n_queries: int = 30, max_docs: int = 140) -> Path:
    """A slice of the `small` world: the documents stating n_queries facts, filled up with others."""
    from tracestar.world import make_world

    paths = make_world(root / "full", scale="small")
    queries = [json.loads(line) for line in paths.queries.read_text().splitlines()]
    docs = [json.loads(line) for line in paths.corpus.read_text().splitlines()]
    picked = [q for q in queries if len(q["relevant"]) <= 4][:n_queries]
    keep = {d for q in picked for d in q["relevant"]}
    for d in docs:
        if len(keep) >= max_docs:
            break
        keep.add(d["id"])
    w = root / "tiny"
    w.mkdir()
    (w / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs if d["id"] in keep))
    (w / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in picked))
    return w


@pytest.mark.slow
def test_exact_gradients_beat_random_on_lds(tmp_path):
    """Known-good attribution (full gradients, no projection) must predict retraining; noise must not."""
    world = _tiny_world(tmp_path)
    res = L.run_lds(world, tmp_path / "out", subsets=24, variants=("exact", "random", "relevant"),
                    train={"d_model": 64, "vocab_size": 1024, "epochs": 20}, quiet=True)
    assert res["exact"]["lds"] > 0.15
    assert res["exact"]["ci"][0] > res["random"]["ci"][1]
    assert abs(res["random"]["lds"]) < 0.12
    assert len(list((tmp_path / "out" / "runs").glob("run-*.json"))) == 24
    assert json.loads((tmp_path / "out" / "lds.json").read_text())["exact"]["lds"] == res["exact"]["lds"]
