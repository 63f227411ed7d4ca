"""The costs after the corpus pass: raw vectors kept in bf16 or not at all, R's eigendecompositions
batched by size or replaced by a Cholesky factor, V estimated on batches of documents."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch

from tracestar.api import build_index, open_index, refit
from tracestar.corpus import read_queries
from tracestar.errors import IndexStoreError, UserError

DIM = 1024


def _build(world, out: Path, **kw) -> Path:
    args = {"optimizer_state": world["optimizer"], "proj_dim": DIM, "eval_queries": world["queries"], "shard_docs": 3,
            "quiet": True}
    return build_index(world["model"], world["corpus"], out, **{**args, **kw})


@pytest.fixture(scope="module")
def builds(world, tmp_path_factory):
    """One index per --raw-dtype, of the same corpus with the same arguments otherwise."""
    root = tmp_path_factory.mktemp("raw-dtype")
    return {d: _build(world, root / d, raw_dtype=d, r_factor="eigh") for d in ("float32", "bfloat16", "none")}


def _npy_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.npy"))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --- --raw-dtype bfloat16 ------------------------------------------------------------------------


def test_bf16_raw_halves_the_bytes_and_is_recorded(builds):
    fp32, bf16 = builds["float32"], builds["bfloat16"]
    m32, m16 = (json.loads((p / "manifest.json").read_text()) for p in (fp32, bf16))
    assert m32["raw_dtype"] == "float32" and m16["raw_dtype"] == "bfloat16"
    assert np.load(bf16 / "raw" / "shard-00000.npy").dtype == np.uint16  # bf16 bit patterns
    data32, data16 = _npy_bytes(fp32 / "raw"), _npy_bytes(bf16 / "raw")
    header = 128 * len(list((bf16 / "raw").glob("*.npy")))  # each .npy's header, the same size in both
    assert data16 - header == pytest.approx((data32 - header) / 2, rel=1e-6)
    # the default keeps what a build.json said before the option existed; another value is part of the identity
    assert "raw_dtype" not in json.loads((fp32 / "build.json").read_text())
    assert json.loads((bf16 / "build.json").read_text())["raw_dtype"] == "bfloat16"


def test_bf16_raw_final_vectors_stay_close_to_the_fp32_build(world, builds):
    """R and the final vectors come from the bf16 rows: each final vector stays within cosine
    0.999 of the fp32 build's (bf16 keeps 8 bits of mantissa, ~0.4% per element), and the
    fact document stays the top proponent."""
    a, b = open_index(builds["float32"]), open_index(builds["bfloat16"])
    va, vb = tiny.all_vectors(a), tiny.all_vectors(b)
    cos = _cosines(va, vb)
    assert cos.min() > 0.999, cos.min()
    assert cos.min() < 1.0 - 1e-7  # the rows really were rounded (else this test could not fail)
    queries = read_queries(world["queries"])
    got, want = b.query(queries, top_k=1), a.query(queries, top_k=1)
    assert [r["proponents"][0]["doc_id"] for r in got] == [r["proponents"][0]["doc_id"] for r in want]


def test_refit_of_a_bf16_index_reads_its_bf16_rows(world, builds, tmp_path):
    """A refit with the same preconditioner arguments reproduces the bf16 build's vectors."""
    out = refit(builds["bfloat16"], tmp_path / "refit", eval_queries=world["queries"], quiet=True)
    assert json.loads((out / "manifest.json").read_text())["raw_dtype"] == "bfloat16"
    np.testing.assert_allclose(tiny.all_vectors(open_index(out)), tiny.all_vectors(open_index(builds["bfloat16"])),
                               atol=1e-6)


# --- --raw-dtype none ----------------------------------------------------------------------------


def test_none_deletes_the_raw_vectors_and_keeps_the_same_final_vectors(world, builds):
    out = builds["none"]
    assert not list((out / "raw").glob("*.npy")) and len(list((out / "raw").glob("*.json"))) == 4  # sidecars stay
    m = json.loads((out / "manifest.json").read_text())
    assert m["raw_dtype"] == "none" and all(s["raw_sha256"] is None for s in m["shards"])
    # R and the final vectors were computed from the same float32 rows as the default build's
    for name in ("preconditioner.safetensors", *(f"vectors/shard-0000{s}.npy" for s in range(4))):
        assert (out / name).read_bytes() == (builds["float32"] / name).read_bytes(), name
    queries = read_queries(world["queries"])[:2]
    assert open_index(out).query(queries, top_k=3) == open_index(builds["float32"]).query(queries, top_k=3)


