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


def estimate(model: torch.nn.Module, tracked: list[Tracked], batches: Iterable, loss_fn, *, reduce=None, eps: float = EPS) -> Normalizer:
    """V = mean squared per-document gradient over the given single-document batches.

    Uses ordinary autograd with weight gradients (it runs on a small sample only), then fits the
    factored form by row and column means, like the Adam fit. Only those means are needed, and a
    mean over documents commutes with a mean over a row, so each gradient's squares are summed
    into row and column sums at once: no float64 copy of every gradient and no [a, b] float64 sum
    per matrix (at 135M parameters those were 1 GB and most of the estimate's time). `reduce`
    all-reduces the sums across ranks under torchrun.
    """
    rows = {t.name: torch.zeros(t.shape[0], dtype=torch.float64) for t in tracked}
    cols = {t.name: torch.zeros(t.shape[1], dtype=torch.float64) for t in tracked}
    count = torch.zeros((), dtype=torch.float64)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for t in tracked:
        t.param.requires_grad_(True)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).sum().backward()
            for t in tracked:
                if t.param.grad is not None:
                    sq = t.param.grad.detach().square()  # [a, b]
                    rows[t.name] += sq.sum(dim=1, dtype=torch.float64).cpu()
                    cols[t.name] += sq.sum(dim=0, dtype=torch.float64).cpu()
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in saved:
            p.requires_grad_(flag)
    if reduce is not None:
        for t in tracked:
            reduce(rows[t.name])
            reduce(cols[t.name])
        reduce(count)
    n = max(float(count), 1.0)
    scales = {}
    for t in tracked:
        a, b = t.shape
        # the row and column means of V = E[g²]
        scales[t.name] = factored_scales(rows[t.name] / (n * b), cols[t.name] / (n * a), eps)
    return Normalizer(kind="estimated", source=f"mean squared gradient over {int(n)} corpus documents", scales=scales, eps=eps)
