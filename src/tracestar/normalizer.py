"""V: the optimizer's second moment, as row and column scales.

TrackStar divides each gradient element-wise by √V. The paper's models used Adafactor, whose V is
factored: for a matrix [a, b] it keeps row statistics r [a] and column statistics c [b] with
V ≈ r cᵀ / mean(r). Then

    G / √V = D_r · G · D_c,   D_r = diag(√(mean(r) / r)),   D_c = diag(1 / √c)

so the correction is two diagonal scalings that fold into the projection matrices (`capture.py`)
and no per-example full gradient is ever formed. Every source of V reduces to this one interface,
`Scales(row, col)`:

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

from tracestar.errors import UserError
from tracestar.model import Tracked

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

    def to_json(self) -> dict:
        return {"kind": self.kind, "source": self.source, "eps": self.eps}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, s in self.scales.items():
            tensors[f"{name}.row"] = s.row.contiguous()
            tensors[f"{name}.col"] = s.col.contiguous()
        tmp = Path(str(path) + ".tmp")
        save_file(tensors, str(tmp), metadata={"kind": self.kind, "source": str(self.source)})
        tmp.replace(path)

    @staticmethod
    def load(path: str | Path, info: dict) -> "Normalizer":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        names = {k.rsplit(".", 1)[0] for k in tensors}
        scales = {n: Scales(tensors[f"{n}.row"], tensors[f"{n}.col"]) for n in names}
        return Normalizer(kind=info["kind"], source=info.get("source"), scales=scales, eps=info.get("eps", EPS))


def factored_scales(r: torch.Tensor, c: torch.Tensor, eps: float = EPS) -> Scales:
    """Scales for V = r cᵀ / mean(r), with r and c floored at eps × their mean."""
    r = r.double().flatten()
    c = c.double().flatten()
    r = torch.clamp(r, min=eps * float(r.mean()) if float(r.mean()) > 0 else 1e-30)
    c = torch.clamp(c, min=eps * float(c.mean()) if float(c.mean()) > 0 else 1e-30)
    row = torch.sqrt(r.mean() / r)
    col = 1.0 / torch.sqrt(c)
    return Scales(row.float(), col.float())


def factored_v(r: torch.Tensor, c: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The dense V [a, b] that `factored_scales` corrects for (used by tests and nowhere else)."""
    s = factored_scales(r, c, eps)
    return 1.0 / (s.row.double()[:, None] * s.col.double()[None, :]) ** 2


def identity(tracked: list[Tracked]) -> Normalizer:
    scales = {t.name: Scales(torch.ones(t.shape[0]), torch.ones(t.shape[1])) for t in tracked}
    return Normalizer(kind="none", source=None, scales=scales)


def _row_col(state: dict, shape: tuple[int, int], betas: tuple[float, float] | None) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(kind, r, c) from one parameter's optimizer state."""
    a, b = shape
    if "row_var" in state and "col_var" in state:
        return "torch_adafactor", state["row_var"].reshape(a), state["col_var"].reshape(b)
    if "exp_avg_sq_row" in state and "exp_avg_sq_col" in state:
        return "hf_adafactor", state["exp_avg_sq_row"].reshape(a), state["exp_avg_sq_col"].reshape(b)
    if "exp_avg_sq" in state:
        v = state["exp_avg_sq"].double().reshape(a, b)
        step = float(state.get("step", 0) or 0)
        if betas is not None and step > 0:
            v = v / (1.0 - betas[1] ** step)  # Adam's bias correction
        return "adam", v.mean(dim=1), v.mean(dim=0)
    raise UserError(f"optimizer state has none of row_var/col_var, exp_avg_sq_row/col, exp_avg_sq (keys: {sorted(state)})")


def from_optimizer_state(path: str | Path, model: torch.nn.Module, tracked: list[Tracked], eps: float = EPS) -> Normalizer:
    """Read a `torch.save`d optimizer state_dict whose parameter order is `model.parameters()`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: optimizer state not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
        raise UserError(f"{path}: not a torch optimizer state_dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise UserError(f"{path}: not an optimizer state_dict (expected keys 'state' and 'param_groups')")
    params = list(model.parameters())
    betas_of: dict[int, tuple[float, float] | None] = {}
    for group in sd["param_groups"]:
        for idx in group["params"]:
            betas_of[int(idx)] = tuple(group["betas"]) if "betas" in group else None
    if max(betas_of, default=-1) >= len(params):
        raise UserError(f"{path}: state lists {len(betas_of)} parameters, the model has {len(params)}")
    index_of = {id(p): i for i, p in enumerate(params)}
    scales, kinds = {}, set()
    for t in tracked:
        i = index_of[id(t.param)]
        state = sd["state"].get(i)
        if state is None:
            raise UserError(f"{path}: no optimizer state for parameter {i} ({t.name})")
        kind, r, c = _row_col(state, t.shape, betas_of.get(i))
        kinds.add(kind)
        scales[t.name] = factored_scales(r, c, eps)
    kind = kinds.pop() if len(kinds) == 1 else "mixed:" + ",".join(sorted(kinds))
    return Normalizer(kind=kind, source=str(path.resolve()), scales=scales, eps=eps)


def estimate(model: torch.nn.Module, tracked: list[Tracked], batches: Iterable, loss_fn, *, reduce=None, eps: float = EPS) -> Normalizer:
    """V = mean squared per-document gradient over the given single-document batches.

    Uses ordinary autograd with weight gradients (it runs on a small sample only), then fits the
    factored form by row and column means, like the Adam fit. `reduce` all-reduces the sums across
    ranks under torchrun.
    """
    sums = {t.name: torch.zeros(t.shape, dtype=torch.float64) for t in tracked}
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
                    sums[t.name] += t.param.grad.detach().double().cpu() ** 2
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in saved:
            p.requires_grad_(flag)
    if reduce is not None:
        for s in sums.values():
            reduce(s)
        reduce(count)
    n = max(float(count), 1.0)
    scales = {}
    for t in tracked:
        v = sums[t.name] / n
        scales[t.name] = factored_scales(v.mean(dim=1), v.mean(dim=0), eps)
    return Normalizer(kind="estimated", source=f"mean squared gradient over {int(n)} corpus documents", scales=scales, eps=eps)