def test_none_rerun_verifies_without_raw_vectors(world, builds, capsys):
    capsys.readouterr()
    _build(world, builds["none"], raw_dtype="none", r_factor="eigh", quiet=False)
    assert "files verified; nothing to do" in capsys.readouterr().out
    with pytest.raises(UserError, match="different arguments.*raw_dtype"):
        _build(world, builds["none"], r_factor="eigh")  # float32 now: another index


def test_refit_of_an_index_without_raw_vectors_is_refused_in_one_line(world, builds, tmp_path):
    with pytest.raises(IndexStoreError, match="--raw-dtype none, so it kept no raw vectors") as err:
        refit(builds["none"], tmp_path / "refit", eval_queries=world["queries"], quiet=True)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "refit").exists()


def test_none_repair_recomputes_the_raw_vectors_and_deletes_them_again(world, builds, tmp_path, capsys):
    """A damaged final shard is rebuilt: the corpus pass runs again (the raw rows it needs are
    gone), R is reused (its sample's sidecars are unchanged), the shard is rewritten and the raw
    shards are deleted again."""
    copy = tmp_path / "copy"
    shutil.copytree(builds["none"], copy)
    shard = copy / "vectors" / "shard-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    _build(world, copy, raw_dtype="none", r_factor="eigh", quiet=False)
    out = capsys.readouterr().out
    assert "vectors/shard-00002.npy (checksum mismatch)" in out and "R reused" in out
    assert not list((copy / "raw").glob("*.npy"))
    np.testing.assert_allclose(tiny.all_vectors(open_index(copy)), tiny.all_vectors(open_index(builds["none"])),
                               atol=2e-3)  # the fp16 step: the recomputed rows may differ in the last bit
    capsys.readouterr()
    _build(world, copy, raw_dtype="none", r_factor="eigh", quiet=False)
    assert "nothing to do" in capsys.readouterr().out


def test_cli_refuses_an_unknown_raw_dtype_in_one_line(world, tmp_path):
    res = subprocess.run([sys.executable, "-m", "tracestar", "index", "--model", str(world["model"]), "--corpus",
                          str(world["corpus"]), "--out", str(tmp_path / "idx"), "--raw-dtype", "int8"],
                         check=False, capture_output=True, text=True)
    assert res.returncode != 0 and "--raw-dtype" in res.stderr and "int8" in res.stderr
    assert not (tmp_path / "idx").exists()


# --- --r-factor cholesky -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chol(world, tmp_path_factory):
    """The float32 build's index with R factored by Cholesky."""
    return _build(world, tmp_path_factory.mktemp("r-factor") / "chol", r_factor="cholesky")


def test_cholesky_build_gives_the_eigh_build_scores_in_another_basis(world, builds, chol):
    """The same index with R factored by Cholesky: every query's scores equal the eigh build's to
    the fp16 step of the stored vectors (both are unit(W g) with the same W Wᵀ), the rankings are the
    same, the stored vectors are not, and the option is recorded where it changes the bytes."""
    eigh = builds["float32"]
    queries = read_queries(world["queries"])
    got, want = open_index(chol).query(queries, top_k=5), open_index(eigh).query(queries, top_k=5)
    for g, w in zip(got, want):
        assert [p["doc_id"] for p in g["proponents"]] == [p["doc_id"] for p in w["proponents"]]
        np.testing.assert_allclose([p["score"] for p in g["proponents"]], [p["score"] for p in w["proponents"]],
                                   atol=2e-3)
    va, vb = tiny.all_vectors(open_index(eigh)), tiny.all_vectors(open_index(chol))
    np.testing.assert_allclose(va @ va.T, vb @ vb.T, atol=3e-3)  # every document-document score, too
    assert np.abs(va - vb).max() > 0.05  # another basis (else this test could not fail)
    m_e, m_c = (json.loads((p / "manifest.json").read_text()) for p in (eigh, chol))
    assert m_c["preconditioner"]["factor"] == "cholesky" and "factor" not in m_e["preconditioner"]
    assert m_c["preconditioner"]["lambda"] == pytest.approx(m_e["preconditioner"]["lambda"], rel=1e-12)
    assert json.loads((chol / "build.json").read_text())["r_factor"] == "cholesky"
    assert "r_factor" not in json.loads((eigh / "build.json").read_text())  # the default's identity is unchanged


def test_refit_with_cholesky_equals_a_cholesky_build_and_keeps_the_source_factor(world, builds, chol, tmp_path):
    out = refit(builds["float32"], tmp_path / "refit", eval_queries=world["queries"], r_factor="cholesky", quiet=True)
    np.testing.assert_allclose(tiny.all_vectors(open_index(out)), tiny.all_vectors(open_index(chol)), atol=1e-3)
    again = refit(out, tmp_path / "again", eval_queries=world["queries"], quiet=True)  # factor: the source's
    assert json.loads((again / "manifest.json").read_text())["preconditioner"]["factor"] == "cholesky"


