"""A document whose gradient is NaN or inf (an fp16 overflow, say) never poisons the index: it is
flagged in docs.jsonl, stored as zeros, left out of R's statistics and reported; R and every other
row come out as a build without that document would make them."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import FACTS, FILLER, all_vectors

from tracestar.api import build_index, open_index
from tracestar.capture import FactoredCapture
from tracestar.corpus import read_queries

TEXTS = FACTS + FILLER
BAD = 3  # the row (and corpus line) whose gradient is poisoned
OPTIONS = {"proj_dim": 1024, "r_block": 256, "shard_docs": 4, "preconditioner": "train", "device": "cpu"}


def _poison(monkeypatch, row: int) -> list[int]:
    """Make the capture return NaN and inf in one row's gradient, as an overflow would; returns the
    rows it poisoned (so the test knows the hook ran)."""
    original = FactoredCapture.vectors
    hit: list[int] = []

    def vectors(self, batch):
        out = original(self, batch)
        for i, r in enumerate(batch.rows):
            if r == row:
                out[i, 0], out[i, 7] = float("nan"), float("inf")
                hit.append(r)
        return out

    monkeypatch.setattr(FactoredCapture, "vectors", vectors)
    return hit


def _write(path, pairs):
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in pairs))
    return path


@pytest.fixture(scope="module")
def builds(world, tmp_path_factory):
    """(poisoned index, the build's printed output, the same corpus without the document, clean index)."""
    root = tmp_path_factory.mktemp("nonfinite")
    pairs = [(f"d{i}", t) for i, t in enumerate(TEXTS)]
    corpus = _write(root / "corpus.jsonl", pairs)
    clean_corpus = _write(root / "clean.jsonl", [p for i, p in enumerate(pairs) if i != BAD])
    mp = pytest.MonkeyPatch()
    hit = _poison(mp, BAD)
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            poisoned = build_index(world["model"], corpus, root / "poisoned", optimizer_state=world["optimizer"], **OPTIONS)
    finally:
        mp.undo()
    assert hit == [BAD]
    clean = build_index(world["model"], clean_corpus, root / "clean", optimizer_state=world["optimizer"], quiet=True,
                        **OPTIONS)
    return {"poisoned": poisoned, "said": said.getvalue(), "clean": clean, "corpus": corpus}


def test_the_row_is_flagged_zeroed_and_reported(builds):
    rows = [json.loads(line) for line in (builds["poisoned"] / "docs.jsonl").read_text().splitlines()]
    assert rows[BAD] == {"row": BAD, "doc_id": f"d{BAD}", "n_tokens": rows[BAD]["n_tokens"], "truncated": False,
                         "nonfinite": True}
    assert all("nonfinite" not in r for i, r in enumerate(rows) if i != BAD)
    idx = open_index(builds["poisoned"])
    assert idx.store.docs[BAD].nonfinite and not idx.store.docs[0].nonfinite
    assert idx.manifest["n_nonfinite"] == 1 and idx.manifest["nonfinite_first"] == [f"d{BAD}"]
    raw = np.concatenate([a for _, a in idx.store.iter_shards("raw")])
    final = all_vectors(idx)
    for name, arr in (("raw", raw), ("vectors", final)):
        assert np.isfinite(arr).all(), name
        assert not arr[BAD].any(), name  # zeros
        assert (np.abs(np.delete(arr, BAD, axis=0)).max(axis=1) > 0).all(), name  # no other row was lost
    said = builds["said"]
    assert "1 row(s) had a NaN or inf gradient" in said and f"'d{BAD}'" in said and "left out of R" in said


def test_r_leaves_the_row_out_and_every_other_row_is_unchanged(builds):
    """R (its count and its matrices) and the other rows' final vectors equal a build of the corpus
    without that document."""
    poisoned, clean = open_index(builds["poisoned"]), open_index(builds["clean"])
    info = json.loads((builds["poisoned"] / "preconditioner.json").read_text())
    assert info["train_count"] == len(TEXTS) - 1 == json.loads((builds["clean"] / "preconditioner.json").read_text())["train_count"]
    r_bad, r_clean = load_file(builds["poisoned"] / "preconditioner.safetensors"), load_file(builds["clean"] / "preconditioner.safetensors")
    assert set(r_bad) == set(r_clean) and len(r_bad) > 1
    for name, m in r_bad.items():
        assert torch.isfinite(m.float()).all(), name
        scale = r_clean[name].float().abs().max()
        assert (m.float() - r_clean[name].float()).abs().max() <= 1e-4 * scale, name
    others = np.delete(all_vectors(poisoned), BAD, axis=0)
    assert np.abs(others - all_vectors(clean)).max() < 2e-3  # fp16 storage


def test_the_row_scores_zero_for_every_query(world, builds):
    idx = open_index(builds["poisoned"])
    for r in idx.query(read_queries(world["queries"]), top_k=len(TEXTS)):
        for side in ("proponents", "opponents"):
            scores = {h["doc_id"]: h["score"] for h in r[side]}
            assert scores[f"d{BAD}"] == 0.0
            assert all(np.isfinite(list(scores.values())))


def test_a_resumed_build_keeps_the_flag(world, builds, tmp_path):
    """The flag lives in the raw shard's sidecar, so a build that resumes after the corpus pass
    (nothing poisoned this time) writes the same doc table and manifest counts."""
    out = tmp_path / "index"
    shutil.copytree(builds["poisoned"], out)
    for rel in ("manifest.json", "docs.jsonl", "preconditioner.safetensors", "preconditioner.json"):
        (out / rel).unlink()
    build_index(world["model"], builds["corpus"], out, optimizer_state=world["optimizer"], quiet=True, **OPTIONS)
    assert (out / "docs.jsonl").read_bytes() == (builds["poisoned"] / "docs.jsonl").read_bytes()
    assert (out / "preconditioner.safetensors").read_bytes() == (builds["poisoned"] / "preconditioner.safetensors").read_bytes()
    assert open_index(out).manifest["n_nonfinite"] == 1


def test_an_estimated_v_leaves_the_document_out(world):
    """Estimating V (no optimizer state) reads single documents with autograd: one whose gradient
    overflows is left out and counted, so V equals the estimate over the other documents."""
    from tracestar.batching import collate, encode_document, forward_loss
    from tracestar.model import load_model, tracked_matrices
    from tracestar.normalizer import estimate

    model, tok = load_model(world["model"], device="cpu")
    tracked = tracked_matrices(model)
    batches = [collate([encode_document(tok, t, i, 64)], tok.pad_token_id) for i, t in enumerate(TEXTS[:4])]

    def overflowing(m, batch):  # the second document's loss overflows, as in fp16
        loss = forward_loss(m, batch)
        return loss * float("inf") if batch is batches[1] else loss

    poisoned = estimate(model, tracked, batches, overflowing)
    clean = estimate(model, tracked, [b for b in batches if b is not batches[1]], forward_loss)
    assert "over 3 corpus documents (1 with a NaN or inf gradient left out)" in poisoned.source
    assert set(poisoned.scales) == set(clean.scales)
    for name, s in poisoned.scales.items():
        assert torch.isfinite(s.row).all() and torch.isfinite(s.col).all(), name
        assert torch.equal(s.row, clean.scales[name].row) and torch.equal(s.col, clean.scales[name].col), name
