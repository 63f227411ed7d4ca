"""The PQ reader: candidates from an index's PQ form, binary or FAISS (`index/compress.py` writes both).

- "binary" (the manifest entry's `form`; the default from 16,384 dims): per row the sign bits of x
  (`compressed/pq-binary/codes-NNNNN.npy`, uint8 [rows, ⌈D/8⌉]) and f = ‖x‖² / ‖x‖₁
  (`factors-NNNNN.npy`). A query q is rounded to int8 (c ≈ q / a, as the int8 form does), and
  q·x ≈ a · (c·sign(x)) · f. The codes are unpacked a block of rows at a time into ±1 int8 (one
  table lookup per byte of codes, into a reused buffer), and c·sign(x) is one exact int8 × int8 →
  int32 matmul (VNNI/AMX): equal codes give equal estimates, so duplicate documents tie as in the
  exact search. Proponents are the running top-n of the estimates, opponents of their negation.
- FAISS (`form` "pq" / "ivfpq", or no `form`: entries written before the binary form existed):
  `IndexPQ` or `IndexIVFPQ` in `compressed/pq.faiss`, inner-product metric; FAISS ids are the
  index rows. FAISS returns the approximate top-n of q·x; opponents are the top-n of (−q)·x.
"""

from __future__ import annotations

import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tracestar.errors import IndexStoreError, UserError
from tracestar.index.int8 import int8_matmul, int8_query, load_shard_pair
from tracestar.index.store import IndexStore
from tracestar.index.topk import RunningTopK, merge_above_threshold, side_lists
from tracestar.index.writer import COMPRESSED_DIR

BINARY_DIR = f"{COMPRESSED_DIR}/pq-binary"
FAISS_FORMS = ("pq", "ivfpq")  # entries without a `form` are FAISS ones too (written before "binary")
# Rows unpacked at a time: about this many bytes of ±1 int8 (128 rows at 2^16 dims). The measured
# unpack + matmul at 2^16 dims and 64 queries was 0.26 µs per row and query with 256-row blocks
# and 0.30 with 64; unpacking into fresh tensors of whole shards instead took 0.9 µs (page faults).
_UNPACK_BYTES = 8 << 20


def _byte_signs() -> torch.Tensor:
    """int64 [256]: byte value b → its 8 bits (little-endian) as ±1 int8, packed into one int64."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")  # [256, 8]
    return torch.from_numpy(np.ascontiguousarray(bits.astype(np.int8) * 2 - 1)).view(torch.int64).reshape(256)


_BYTE_SIGNS = _byte_signs()

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


def binary_paths(index_dir: str | Path, shard_no: int) -> tuple[Path, Path]:
    """(codes, factors) of one shard's binary form."""
    d = Path(index_dir) / BINARY_DIR
    return d / f"codes-{shard_no:05d}.npy", d / f"factors-{shard_no:05d}.npy"


def _load_binary(store: IndexStore, shard_no: int, entry: dict, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [rows, ⌈D/8⌉], memory-mapped; factors float32 [rows]) of one shard, checked
    against the manifest entry's checksums (once per store) and shapes."""
    cpath, fpath = binary_paths(store.path, shard_no)
    info = entry["shards"][shard_no]
    codes, factors = load_shard_pair(store, (cpath, fpath), (info["codes_sha256"], info["factors_sha256"]), verify)
    want = (int(info["rows"]), (store.dim + 7) // 8)
    if codes.shape != want or codes.dtype != np.uint8 or factors.shape != want[:1] or factors.dtype != np.float32:
        raise IndexStoreError(f"{cpath}: codes {codes.dtype} {codes.shape}, factors {factors.dtype} {factors.shape}; "
                              f"manifest says uint8 {want} and float32 ({want[0]},)")
    return codes, factors


class _Unpacker:
    """Sign bits → ±1 int8 rows, a block at a time, into buffers reused for every block."""

    def __init__(self, n_bytes: int):
        self.n_bytes = n_bytes
        self.rows = max(1, _UNPACK_BYTES // (8 * n_bytes))
        self.idx = torch.empty(self.rows * n_bytes, dtype=torch.int32)
        self.out = torch.empty(self.rows * n_bytes, dtype=torch.int64)

    def __call__(self, codes: np.ndarray) -> torch.Tensor:
        """codes uint8 [n ≤ self.rows, n_bytes] → int8 [n, 8·n_bytes] of ±1 (a view of the buffer)."""
        k = codes.shape[0] * self.n_bytes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only mmap, only read from
            src = torch.from_numpy(np.ascontiguousarray(codes))
        self.idx[:k].copy_(src.reshape(-1))
        torch.index_select(_BYTE_SIGNS, 0, self.idx[:k], out=self.out[:k])
        return self.out[:k].view(torch.int8).view(codes.shape[0], 8 * self.n_bytes)


def binary_candidates(store: IndexStore, q: np.ndarray, n_cand: int, entry: dict, verify: bool) -> tuple[RunningTopK, RunningTopK]:
    """Scan the binary shards: running top-n_cand of the estimates a·(c·sign(x))·f (and of their negation).

    c·sign(x) is an exact integer (|c·sign(x)| ≤ 127·D < 2^31 below 16.9M dims); the two products
    after it are single roundings in a fixed order, so a row's estimate does not depend on its block.
    """
    n_q = q.shape[0]
    props, opps = side_lists(n_q, n_cand)
    n_bytes = (store.dim + 7) // 8
    c, a = int8_query(q)  # [Q, D] int8, [Q]
    q_pad = -(-n_q // 8) * 8  # the int8 gemm's right operand: columns padded to a multiple of 8
    c_t = torch.zeros(8 * n_bytes, q_pad, dtype=torch.int8)  # [D', Q'], zero past D and past Q
    c_t[: store.dim, :n_q] = c.T
    unpack = _Unpacker(n_bytes)
    for shard_no, info in enumerate(entry["shards"]):
        codes, factors = _load_binary(store, shard_no, entry, verify)
        start = int(info["start"])
        for lo in range(0, codes.shape[0], unpack.rows):
            hi = min(codes.shape[0], lo + unpack.rows)
            dots = int8_matmul(unpack(codes[lo:hi]), c_t)[:, :n_q]  # [n, Q] exact integers as float32
            s = (dots * torch.from_numpy(factors[lo:hi]).unsqueeze(1)).mul_(a).T.contiguous()  # [Q, n]
            merge_above_threshold(props, s, start + lo)
            merge_above_threshold(opps, -s, start + lo)
    return props, opps


def pq_candidates(
    store: IndexStore, q: np.ndarray, n_cand: int, entry: dict, verify: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(proponent rows, their approximate scores, opponent rows, theirs), each [Q, n_cand].

    Rows are −1 where fewer candidates were found (an IVF probe of few lists); opponent scores
    are q·x (ascending), not the −q·x they were ranked by. An entry of a form this version does
    not know (a newer tracestar's) is refused in one line.
    """
    form = entry.get("form")
    if form == "binary":
        props, opps = binary_candidates(store, q, n_cand, entry, verify)
        return props.rows.numpy(), props.vals.numpy(), opps.rows.numpy(), -opps.vals.numpy()
    if form is not None and form not in FAISS_FORMS:
        raise IndexStoreError(f"{store.path}: manifest compressed.pq.form {form!r} is not one this tracestar reads "
                              f"(binary, {', '.join(FAISS_FORMS)}); rerun `tracestar compress --kind pq`")
    index = load_pq(store, entry, verify)
    p_sc, p_rows = index.search(q, n_cand)
    o_neg, o_rows = index.search(-q, n_cand)
    return p_rows, p_sc, o_rows, -o_neg
