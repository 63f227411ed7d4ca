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


#: Bytes of per-document work `estimate` may hold at once beyond the model's own activations.
ESTIMATE_BYTES = 2**26


#: Bytes of logits (and their gradient, and the LM head's δ kept for a tied matrix) per V batch.
LOGIT_BYTES = 2**29


def estimate_batch_tokens(vocab: int, batch_tokens: int) -> int:
    """Padded tokens per `estimate` batch: `batch_tokens`, fewer where the [tokens, vocab] logits,
    their gradient and the kept head δ would pass `LOGIT_BYTES` (SmolLM2's 49,152-token head: 910)."""
    return max(1, min(batch_tokens, LOGIT_BYTES // (3 * 4 * max(vocab, 1))))


def docs_per_batch(tracked: list[Tracked], budget: int = ESTIMATE_BYTES) -> int:
    """How many documents one `estimate` batch may hold. Each document's sums are formed in chunks
    that fit `budget` (`_row_col_sums`), so the batch is bounded only by its padded tokens; this
    caps it where even one chunk per document would be a whole [a, b] gradient of every matrix."""
    largest = max((a * b for a, b in (t.shape for t in tracked)), default=1)
    return max(1, min(256, 64 * budget // (4 * largest)))


def _row_col_sums(parts: list[tuple], budget: int = ESTIMATE_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Per document, the row and column sums of G² for G = Σ_parts Aᵀ B: ([N, a], [N, b]) float64.

    Each part is (A side, B side) of one site: A [N, T, a], or ("ids", ids [N, T], a) for an
    embedding's one-hot rows, and B [N, T, b]; the parts of a tied matrix are joined along T
    (their positions concatenated). When 2 T (a + b) < a b the sums come from T × T Gram matrices,

        Σ_j G[i, j]² = (Aᵀ (B Bᵀ) A)[i, i]      Σ_i G[i, j]² = (Bᵀ (A Aᵀ) B)[j, j],

    which cost 2 T² (a + b) multiply-adds instead of the T a b of forming G, and a short document
    never forms its [a, b] gradient (for SmolLM2's 49,152 × 576 tied head, 113 MB per document);
    otherwise G is formed and squared. Float32 within a document (its sums have at most a few
    thousand terms), float64 across documents (`_SquareSums`). Documents are taken
    in chunks whose work fits `budget`, so memory does not grow with the batch.
    """
    N = parts[0][1].shape[0]
    T = sum(b_side.shape[1] for _, b_side in parts)
    a = _width(parts[0][0])
    b = parts[0][1].shape[2]
    gram = 2 * T * (a + b) < a * b
    per_doc = 4 * (3 * T * (a + b) + 2 * T * T) if gram else 4 * (2 * a * b + T * (a + b))
    step = max(1, budget // per_doc)
    rows, cols = [], []
    for i in range(0, N, step):
        A = torch.cat([_dense(a_side, i, i + step) for a_side, _ in parts], dim=1)  # [c, T, a]
        B = torch.cat([b_side[i:i + step].float() for _, b_side in parts], dim=1)  # [c, T, b]
        if gram:
            rows.append((torch.bmm(torch.bmm(B, B.transpose(1, 2)), A).mul_(A)).sum(dim=1).double())
            cols.append((torch.bmm(torch.bmm(A, A.transpose(1, 2)), B).mul_(B)).sum(dim=1).double())
        else:
            g = torch.bmm(A.transpose(1, 2), B).square_()  # [c, a, b]
            rows.append(g.sum(dim=2).double())
            cols.append(g.sum(dim=1).double())
    return torch.cat(rows).cpu(), torch.cat(cols).cpu()


def _width(a_side: torch.Tensor | tuple) -> int:
    return a_side[2] if isinstance(a_side, tuple) else a_side.shape[2]


def _dense(a_side: torch.Tensor | tuple, lo: int, hi: int) -> torch.Tensor:
    """Documents lo:hi of an A side as a dense float32 [c, T, a] tensor (one-hot rows built here)."""
    if not isinstance(a_side, tuple):
        return a_side[lo:hi].float()
    _, ids, a = a_side
    ids = ids[lo:hi]
    return torch.zeros(*ids.shape, a, device=ids.device).scatter_(2, ids.unsqueeze(-1), 1.0)


class _SquareSums:
    """Hooks that add each document's Σ_j G[i, j]² and Σ_i G[i, j]² per tracked matrix, where G is
    that document's gradient of the matrix, from one batched forward and backward.

    Why it is exact: a site's gradient is a sum over positions, G = Aᵀ B with A, B [T, ·] (Linear:
    A = δ, B = x; Conv1D: A = x, B = δ; an embedding: A = the ids' one-hot rows, B = δ), and each
    document's loss depends only on its own positions, so one backward of the summed loss gives
    every document's δ. A matrix used at several sites (a tied embedding and LM head) is the sum
    of its sites' Aᵀ B, i.e. one Aᵀ B with the sites' positions concatenated, and is squared only
    then. Parameters stay frozen: no weight gradient is formed (`_row_col_sums`).

    A batch's sums are kept per document until its backward is done, so that a document whose
    gradient has a NaN or inf anywhere (an fp16 overflow) is left out whole (`end_batch`).
    """

    def __init__(self, tracked: list[Tracked]):
        self.rows = {t.name: torch.zeros(t.shape[0], dtype=torch.float64) for t in tracked}
        self.cols = {t.name: torch.zeros(t.shape[1], dtype=torch.float64) for t in tracked}
        self.tracked = tracked
        self.tied: dict[str, list[tuple]] = {}  # (A side, B side) of each site of a tied matrix so far
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
        delta = delta.detach()  # [B, T, out]
        x = x.detach()
        if kind == "linear":
            sides = (delta, x)
        elif kind == "conv1d":
            sides = (x, delta)
        else:  # embedding: row id_t gets δ_t
            sides = (("ids", x, t.shape[0]), delta)
        if len(t.sites) > 1:
            self.tied.setdefault(t.name, []).append(sides)
        else:
            self.batch[t.name] = _row_col_sums([sides])

    def end_batch(self, n_docs: int) -> int:
        """Add the batch's documents whose sums are all finite; returns how many were left out."""
        for name, parts in self.tied.items():
            self.batch[name] = _row_col_sums(parts)
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
    batch, with each document's row and column sums of g² formed per tracked matrix by hooks
    (`_SquareSums`), instead of one autograd pass with weight gradients per document, which cost
    a model call and every [a, b] gradient per document. The factored form is fitted by row and
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