def test_token_contributions_of_a_cholesky_index_add_up_to_the_eigh_score(world, builds, chol):
    """`explain` pulls the query back through Wᵀ (W = L^{-T} is not symmetric): each document's
    token contributions still sum to its score, and that score is the eigh index's."""
    from tracestar.explain import explain_tokens

    q = read_queries(world["queries"])[0]
    eigh_idx, chol_idx = open_index(builds["float32"]), open_index(chol)
    for hit in chol_idx.query([q], top_k=2)[0]["proponents"]:
        att = explain_tokens(chol_idx, q, hit["doc_id"])
        ref = explain_tokens(eigh_idx, q, hit["doc_id"])
        assert abs(sum(s for _, s in att.tokens) - att.doc_score) <= 1e-3 * abs(att.doc_score) + 1e-6
        assert att.doc_score == pytest.approx(ref.doc_score, abs=2e-3)
        np.testing.assert_allclose([s for _, s in att.tokens], [s for _, s in ref.tokens], atol=2e-3)


def test_cli_refuses_an_unknown_r_factor_in_one_line(world, tmp_path):
    res = subprocess.run([sys.executable, "-m", "tracestar", "index", "--model", str(world["model"]), "--corpus",
                          str(world["corpus"]), "--out", str(tmp_path / "idx"), "--r-factor", "qr"],
                         check=False, capture_output=True, text=True)
    assert res.returncode != 0 and "--r-factor" in res.stderr and "qr" in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 2  # argparse's usage line and its one error line
    assert not (tmp_path / "idx").exists()


# --- R's eigendecompositions, batched by size ----------------------------------------------------


def _stats(ranges, n: int, seed: int):
    from tracestar.preconditioner import RStats

    g = torch.Generator().manual_seed(seed)
    stats = RStats(ranges)
    scales = torch.linspace(0.05, 3.0, ranges[-1][1])  # an uneven spectrum, as gradients have
    stats.update(torch.randn(n, ranges[-1][1], generator=g) * scales)
    return stats


def test_size_batches_groups_equal_sizes_within_the_budget():
    from tracestar.preconditioner import size_batches

    sizes = [100, 100, 99, 100, 99, 100]
    assert size_batches(sizes, budget=3 * 8 * 100 * 100 * 2) == [[0, 1], [3, 5], [2, 4]]
    assert size_batches(sizes, budget=1) == [[i] for i in (0, 1, 3, 5, 2, 4)]  # never an empty group


@pytest.mark.parametrize("kind,factor", [("train", "eigh"), ("mixed", "eigh"), ("mixed", "cholesky")])
def test_batched_eigendecompositions_equal_the_threaded_ones(kind, factor):
    """One batched eigh per group of equal-sized ranges gives the same R^{-1/2} (and the same λ)
    as one eigh per range on its own thread, to float32 rounding."""
    from tracestar.preconditioner import fit, r_ranges
    from tracestar.projection import Block

    blocks = [Block(name=f"b{i}", k=k, params=[], offset=o) for i, (k, o) in enumerate([(10, 0), (10, 100), (7, 200)])]
    ranges = r_ranges(blocks, r_block=40)  # 100 → 33, 34, 33; 49 → 24, 25
    assert len(ranges) == 8 and len({e - s for s, e in ranges}) < len(ranges)  # some sizes repeat
    train, eval_ = _stats(ranges, 300, 0), _stats(ranges, 20, 1)
    kw = {"damping": 0.1, "dim": ranges[-1][1], "factor": factor}
    threaded = fit(kind, train, eval_, batched=False, **kw)
    batched = fit(kind, train, eval_, batched=True, **kw)
    assert threaded.lam == pytest.approx(batched.lam, rel=1e-9)
    for a, b in zip(threaded.mats, batched.mats):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))


# --- V estimated on batches of documents ---------------------------------------------------------

TEXTS = ["the capital of france is paris .", "berlin is a city in germany", "the river in the north is large",
         "a small country speaks a language", "rome is the capital of italy and a large city .", "the euro"]


