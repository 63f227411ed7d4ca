"""The int8 reader: candidates from the int8 form of an index, by exact integer matmuls.

The form (written by `index/compress.py`): per row and projection block, a symmetric scale =
max|x| / 127 and codes = round(x / scale) in [-127, 127]. `compressed/int8/shard-NNNNN.npy` (int8
[rows, D]) + `compressed/int8/scales-NNNNN.npy` (float32 [rows, G], G blocks listed in the manifest
entry as `groups`: [offset, size] column ranges).

A query q is quantized the same way (q ≈ a·c, one int8 term), and each group's codes · c is one
exact int8 × int8 → int32 matmul. Equal codes therefore give equal approximate scores wherever
they sit, so duplicate documents tie here as they do in the exact search, and the running lists
keep the exact search's tie order.
"""

from __future__ import annotations

from pathlib import Path

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


def load_shard_pair(store: IndexStore, paths: tuple[Path, Path], sha256s: tuple[str, str],
                    verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """(codes, memory-mapped; the per-row array) of one compressed shard's two .npy files, checked
    against the manifest's checksums first (once per store) when `verify`. Shapes are the caller's."""
    if verify:
        for path, want in zip(paths, sha256s):
            store.verify_file(path, want, what="compressed shard", remedy="rerun `tracestar compress`")
    return np.load(paths[0], mmap_mode="r", allow_pickle=False), np.load(paths[1], allow_pickle=False)


def _load_int8(store: IndexStore, shard_no: int, entry: dict, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """(codes [rows, D] int8, memory-mapped; scales [rows, G] float32) of one int8 shard, checked
    against the manifest entry's checksums (once per store) and shapes."""
    cpath, spath = int8_paths(store.path, shard_no)
    info = entry["shards"][shard_no]
    codes, scales = load_shard_pair(store, (cpath, spath), (info["codes_sha256"], info["scales_sha256"]), verify)
    n_groups = len(entry_groups(entry, store.dim))
    if codes.shape != (info["rows"], store.dim) or scales.reshape(len(scales), -1).shape != (info["rows"], n_groups):
        raise IndexStoreError(f"{cpath}: shape {codes.shape}, scales {scales.shape}; manifest says "
                              f"({info['rows']}, {store.dim}) with {n_groups} scale(s) per row")
    scales = scales.reshape(info["rows"], n_groups)
    return codes, scales


# int8 × int8 products summed over at most this many columns fit an int32 accumulator exactly
# (2^16 · 127² < 2^31).
_INT32_SAFE_COLUMNS = 1 << 16

# The float work after each integer matmul (convert, scale, add) touches [rows, Q] float32 once per
# group; rows are scored this many bytes of scores at a time, so those passes stay in the core's
# L2 cache rather than streaming the whole chunk's scores through memory once per group.
_SCORE_BLOCK_BYTES = 256 << 10


def int8_query(q: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Q, D] ≈ a·c with int8 c: returns (codes [Q, D] int8, scales a [Q] float32), a = max|q| / 127.

    One term, like the documents' own codes: the query's rounding error is then of the size of a
    document's, which widens the approximate scores' error by about √2 (they only pick candidates;
    the re-rank scores those exactly). A second term quantizing the residual would make the query's
    error negligible, but it doubles both the integer matmuls and the float passes after them:
    measured that way, the int8 scan was slower than the fp16 exact scan.
    """
    q32 = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    sc = q32.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # [Q]
    return torch.round(q32 / sc[:, None]).clamp_(-127, 127).to(torch.int8), sc


QueryParts = list[tuple[int, int, int, torch.Tensor]]  # (group, first column, last column + 1, codes [n, Q] int8)


def query_parts(q_codes: torch.Tensor, groups: Groups) -> QueryParts:
    """The query codes [Q, D] cut into each group's columns (in pieces of at most
    `_INT32_SAFE_COLUMNS`), each transposed to a contiguous [n, Q]: the right operand oneDNN's s8
    gemm reads fastest, prepared once per search rather than once per chunk."""
    parts = []
    for g, (o, n) in enumerate(groups):
        for lo in range(o, o + n, _INT32_SAFE_COLUMNS):
            hi = min(o + n, lo + _INT32_SAFE_COLUMNS)
            parts.append((g, lo, hi, q_codes[:, lo:hi].T.contiguous()))
    return parts


_HAS_INT_MM = True  # cleared the first time torch._int_mm turns out to be missing for the device


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 [m, n] = a [m, k] · b [k, n] for int8 operands: torch's int8 gemm (VNNI/AMX on x86),
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


def _int8_chunk_scores(codes: torch.Tensor, scales: torch.Tensor, parts: QueryParts, q_scales: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """[Q, C] approximate scores of a chunk: a · Σ_groups scale_g · (codes_g · c_g).

    codes [C, D] int8, scales [C, G] float32, parts from `query_parts`, q_scales a [Q]; `out`
    [C, Q] float32 receives them (the result is its transposed view). Each piece's integer matmul
    is exact; then only single-operation elementwise kernels follow, in a fixed order (no fused
    multiply-add, whose vector body and scalar tail may round differently), so a row's score does
    not depend on where it sits in the chunk: duplicate documents tie exactly. Rows go through in
    blocks whose [rows, Q] scores fit in L2 (`_SCORE_BLOCK_BYTES`).
    """
    n_rows, n_q = codes.shape[0], q_scales.shape[0]
    out = torch.empty(n_rows, n_q) if out is None else out  # [C, Q]
    step = max(64, _SCORE_BLOCK_BYTES // (4 * max(1, n_q)))
    for lo in range(0, n_rows, step):
        hi = min(n_rows, lo + step)
        block = out[lo:hi]  # [c, Q], contiguous
        for i, (g, c0, c1, part) in enumerate(parts):
            dots = int8_matmul(codes[lo:hi, c0:c1], part)  # [c, Q], exact integers as float32
            if i == 0:
                torch.mul(dots, scales[lo:hi, g : g + 1], out=block)
            else:
                block.add_(dots.mul_(scales[lo:hi, g : g + 1]))
        if not parts:
            block.zero_()
    out.mul_(q_scales)
    return out.T


# Scores ([rows, Q] float32) are collected, across shard boundaries, up to this many bytes before
# they are merged into the running lists: a merge sorts the [Q, n_cand] lists whatever its width,
# so merging once per 4,096-row shard cost more than scoring the shard.
_MERGE_BYTES = 32 << 20


def int8_candidates(
    store: IndexStore, q: np.ndarray, n_cand: int, entry: dict, verify: bool, chunk_rows: int | None
) -> tuple[RunningTopK, RunningTopK]:
    """Stream the int8 shards: running top-n_cand of the approximate scores (and of their negation).

    Equal scores are ordered by row as in the exact search: duplicate documents have identical
    codes, so they tie here exactly as they tie there, and the same one is listed first.
    `chunk_rows`: rows scored between two merges (default: `default_chunk_rows`, at most
    `_MERGE_BYTES` of scores).
    """
    n_q = q.shape[0]
    props, opps = side_lists(n_q, n_cand)
    q_codes, q_scales = int8_query(q)
    parts = query_parts(q_codes, entry_groups(entry, store.dim))
    width = chunk_rows or max(16, min(default_chunk_rows(store.dim, 1), _MERGE_BYTES // (4 * max(1, n_q))))
    buf = torch.empty(width, n_q)  # [rows, Q]: scores of rows first, first + 1, … not merged yet
    first, filled = 0, 0

    def merge() -> None:
        block = buf[:filled]  # [filled, Q]
        # a row enters a list only if some query's score beats that query's threshold, so a row
        # whose best score is below every threshold is left out before the per-query compare (one
        # reduction along the contiguous query axis, instead of a compare of every [Q, C] pair)
        for lst, best, sign in ((props, block.amax(dim=1), 1.0), (opps, block.amin(dim=1), -1.0)):
            cols = torch.nonzero(best * sign > lst.threshold().min()).squeeze(1)  # [c] ascending
            if cols.numel():
                sub = block.index_select(0, cols).T.contiguous()  # [Q, c]
                merge_above_threshold(lst, sub if sign > 0 else -sub, 0, rows=cols + first)

    for shard_no, info in enumerate(entry["shards"]):
        codes, scales = _load_int8(store, shard_no, entry, verify)
        start = int(info["start"])
        if filled and first + filled != start:  # rows not contiguous with the buffered ones
            merge()
            filled = 0
        lo = 0
        while lo < codes.shape[0]:
            if filled == 0:
                first = start + lo
            hi = min(codes.shape[0], lo + width - filled)
            _int8_chunk_scores(as_tensor(codes[lo:hi], "int8"), torch.from_numpy(scales[lo:hi]), parts, q_scales,
                               out=buf[filled : filled + hi - lo])
            filled, lo = filled + hi - lo, hi
            if filled == width:
                merge()
                filled = 0
    if filled:
        merge()
    return props, opps
