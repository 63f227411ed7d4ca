"""R: statistics, λ by spectrum matching, R^{-1/2}, and the template effect of mixing."""

from __future__ import annotations

import pytest
import torch

from tracestar.preconditioner import (
    QueryStats,
    RStats,
    auto_lambda,
    component_index,
    fit,
    inv_sqrt,
    r_ranges,
    spectrum,
)
from tracestar.projection import Block
from tracestar.tracer import finalize_vectors


def test_ranges_cover_blocks_without_crossing():
    blocks = [Block("a", 50, [], 0), Block("b", 10, [], 2500)]
    ranges = r_ranges(blocks, r_block=1000)
    assert ranges[0][0] == 0 and ranges[-1][1] == 2600
    assert all(e - s <= 1000 for s, e in ranges)
    assert all(s == e0 for (_, e0), (s, _) in zip(ranges, ranges[1:]))
    assert (2500, 2600) in ranges  # block b is its own range


def test_stats_are_sums_that_add_up():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(40, 12, generator=gen)
    whole = RStats([(0, 5), (5, 12)])
    whole.update(v)
    half1, half2 = RStats([(0, 5), (5, 12)]), RStats([(0, 5), (5, 12)])
    half1.update(v[:25])
    half2.update(v[25:])
    others = iter(half2.sums + [half2.count])  # what the other rank holds, in reduce order
    half1.all_reduce(lambda t: t.add_(next(others)))
    # float32 sums: one rounding per update, so the halves agree with the whole to float32 precision
    for a, b in zip(whole.means(), half1.means()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * float(a.abs().max()))
    exact = (v[:, :5].double().T @ v[:, :5].double()) / 40
    assert torch.allclose(whole.means()[0], exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))
    assert whole.sums[0].dtype == torch.float32 and whole.means()[0].dtype == torch.float64


def test_inverse_square_root_whitens_the_damped_matrix():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    r = x.T @ x / 30
    damping = 0.1
    m = inv_sqrt(r, damping).double()
    evals = torch.linalg.eigvalsh(r)
    shifted = r + damping * evals.mean() * torch.eye(20, dtype=torch.float64)
    assert torch.allclose(m @ shifted @ m, torch.eye(20, dtype=torch.float64), atol=1e-5)


def test_auto_lambda_matches_hand_computation():
    # diagonal statistics: the spectra are the diagonals, sorted
    train = RStats([(0, 4)])
    train.sums = [torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64))]
    train.count = torch.tensor(1.0, dtype=torch.float64)
    evals = RStats([(0, 4)])
    evals.sums = [torch.diag(torch.tensor([0.5, 30.0, 0.25, 2.0], dtype=torch.float64))]
    evals.count = torch.tensor(2.0, dtype=torch.float64)  # mean: [0.25, 15, 0.125, 1]
    st, se = spectrum(train.means()), spectrum(evals.means())
    assert st.tolist() == [8.0, 4.0, 2.0, 1.0] and se.tolist() == [15.0, 1.0, 0.25, 0.125]
    lam, used = auto_lambda(st, se, index=1)
    assert used == 1 and abs(lam - 4.0 / (4.0 + 1.0)) < 1e-12  # λ·1 = (1 − λ)·4
    pre = fit("mixed", train, evals, dim=4)
    assert pre.info["component_index"] == component_index(4) == 0
    assert abs(pre.lam - 8.0 / (8.0 + 15.0)) < 1e-12
    assert component_index(65536) == 999


def test_mixing_downweights_a_shared_template_direction():
    """Every eval query = 3·template + its own direction; the mixed R must favour the specific doc."""
    d, n_q = 32, 8
    gen = torch.Generator().manual_seed(2)
    template = torch.zeros(d)
    template[-1] = 1.0
    specific = torch.eye(d)[:n_q]  # [n_q, d]
    queries = 3.0 * template + specific  # [n_q, d]
    train_docs = torch.randn(400, d, generator=gen)
    docs = torch.cat([template[None] + 0.05 * torch.randn(1, d, generator=gen), specific + 0.05 * torch.randn(n_q, d, generator=gen)])
    ranges = [(0, d)]
    train, evals = RStats(ranges), RStats(ranges)
    train.update(train_docs)
    evals.update(queries)

    def scores(pre):
        q = finalize_vectors(queries, pre, True)
        x = finalize_vectors(docs, pre, True)
        return q @ x.T  # [n_q, 1 + n_q]

    plain = scores(fit("none", None))
    mixed = scores(fit("mixed", train, evals, lam=0.9, damping=0.01))
    trained = scores(fit("train", train, damping=0.01))
    for i in range(n_q):
        assert plain[i].argmax() == 0  # unweighted: the template document wins
        assert mixed[i].argmax() == 1 + i  # mixed R: the query-specific document wins
        assert mixed[i, 0] < plain[i, 0] / 2  # the template's share of the score dropped
    assert (trained[:, 0] > trained[torch.arange(n_q), 1 + torch.arange(n_q)]).all()  # R_train alone does not see the template


