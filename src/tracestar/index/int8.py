"""The int8 reader: candidates from the int8 form of an index, by exact integer matmuls.

The form (written by `index/compress.py`): per row and projection block, a symmetric scale =
max|x| / 127 and codes = round(x / scale) in [-127, 127]. `compressed/int8/shard-NNNNN.npy` (int8
[rows, D]) + `compressed/int8/scales-NNNNN.npy` (float32 [rows, G], G blocks listed in the manifest
entry as `groups`: [offset, size] column ranges).

A query q is split into two int8 terms (a·c₁ + b·c₂, the second quantizing the first one's
residual), and each group's codes · terms is one exact int8 × int8 → int32 matmul. Equal codes
therefore give equal approximate scores wherever they sit, so duplicate documents tie here as they
do in the exact search, and the running lists keep the exact search's tie order.
"""

from __future__ import annotations

import numpy as np
import torch

from tracestar.errors import IndexStoreError
from tracestar.index.exact import as_tensor, default_chunk_rows
from tracestar.index.store import IndexStore
from tracestar.index.topk import RunningTopK, merge_above_threshold, side_lists
from tracestar.index.writer import int8_paths

Groups = list[tuple[int, int]]  # [offset, size] column ranges sharing a scale within a row


def whole_row(dim: int) -> Groups:
    return [(0, dim)]


def entry_groups(entry: dict, dim: int) -> Groups:
    """The groups of an int8 manifest entry (entries written before groups existed: one per row)."""
    return [(int(o), int(n)) for o, n in entry.get("groups") or whole_row(dim)]


def _load_int8(store: IndexStore, shard_no: int, entry: dict, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """(codes [rows, D] int8, memory-mapped; scales [rows, G] float32) of one int8 shard, checked
    against the manifest entry's checksums (once per store) and shapes."""
    cpath, spath = int8_paths(store.path, shard_no)
    info = entry["shards"][shard_no]
    if verify:
        for path, want in ((cpath, info["codes_sha256"]), (spath, info["scales_sha256"])):
            store.verify_file(path, want, what="compressed shard", remedy="rerun `tracestar compress`")
    codes = np.load(cpath, mmap_mode="r", allow_pickle=False)
    scales = np.load(spath, allow_pickle=False)
    n_groups = len(entry_groups(entry, store.dim))
    if codes.shape != (info["rows"], store.dim) or scales.reshape(len(scales), -1).shape != (info["rows"], n_groups):
        raise IndexStoreError(f"{cpath}: shape {codes.shape}, scales {scales.shape}; manifest says "
                              f"({info['rows']}, {store.dim}) with {n_groups} scale(s) per row")
    scales = scales.reshape(info["rows"], n_groups)
    return codes, scales


# int8 × int8 products summed over at most this many columns fit an int32 accumulator exactly
# (2^16 · 127² < 2^31).
_INT32_SAFE_COLUMNS = 1 << 16


def int8_query_terms(q: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Q, D] ≈ a·c₁ + b·c₂ with int8 c₁, c₂: returns (codes [2Q, D] int8, scales [2Q] float32).

    c₂ quantizes the residual of c₁, so the query error is ~1/127 of one int8 step (well below
    bf16 rounding); the documents' own int8 error then dominates, and both terms go through one
    exact integer matmul.
    """
    q32 = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    terms, scales, rest = [], [], q32
    for _ in range(2):
        sc = rest.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # [Q]
        c = torch.round(rest / sc[:, None]).clamp_(-127, 127)
        rest = rest - c * sc[:, None]
        terms.append(c.to(torch.int8))
        scales.append(sc)
    return torch.cat(terms), torch.cat(scales)


_HAS_INT_MM = True  # cleared the first time torch._int_mm turns out to be missing for the device


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 [m, n] = a [m, k] · b [k, n] for int8 operands: torch's int8 gemm (VNNI on x86),
    or, where this torch build has none for the device, a float64 matmul of the same integers.

    Both are exact integer sums (|sum| < 2^31, far below float64's 2^53; a float32 matmul would
    round sums above 2^24 in an order that depends on the kernel's tiling), so duplicate rows get
    identical approximate scores and tie, in either path, before the same single rounding."""
    global _HAS_INT_MM
    if _HAS_INT_MM:
        try:
            return torch._int_mm(a, b).float()
        except (RuntimeError, NotImplementedError, AttributeError):
            _HAS_INT_MM = False
    return (a.double() @ b.double()).float()


def _int8_chunk_scores(codes: torch.Tensor, scales: torch.Tensor, q_codes_t: torch.Tensor, q_scales: torch.Tensor,
                       groups: Groups) -> torch.Tensor:
    """[Q, C] approximate scores of a chunk: Σ_groups scale_g · (codes_g · (a c₁ + b c₂)_g).

    codes [C, D] int8, scales [C, G], q_codes_t [D, 2Q] int8, q_scales [2Q]. Each group's
    integer matmul is exact; the int32 → float32 conversion and the scaling round once. Only
    single-operation elementwise kernels follow (no fused multiply-add, whose vector body and
    scalar tail may round differently), so a row's score does not depend on where it sits in the
    chunk: duplicate documents tie exactly.
    """
    n_q = q_scales.shape[0] // 2
    out = torch.zeros(codes.shape[0], n_q)
    for g, (o, n) in enumerate(groups):
        dots = torch.zeros(codes.shape[0], 2 * n_q)  # [C, 2Q]
        for lo in range(o, o + n, _INT32_SAFE_COLUMNS):
            hi = min(o + n, lo + _INT32_SAFE_COLUMNS)
            dots += _int8_matmul(codes[:, lo:hi], q_codes_t[lo:hi])
        dots *= q_scales
        out += (dots[:, :n_q] + dots[:, n_q:]) * scales[:, g : g + 1]
    return out.T


def int8_candidates(
    store: IndexStore, q: np.ndarray, n_cand: int, entry: dict, verify: bool, chunk_rows: int | None
) -> tuple[RunningTopK, RunningTopK]:
    """Stream the int8 shards: running top-n_cand of the approximate scores (and of their negation).

    Equal scores are ordered by row as in the exact search: duplicate documents have identical
    codes, so they tie here exactly as they tie there, and the same one is listed first.
    """
    n_q = q.shape[0]
    props, opps = side_lists(n_q, n_cand)
    groups = entry_groups(entry, store.dim)
    q_codes, q_scales = int8_query_terms(q)
    q_codes_t = q_codes.T  # [D, 2Q], the layout oneDNN's s8 gemm reads fastest here
    rows_per_chunk = chunk_rows or default_chunk_rows(store.dim, 1)
    for shard_no, info in enumerate(entry["shards"]):
        codes, scales = _load_int8(store, shard_no, entry, verify)
        start = int(info["start"])
        for lo in range(0, codes.shape[0], rows_per_chunk):
            hi = min(codes.shape[0], lo + rows_per_chunk)
            s = _int8_chunk_scores(as_tensor(codes[lo:hi], "int8"), torch.from_numpy(scales[lo:hi]),
                                   q_codes_t, q_scales, groups)
            merge_above_threshold(props, s, start + lo)
            merge_above_threshold(opps, -s, start + lo)
    return props, opps
