"""The PQ reader: candidates from an index's FAISS product-quantization form.

The form (written by `index/compress.py`): FAISS product quantization trained on the index's own
vectors with the inner-product metric (the vectors are unit-normalised), `IndexPQ`, or `IndexIVFPQ`
for large corpora, in `compressed/pq.faiss`; FAISS ids are the index rows. FAISS returns the
approximate top-n of q·x; opponents are the top-n of (−q)·x.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np

from tracestar.errors import IndexStoreError, UserError
from tracestar.index.store import IndexStore

# The FAISS index read for a store, keyed by the store, with the sha256 it was read at: reading
# one costs a file's worth of IO, and a long-lived store (a server's) searches it many times.
_LOADED: weakref.WeakKeyDictionary[IndexStore, tuple[str, Any]] = weakref.WeakKeyDictionary()


def faiss_module():
    """The faiss module, or a one-line UserError saying how to install it."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover
        raise UserError("PQ compression needs faiss: pip install faiss-cpu") from exc
    return faiss


def load_pq(store: IndexStore, entry: dict, verify: bool):
    """The FAISS index of the manifest entry `entry`, checked against its sha256 (once per store)."""
    faiss = faiss_module()
    path = Path(store.path) / entry["path"]
    if not path.exists():
        raise IndexStoreError(f"{path}: missing compressed index listed in the manifest")
    if verify:
        store.verify_file(path, entry["sha256"], what="compressed index", remedy="rerun `tracestar compress`")
    cached = _LOADED.get(store)
    if cached is not None and cached[0] == entry["sha256"]:
        return cached[1]
    index = faiss.read_index(str(path))
    if entry.get("nprobe"):
        faiss.extract_index_ivf(index).nprobe = int(entry["nprobe"])
    _LOADED[store] = (entry["sha256"], index)
    return index


def pq_candidates(
    store: IndexStore, q: np.ndarray, n_cand: int, entry: dict, verify: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(proponent rows, their approximate scores, opponent rows, theirs), each [Q, n_cand].

    Rows are −1 where FAISS found fewer candidates (an IVF probe of few lists); opponent scores
    are q·x (ascending), not the −q·x FAISS ranked by.
    """
    index = load_pq(store, entry, verify)
    p_sc, p_rows = index.search(q, n_cand)
    o_neg, o_rows = index.search(-q, n_cand)
    return p_rows, p_sc, o_rows, -o_neg
