"""V: the optimizer's second moment, as row and column scales.

TrackStar divides each gradient element-wise by √V. The paper's models used Adafactor, whose V is
factored: for a matrix [a, b] it keeps row statistics r [a] and column statistics c [b] with
V ≈ r cᵀ / mean(r). Then

    G / √V = D_r · G · D_c,   D_r = diag(√(mean(r) / r)),   D_c = diag(1 / √c)

so the correction is two diagonal scalings that fold into the projection matrices (`capture.py`)
and no per-example full gradient is ever formed. Every source of V reduces to this one interface,
`Scales(row, col)`:

Reading a saved state (finding the file, mapping each entry to its parameter, checking shapes) is
`optim_state.py`'s job; this module turns the per-parameter V it returns into scales:

- torch `Adafactor`: `row_var` [a, 1], `col_var` [1, b];
- HF transformers Adafactor: `exp_avg_sq_row` [a], `exp_avg_sq_col` [b];
- Adam / AdamW: `exp_avg_sq` [a, b] (bias-corrected), fitted to the factored form by its row and
  column means (the fit keeps mean(V) exact);
- no state: V estimated as the mean squared per-document gradient over a sample of the corpus;
- none: the identity (the ablation without optimizer correction).

Zeros are guarded: r and c are floored at `eps` × their mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from tracestar.files import write_safetensors
from tracestar.model import Tracked
from tracestar.optim_state import NoSecondMoment, OptimizerState  # noqa: F401 (NoSecondMoment re-exported)
from tracestar.optim_state import read as read_optimizer_state

EPS = 1e-6


@dataclass
class Scales:
    """G/√V = diag(row) · G · diag(col) for one matrix in stored orientation."""

    row: torch.Tensor  # [a]
    col: torch.Tensor  # [b]


@dataclass
class Normalizer:
    kind: str  # torch_adafactor | hf_adafactor | adam | estimated | none
    source: str | None
    scales: dict[str, Scales] = field(default_factory=dict)
    eps: float = EPS
    #: What the manifest records besides: for a state, `optimizer_state`, `optimizer`, `mapping`
    #: (names | trainer-groups | parameter-order), `step`; `v_missing` when V had to be estimated.
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"kind": self.kind, "source": self.source, "eps": self.eps, **self.details}

    def save(self, path: str | Path) -> None:
        tensors = {}
        for name, s in self.scales.items():
            tensors[f"{name}.row"] = s.row.contiguous()
            tensors[f"{name}.col"] = s.col.contiguous()
        write_safetensors(path, tensors, metadata={"kind": self.kind, "source": str(self.source)})

    @staticmethod
    def load(path: str | Path, info: dict) -> "Normalizer":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        names = {k.rsplit(".", 1)[0] for k in tensors}
        scales = {n: Scales(tensors[f"{n}.row"], tensors[f"{n}.col"]) for n in names}
        details = {k: v for k, v in info.items() if k not in ("kind", "source", "eps")}
        return Normalizer(kind=info["kind"], source=info.get("source"), scales=scales, eps=info.get("eps", EPS), details=details)


def factored_scales(r: torch.Tensor, c: torch.Tensor, eps: float = EPS) -> Scales:
    """Scales for V = r cᵀ / mean(r), with r and c floored at eps × their mean."""
    r = r.double().flatten()
    c = c.double().flatten()
    r = torch.clamp(r, min=eps * float(r.mean()) if float(r.mean()) > 0 else 1e-30)
    c = torch.clamp(c, min=eps * float(c.mean()) if float(c.mean()) > 0 else 1e-30)
    row = torch.sqrt(r.mean() / r)
    col = 1.0 / torch.sqrt(c)
    return Scales(row.float(), col.float())


def identity(tracked: list[Tracked]) -> Normalizer:
    scales = {t.name: Scales(torch.ones(t.shape[0]), torch.ones(t.shape[1])) for t in tracked}
    return Normalizer(kind="none", source=None, scales=scales)


def from_state(state: OptimizerState, tracked: list[Tracked], eps: float = EPS) -> Normalizer:
    """Scales from an already mapped and shape-checked optimizer state (`optim_state.read`).

    Adafactor's factored statistics are used as they are; Adam's bias-corrected V is fitted by its
    row and column means. Raises `NoSecondMoment` for SGD / Lion states.
    """
    if not state.has_second_moment:
        raise state.missing_v_error()
    scales, kinds = {}, set()
    for t in tracked:
        v = state.second_moment(t.name)
        kinds.add(v.kind)
        if v.full is not None:
            full = v.full.double().reshape(t.shape)
            scales[t.name] = factored_scales(full.mean(dim=1), full.mean(dim=0), eps)
        else:
            scales[t.name] = factored_scales(v.row.reshape(t.shape[0]), v.col.reshape(t.shape[1]), eps)
    kind = kinds.pop() if len(kinds) == 1 else "mixed:" + ",".join(sorted(kinds))
    return Normalizer(kind=kind, source=state.source, scales=scales, eps=eps, details=state.to_json())


def from_optimizer_state(path: str | Path | OptimizerState, model: torch.nn.Module, tracked: list[Tracked],
                         eps: float = EPS) -> Normalizer:
    """V from an optimizer state as training code saved it: a file, a checkpoint directory or a DCP
    directory (`optim_state.read` finds it, maps every entry to its parameter and checks shapes)."""
    state = path if isinstance(path, OptimizerState) else read_optimizer_state(path, model)
    return from_state(state, tracked, eps)


#: Bytes of per-document gradients `estimate` may hold at once (`docs_per_batch`).
ESTIMATE_BYTES = 2**29


def docs_per_batch(tracked: list[Tracked], budget: int = ESTIMATE_BYTES) -> int:
    """How many documents one `estimate` batch may hold: each document's gradient of the largest
    matrix is formed (and squared) at once, and a tied matrix's is kept until all its uses are in."""
    largest = max((a * b for a, b in (t.shape for t in tracked)), default=1)
    tied = sum(a * b for a, b in (t.shape for t in tracked if len(t.sites) > 1))
    return max(1, budget // (4 * (2 * largest + tied)))


class _SquareSums:
    """Hooks that add each document's Σ_j G[i, j]² and Σ_i G[i, j]² per tracked matrix, where G is
    that document's gradient of the matrix, from one batched forward and backward.

    Why it is exact: a site's gradient is a sum over positions of δ_t x_tᵀ (Linear: [out, in];
    Conv1D: [in, out]; an embedding: δ_t added to row id_t), and each document's loss depends
    only on its own positions, so one backward of the summed loss gives every document's δ. A
    matrix used at several sites (a tied embedding and LM head) sums its sites' gradients before
    squaring. Parameters stay frozen: no weight gradient is formed besides these.

    A batch's sums are kept per document until its backward is done, so that a document whose
    gradient has a NaN or inf anywhere (an fp16 overflow) is left out whole (`end_batch`).
    """

    def __init__(self, tracked: list[Tracked]):
        self.rows = {t.name: torch.zeros(t.shape[0], dtype=torch.float64) for t in tracked}
        self.cols = {t.name: torch.zeros(t.shape[1], dtype=torch.float64) for t in tracked}
        self.tracked = tracked
        self.tied: dict[str, torch.Tensor] = {}  # [B, a, b] partial gradients of tied matrices
        self.batch: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # [B, a], [B, b] float64 per document

    def hooks(self) -> list:
        handles = []
        for t in self.tracked:
            for site in t.sites:
                handles.append(site.module.register_forward_hook(self._forward(t, site)))
        return handles

    def _forward(self, t: Tracked, site):
        def hook(module, inputs, output):
            x = inputs[0]
            if not output.requires_grad:
                output.requires_grad_(True)
            output.register_hook(lambda delta: self._add(t, site.kind, x, delta))
            return output

        return hook

    def _add(self, t: Tracked, kind: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        delta = delta.float()  # [B, T, out]
        if kind == "linear":
            g = torch.bmm(delta.transpose(1, 2), x.float())  # [B, out, in]
        elif kind == "conv1d":
            g = torch.bmm(x.float().transpose(1, 2), delta)  # [B, in, out]
        else:  # embedding: row id_t gets δ_t
            B, T, d = delta.shape
            g = delta.new_zeros(B, t.shape[0], d)
            g.scatter_add_(1, x.unsqueeze(-1).expand(B, T, d), delta)  # [B, vocab, d]
        if len(t.sites) > 1:
            self.tied[t.name] = g if t.name not in self.tied else self.tied[t.name] + g
        else:
            self._square(t.name, g)

    def _square(self, name: str, g: torch.Tensor) -> None:
        sq = g.square_()  # [B, a, b]
        self.batch[name] = (sq.sum(dim=2, dtype=torch.float64).cpu(), sq.sum(dim=1, dtype=torch.float64).cpu())

    def end_batch(self, n_docs: int) -> int:
        """Add the batch's documents whose sums are all finite; returns how many were left out."""
        for name, g in self.tied.items():
            self._square(name, g)
        self.tied.clear()
        good = torch.ones(n_docs, dtype=torch.bool)
        for r, c in self.batch.values():
            good &= torch.isfinite(r).all(dim=1) & torch.isfinite(c).all(dim=1)
        for name, (r, c) in self.batch.items():
            self.rows[name] += r[good].sum(dim=0)
            self.cols[name] += c[good].sum(dim=0)
        self.batch.clear()
        return int((~good).sum())


def estimate(model: torch.nn.Module, tracked: list[Tracked], batches: Iterable, loss_fn, *, reduce=None, eps: float = EPS) -> Normalizer:
    """V = mean squared per-document gradient over the documents of `batches`.

    Each batch holds several documents (at most `docs_per_batch`): one forward and backward per
    batch, with each document's gradient formed per tracked matrix by hooks (`_SquareSums`)
    instead of one autograd pass per document, which cost a model call per document (10× a
    training step's cost per document on a small model). The factored form is fitted by row and
    column means, like the Adam fit; a mean over documents commutes with a mean over a row, so
    each gradient's squares go straight into row and column sums: no [a, b] float64 sum per
    matrix. `loss_fn(model, batch)` gives [B] per-document losses; `reduce` all-reduces the sums
    across ranks under torchrun.
    """
    sums = _SquareSums(tracked)
    count = torch.zeros((), dtype=torch.float64)
    skipped = torch.zeros((), dtype=torch.float64)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handles = sums.hooks()
    try:
        for batch in batches:
            loss_fn(model, batch).sum().backward()
            n_docs = batch.input_ids.shape[0]
            bad = sums.end_batch(n_docs)
            count += n_docs - bad
            skipped += bad
    finally:
        for h in handles:
            h.remove()
        sums.tied.clear()
        sums.batch.clear()
        for p, flag in saved:
            p.requires_grad_(flag)
    rows, cols = sums.rows, sums.cols
    if reduce is not None:
        for t in tracked:
            reduce(rows[t.name])
            reduce(cols[t.name])
        reduce(count)
        reduce(skipped)
    n = max(float(count), 1.0)
    scales = {}
    for t in tracked:
        a, b = t.shape
        # the row and column means of V = E[g²]
        scales[t.name] = factored_scales(rows[t.name] / (n * b), cols[t.name] / (n * a), eps)
    left_out = f" ({int(skipped)} with a NaN or inf gradient left out)" if float(skipped) else ""
    return Normalizer(kind="estimated", source=f"mean squared gradient over {int(float(count))} corpus documents{left_out}",
                      scales=scales, eps=eps)