def test_saved_file_holds_r_inverse_sqrt_only_and_older_files_with_sums_still_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tracestar.preconditioner import Preconditioner

    gen = torch.Generator().manual_seed(3)
    stats = RStats([(0, 6), (6, 10)])
    stats.update(torch.randn(50, 10, generator=gen))
    pre = fit("train", stats, damping=0.1)
    pre.save(tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as fh:
        assert sorted(fh.keys()) == ["r0.inv_sqrt", "r1.inv_sqrt", "ranges"]
    # the layout earlier versions wrote: the same, plus each range's float64 sum and the count
    old = {f"r{i}.inv_sqrt": m for i, m in enumerate(pre.mats)}
    old["ranges"] = torch.tensor(pre.ranges, dtype=torch.int64)
    old.update({f"train.r{i}.sum": s.double() for i, s in enumerate(stats.sums)})
    old["train.count"] = stats.count.reshape(1)
    save_file(old, str(tmp_path / "old.safetensors"))
    for name in ("new", "old"):
        back = Preconditioner.load(tmp_path / f"{name}.safetensors", pre.to_json())
        assert back.ranges == pre.ranges and all(torch.equal(a, b) for a, b in zip(back.mats, pre.mats))


def test_eigendecompositions_in_threads_equal_one_at_a_time():
    """`threaded_map` keeps order, and restores torch's thread count."""
    from tracestar.preconditioner import threaded_map

    gen = torch.Generator().manual_seed(4)
    mats = [(lambda x: x.T @ x)(torch.randn(40, 30, generator=gen, dtype=torch.float64)) for _ in range(5)]
    threads = torch.get_num_threads()
    seen = []
    got = threaded_map(lambda m: inv_sqrt(m, 0.1), mats, lambda items, desc: seen.append(len(items)) or items, "x")
    assert seen == [5] and torch.get_num_threads() == threads
    for g, m in zip(got, mats):
        assert torch.allclose(g, inv_sqrt(m, 0.1), atol=1e-6)


# --- the Cholesky factor, and R_eval's spectrum from the queries' Gram matrix -------------------


def _uneven(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """[n, d] rows with an uneven spectrum, as gradients have (a few strong directions)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * torch.linspace(0.02, 3.0, d) + shift


def test_cholesky_whitener_whitens_the_damped_matrix_as_inv_sqrt_does():
    from tracestar.preconditioner import chol_whitener

    x = _uneven(80, 40, 5).double()
    r = x.T @ x / 80
    w_c, w_e = chol_whitener(r, 0.1).double(), inv_sqrt(r, 0.1).double()
    shifted = r + 0.1 * torch.linalg.eigvalsh(r).mean() * torch.eye(40, dtype=torch.float64)
    assert torch.allclose(w_c.T @ shifted @ w_c, torch.eye(40, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(w_c @ w_c.T, w_e @ w_e.T, rtol=1e-5, atol=1e-6 * float((w_e @ w_e.T).abs().max()))
    assert torch.equal(w_c, w_c.triu()) and not torch.allclose(w_c, w_e, atol=1e-3)  # another basis: L^{-T}


def test_cholesky_whitener_refuses_a_non_finite_r():
    from tracestar.preconditioner import chol_whitener

    r = torch.eye(4, dtype=torch.float64)
    r[1, 2] = r[2, 1] = float("nan")
    with pytest.raises(ValueError, match="not positive definite"):
        chol_whitener(r, 0.1)


@pytest.mark.parametrize("kind", ["train", "mixed"])
def test_cholesky_preconditioner_gives_the_eigh_scores_in_another_basis(kind):
    """Scores q̂ · d̂ (and so every top-k) are the same with either factor; the vectors are not."""
    ranges = [(0, 30), (30, 70), (70, 100)]
    docs, queries = _uneven(300, 100, 6), _uneven(12, 100, 7, shift=0.4)
    train = RStats(ranges)
    train.update(docs)
    eval_ = QueryStats(ranges, queries)
    eigh, chol = (fit(kind, train, eval_, damping=0.1, factor=f) for f in ("eigh", "cholesky"))
    assert eigh.lam == chol.lam and "factor" not in eigh.info and chol.info["factor"] == "cholesky"
    scores = []
    for pre in (eigh, chol):
        d, q = finalize_vectors(docs[:100], pre, True), finalize_vectors(queries, pre, True)
        scores.append((q @ d.T, d))
    (s_e, d_e), (s_c, d_c) = scores
    torch.testing.assert_close(s_c, s_e, rtol=0, atol=1e-5)
    assert torch.equal(s_c.topk(10).indices, s_e.topk(10).indices)
    assert (d_e - d_c).abs().max() > 1e-2  # the stored vectors differ (else this test could not fail)


@pytest.mark.parametrize("n", [5, 40])
def test_query_stats_give_the_sums_mean_and_spectrum(n):
    """R_eval from the queries' vectors: the mean equals the float32 sums' to float32 rounding, and
    the spectrum from the n × n Gram (n < m) or the mean (n ≥ m) equals the m × m eigvalsh's, with
    zeros for the eigenvalues the Gram lacks."""
    ranges = [(0, 10), (10, 30)]
    v = _uneven(n, 30, 8, shift=0.3)
    sums, vecs = RStats(ranges), QueryStats(ranges, v)
    sums.update(v)
    assert vecs.gram_sizes() == [min(n, 10), min(n, 20)] and int(vecs.count) == n
    for a, b in zip(sums.means(), vecs.means()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
    s_sums, s_vecs = spectrum(sums), spectrum(vecs)
    assert s_sums.shape == s_vecs.shape == (30,)
    torch.testing.assert_close(s_vecs, s_sums, rtol=1e-5, atol=1e-6 * float(s_sums[0]))
    assert int((s_vecs > 1e-9 * s_vecs[0]).sum()) == min(n, 10) + min(n, 20)  # the rank, nothing above it


def test_lambda_from_query_stats_equals_lambda_from_sums():
    """λ from the Gram spectrum of 12 queries against the m × m eigvalsh of their float32 sums
    (the way it was computed before): equal to 1e-6 relative, and so R^{-1/2} to float32 rounding."""
    ranges = [(0, 40), (40, 100)]
    train = RStats(ranges)
    train.update(_uneven(400, 100, 9))
    queries = _uneven(12, 100, 10, shift=0.4)
    sums = RStats(ranges)
    sums.update(queries)
    old, new = fit("mixed", train, sums, dim=1000), fit("mixed", train, QueryStats(ranges, queries), dim=1000)
    assert new.info["component_index_used"] == old.info["component_index_used"] == 14
    assert new.lam == pytest.approx(old.lam, rel=1e-6) and 0.0 < new.lam < 1.0
    for a, b in zip(old.mats, new.mats):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_few_queries_put_lambda_at_the_last_nonzero_eigenvalue_of_r_eval():
    """3 queries over 2 ranges: R_eval has rank 6, so the component index (152 at dimension 10,000)
    is clipped to 5, the last non-zero eigenvalue, and λ equals the one from exact float64
    spectra. (From float32 sums, R_eval's null space held rounding noise of ~1e-7 of its top
    eigenvalue, above the 1e-12 cut, so c stayed in the noise and λ came out near 1.)"""
    ranges = [(0, 50), (50, 100)]
    docs, queries = _uneven(400, 100, 11), _uneven(3, 100, 12, shift=0.4)
    train = RStats(ranges)
    train.update(docs)
    pre = fit("mixed", train, QueryStats(ranges, queries), dim=10_000)
    assert pre.info["component_index"] == 152 and pre.info["component_index_used"] == 5
    exact_eval = spectrum([(lambda q: q.T @ q / 3)(queries[:, s:e].double()) for s, e in ranges])
    exact_lam, _ = auto_lambda(spectrum(train), exact_eval, 152)
    assert pre.lam == pytest.approx(exact_lam, rel=1e-6) and pre.lam < 0.999