def _autograd_v(model, tracked, examples, pad):
    """The definition, one plain autograd pass per document: {name: (Σ_docs row sums of g², col sums)}."""
    from tracestar.batching import collate, forward_loss

    sums = {t.name: (torch.zeros(t.shape[0], dtype=torch.float64), torch.zeros(t.shape[1], dtype=torch.float64))
            for t in tracked}
    for t in tracked:
        t.param.requires_grad_(True)
    for e in examples:
        model.zero_grad(set_to_none=True)
        forward_loss(model, collate([e], pad)).sum().backward()
        for t in tracked:
            sq = t.param.grad.double().square()
            sums[t.name][0].add_(sq.sum(1))
            sums[t.name][1].add_(sq.sum(0))
    model.zero_grad(set_to_none=True)
    for t in tracked:
        t.param.requires_grad_(False)
    return sums


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_v_estimate_equals_one_document_at_a_time(arch, tmp_path):
    """Several documents of different lengths per forward/backward (hooks form each document's
    gradient) give the V of one autograd pass per document: GPT-2 covers Conv1D and the tied
    embedding / LM head (its two sites' gradients summed before squaring), Llama nn.Linear."""
    from tracestar.batching import collate, encode_document, forward_loss
    from tracestar.model import load_model, tracked_matrices
    from tracestar.normalizer import docs_per_batch, estimate, factored_scales

    model, tok = load_model(tiny.save(getattr(tiny, arch)(seed=2), tmp_path / arch))
    tracked = tracked_matrices(model)
    assert any(len(t.sites) > 1 for t in tracked) == (arch == "gpt2")
    examples = [encode_document(tok, t, i, 64) for i, t in enumerate(TEXTS)]
    singles = estimate(model, tracked, [collate([e], tok.pad_token_id) for e in examples], forward_loss)
    grouped = estimate(model, tracked, [collate(examples[:4], tok.pad_token_id), collate(examples[4:], tok.pad_token_id)],
                       forward_loss)
    assert singles.source == grouped.source == "mean squared gradient over 6 corpus documents"
    want = _autograd_v(model, tracked, examples, tok.pad_token_id)
    for t in tracked:
        a, b = t.shape
        ref = factored_scales(want[t.name][0] / (6 * b), want[t.name][1] / (6 * a))
        for got in (singles.scales[t.name], grouped.scales[t.name]):
            torch.testing.assert_close(got.row, ref.row, rtol=1e-5, atol=0)
            torch.testing.assert_close(got.col, ref.col, rtol=1e-5, atol=0)
    assert docs_per_batch(tracked) > len(TEXTS)  # a tiny model's documents all fit one batch
    assert docs_per_batch(tracked, budget=1) == 1


def test_batched_v_estimate_leaves_out_only_the_overflowing_document(tmp_path):
    from tracestar.batching import collate, encode_document, forward_loss
    from tracestar.model import load_model, tracked_matrices
    from tracestar.normalizer import estimate

    model, tok = load_model(tiny.save(tiny.gpt2(seed=2), tmp_path / "m"))
    tracked = tracked_matrices(model)
    examples = [encode_document(tok, t, i, 64) for i, t in enumerate(TEXTS)]

    def overflowing(m, batch):  # the batch's second document overflows, as in fp16
        loss = forward_loss(m, batch)
        return loss * torch.tensor([1.0, float("inf")] + [1.0] * (len(loss) - 2))

    poisoned = estimate(model, tracked, [collate(examples, tok.pad_token_id)], overflowing)
    clean = estimate(model, tracked, [collate([e], tok.pad_token_id) for e in examples if e.row != 1], forward_loss)
    assert poisoned.source == "mean squared gradient over 5 corpus documents (1 with a NaN or inf gradient left out)"
    for t in tracked:
        torch.testing.assert_close(poisoned.scales[t.name].row, clean.scales[t.name].row, rtol=1e-5, atol=0)


@pytest.mark.parametrize("T", [2, 40])  # 2: from T × T Gram matrices; 40: G formed and squared
def test_row_col_sums_of_squared_gradients_both_ways(T):
    from tracestar.normalizer import _row_col_sums

    g = torch.Generator().manual_seed(T)
    A, B = torch.randn(5, T, 12, generator=g), torch.randn(5, T, 9, generator=g)
    ids = torch.randint(0, 12, (5, T), generator=g)
    onehot = torch.zeros(5, T, 12).scatter_(2, ids.unsqueeze(-1), 1.0)
    for a_side, dense in ((A, A), (("ids", ids, 12), onehot)):
        G = torch.einsum("nta,ntb->nab", dense.double(), B.double())  # [5, 12, 9] each document's gradient
        rows, cols = _row_col_sums([(a_side, B)], budget=1)  # budget 1: one document per chunk
        torch.testing.assert_close(rows, G.square().sum(2), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cols, G.square().sum(1), rtol=1e-5, atol=1e-6)
    # a tied matrix: two sites' positions joined give the square of the sum of their gradients
    G = torch.einsum("nta,ntb->nab", A.double(), B.double()) + torch.einsum("nta,ntb->nab", onehot.double(), B.double())
    rows, cols = _row_col_sums([(A, B), (("ids", ids, 12), B)])
    torch.testing.assert_close(rows, G.square().sum(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cols, G.square().sum(1), rtol=1e-5, atol=1e-6)
