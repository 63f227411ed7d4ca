"""The running top-k of a streaming search, and the result it turns into.

Every reader (the exact scan, the int8 candidates, the distributed merge) streams chunks of scores
past a `RunningTopK` per query and side; `merge_above_threshold` is how a chunk enters it cheaply.
Opponents are kept as the top-k of −s, so one class serves both sides.

Ties: the exact search promises the order of a stable sort of a brute force (proponents by
ascending row, opponents by descending row), because duplicate documents score alike and must
come back in a fixed order. `ties="asc"` / `"desc"` keeps that order through every merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SearchResult:
    """Top-k proponents (descending scores) and opponents (ascending: most negative first)."""

    prop_rows: np.ndarray  # [Q, k'] int64
    prop_scores: np.ndarray  # [Q, k'] float32
    opp_rows: np.ndarray  # [Q, k'] int64
    opp_scores: np.ndarray  # [Q, k'] float32

    @property
    def k(self) -> int:
        return int(self.prop_rows.shape[1])


class RunningTopK:
    """Per-query running top-k of scores (largest), with their global rows.

    `ties`: None keeps whichever tied entries torch.topk picks (fast; approximate candidate lists);
    "asc" / "desc" breaks equal scores by ascending / descending row, which is the order a stable
    sort of a brute force gives for proponents / opponents (exact duplicates in a corpus tie).
    """

    def __init__(self, n_queries: int, k: int, ties: str | None = None):
        self.k = k
        self.ties = ties
        self.vals = torch.full((n_queries, k), -float("inf"))  # [Q, k] descending
        self.rows = torch.full((n_queries, k), -1, dtype=torch.int64)  # [Q, k], −1 = empty slot

    def threshold(self) -> torch.Tensor:
        """[Q] current k-th best (−inf until k rows were seen)."""
        if self.k == 0:
            return torch.full((self.vals.shape[0],), float("inf"))
        return self.vals[:, -1]

    def merge(self, vals: torch.Tensor, rows: torch.Tensor) -> None:
        """vals [Q, n] scores of global rows [n] or [Q, n]."""
        if self.k == 0 or vals.shape[1] == 0:
            return
        if rows.dim() == 1:
            rows = rows.unsqueeze(0).expand(vals.shape[0], -1)
        all_vals = torch.cat([self.vals, vals.float()], dim=1)
        all_rows = torch.cat([self.rows, rows], dim=1)
        if self.ties is None:
            top, idx = torch.topk(all_vals, self.k, dim=1, largest=True, sorted=True)
            self.vals, self.rows = top, torch.gather(all_rows, 1, idx)
            return
        # rows first (padding −1 rows carry −inf, so they never outrank a real row), then a stable
        # sort by score: equal scores stay in row order.
        o = torch.argsort(all_rows, dim=1, descending=self.ties == "desc", stable=True)
        all_vals, all_rows = torch.gather(all_vals, 1, o), torch.gather(all_rows, 1, o)
        o = torch.argsort(all_vals, dim=1, descending=True, stable=True)[:, : self.k]
        self.vals, self.rows = torch.gather(all_vals, 1, o), torch.gather(all_rows, 1, o)


def merge_above_threshold(lst: RunningTopK, sc: torch.Tensor, first_row: int, rows: torch.Tensor | None = None) -> None:
    """Merge a chunk's scores [Q, C] into a running list, looking only at columns that can enter.

    A row whose score is ≤ every query's current m-th best cannot change any list, so only the
    columns where some query beats its threshold are selected and ranked (after the first chunks
    that is a few per thousand): a compare over the chunk instead of a top-k over it.
    rows: [C] ascending global rows of the columns, when they are not first_row, first_row + 1, …
    """
    cols = torch.nonzero((sc > lst.threshold().unsqueeze(1)).any(dim=0)).squeeze(1)  # [c]
    if cols.numel() == 0:
        return
    sub = sc.index_select(1, cols)  # [Q, c]
    v, i = torch.topk(sub, min(lst.k, cols.numel()), dim=1)  # [Q, ≤m]
    if lst.ties is not None and cols.numel() > lst.k:
        _mend_split_ties(sub, v, i, lst.ties)
    lst.merge(v, cols[i] + first_row if rows is None else rows[cols[i]])


def _mend_split_ties(sub: torch.Tensor, v: torch.Tensor, i: torch.Tensor, ties: str) -> None:
    """Where top-k cut through equal scores (exact duplicates), keep the tied columns a stable sort keeps.

    torch.topk picks any of the tied columns at the boundary; columns are in row order, so "asc"
    keeps the first ones and "desc" the last. Rare, so mended per affected query, in place.
    """
    kth = v[:, -1:]  # [Q, 1]
    split = (sub == kth).sum(dim=1) > (v == kth).sum(dim=1)  # [Q] more ties than slots for them
    for qi in torch.nonzero(split).squeeze(1).tolist():
        above = torch.nonzero(sub[qi] > kth[qi]).squeeze(1)
        tied = torch.nonzero(sub[qi] == kth[qi]).squeeze(1)
        tied = tied[: v.shape[1] - above.numel()] if ties == "asc" else tied.flip(0)[: v.shape[1] - above.numel()]
        keep = torch.cat([above, tied])
        order = torch.argsort(sub[qi, keep], descending=True, stable=True)
        i[qi] = keep[order]
        v[qi] = sub[qi, i[qi]]


def side_lists(n_queries: int, k: int) -> tuple[RunningTopK, RunningTopK]:
    """Empty (proponent, opponent) lists with the exact search's tie order (opponents hold −s)."""
    return RunningTopK(n_queries, k, "asc"), RunningTopK(n_queries, k, "desc")


def to_result(props: RunningTopK, opps: RunningTopK, k_out: int) -> SearchResult:
    """The first k_out entries of both lists as numpy (opponent scores negated back to s)."""
    return SearchResult(
        prop_rows=props.rows[:, :k_out].numpy().astype(np.int64, copy=True),
        prop_scores=props.vals[:, :k_out].numpy().astype(np.float32, copy=True),
        opp_rows=opps.rows[:, :k_out].numpy().astype(np.int64, copy=True),
        opp_scores=(-opps.vals[:, :k_out]).numpy().astype(np.float32, copy=True),
    )
