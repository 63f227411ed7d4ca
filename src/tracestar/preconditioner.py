"""R: TrackStar's Gauss–Newton Hessian approximation, mixed between train and eval, as a whitener of R.

    R_train = E_{z ~ corpus}[g gᵀ]      R_eval = E_{z ~ queries}[g gᵀ]      (g = P(∇L/√V))
    R = λ R_eval + (1 − λ) R_train
    Ḡ = unit(W g),  W Wᵀ = (R + δ I)^{-1}   (W = R^{-1/2} by default)

R is block-diagonal: each projection block's k² coordinates are cut into contiguous ranges of at
most `r_block` and each range gets its own matrix. R_train's statistics are kept as sums (Σ g gᵀ,
count) so ranks can all-reduce them; R_eval is kept as the eval queries' vectors themselves
(`QueryStats`), which are already in memory whole when they are embedded and take less room than
the sums whenever there are fewer queries than a range has coordinates. λ is chosen by matching
the two sorted eigenvalue spectra (all blocks together) at a component index c: the c-th
eigenvalue of λ R_eval equals the c-th of (1 − λ) R_train, i.e. λ = σ_train[c] / (σ_train[c] +
σ_eval[c]). The paper used c ≈ 1000 of 65,536 components; we scale c to the index's dimension.
R_eval's spectrum comes from the queries' n × n Gram matrix when n is smaller than the range (the
non-zero eigenvalues of QᵀQ and QQᵀ are the same; the others are 0), so it costs n³, not m³.

The whitener W, with damping δ · mean eigenvalue (= δ · trace / m) added to the spectrum, in float64:
- `eigh` (the default): W = (R + δ I)^{-1/2}, symmetric, from an eigendecomposition.
- `cholesky`: W = L^{-T} with L Lᵀ = R + δ I. Every score Ḡ_q · Ḡ_d is the same (W Wᵀ is the
  same matrix, so g_qᵀ W Wᵀ g_d and both norms are), to float64 rounding; the stored vectors are in
  another orthonormal basis, so their bytes differ. A Cholesky factor and one triangular solve cost
  a fifth to a tenth of an eigendecomposition and its product (0.2 s against 2.1 s for one range of
  1,857 at one thread on an idle core; 13.3 s against 68.6 s for 35 such ranges on a loaded one).

Costs, at 2^16 dimensions (35 ranges of ~1,857): the sums are float32 (the raw vectors they are
made of are float32; a sum takes one rounding per update, ~1e-7 relative, far below the damping
and the stored vectors' fp16 step), half the memory of float64 and 2-5× faster to accumulate. Each
factorization stays float64 (its error relative to the damped spectrum's floor is what matters:
the damped condition number is at most 1 + m/δ ≈ 2·10⁴, so float32 would leave ~1e-3 there).
They run one per thread with one LAPACK thread each, as many at once as torch has threads: a
multi-threaded float64 `eigh` of this size ran 10× slower than a single-threaded one on a busy
2-core machine, and the ranges are independent.
Nothing but W is written: the statistics can always be recomputed from the raw shards (that
is what `refit` does), and storing them took 1.9 GB beside 0.54 GB of vectors (the demo world,
mixed R, 2^16).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from tracestar.files import write_safetensors
from tracestar.options import DEFAULT_DAMPING, DEFAULT_R_BLOCK, R_FACTORS
from tracestar.projection import Block

PAPER_COMPONENT_FRACTION = 1000 / 65536

T = TypeVar("T")
U = TypeVar("U")
#: Wraps an iterable to report its steps (e.g. a tqdm bar): `progress(items, desc)` yields `items`.
#: The eigendecompositions of a large index take minutes, so the caller may want to show them.
#: The iterable may be a lazy `Sized` one (results arriving as they are computed): use `len()`.
Progress = Callable[[Iterable[T], str], Iterable[T]]


def _silent(items: Iterable[T], desc: str) -> Iterable[T]:
    return items


class Sized(Iterable[T]):
    """An iterator with a known length, so a progress bar can show an ETA without consuming it."""

    def __init__(self, items: Iterator[T], n: int):
        self._items, self._n = items, n

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)


def threaded_map(fn: Callable[[T], U], items: Sequence[T], progress: Progress = _silent, desc: str = "") -> list[U]:
    """[fn(x) for x in items], run on `torch.get_num_threads()` Python threads with torch (and so
    LAPACK) at one thread each meanwhile; results in order, progress as each one arrives.

    For independent LAPACK calls of moderate size (see the module docstring): one per core beats
    each using every core, and a single-threaded call's rounding does not depend on the thread count.
    """
    threads = torch.get_num_threads()
    if threads <= 1 or len(items) <= 1:
        with _one_thread():
            return list(progress(Sized(map(fn, items), len(items)), desc))
    with _one_thread(), ThreadPoolExecutor(max_workers=threads) as pool:
        return list(progress(Sized(pool.map(fn, items), len(items)), desc))


class _one_thread:
    """torch (and MKL / OpenMP under it) at one thread inside the block; restored on exit."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def r_ranges(blocks: list[Block], r_block: int = DEFAULT_R_BLOCK) -> list[tuple[int, int]]:
    """Contiguous [start, end) coordinate ranges, one R matrix each, never crossing a block."""
    ranges = []
    for b in blocks:
        n_parts = max(1, math.ceil(b.size / r_block))
        edges = [b.offset + round(i * b.size / n_parts) for i in range(n_parts + 1)]
        ranges.extend(zip(edges[:-1], edges[1:]))
    return ranges


@dataclass
class RStats:
    """Σ g gᵀ per range (float32) and the number of vectors summed (float64); all-reducible."""

    ranges: list[tuple[int, int]]
    sums: list[torch.Tensor] = field(default_factory=list)
    count: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    def __post_init__(self):
        if not self.sums:
            self.sums = [torch.zeros(e - s, e - s, dtype=torch.float32) for s, e in self.ranges]

    def update(self, vectors: torch.Tensor) -> None:
        """Add a batch of vectors [N, D]: one float32 product-and-add per range (`addmm_`)."""
        v = vectors.float()
        for (s, e), acc in zip(self.ranges, self.sums):
            part = v[:, s:e]  # [N, m]
            acc.addmm_(part.T, part.to(acc.dtype))
        self.count += v.shape[0]

    def all_reduce(self, reduce) -> None:
        for acc in self.sums:
            reduce(acc)
        reduce(self.count)

    def mean(self, i: int) -> torch.Tensor:
        """[m, m] float64 E[g gᵀ] of range i (made one range at a time: float64 copies of all of
        them at once were the largest part of a build's peak memory)."""
        return self.sums[i].double() / max(float(self.count), 1.0)

    def means(self) -> list[torch.Tensor]:
        return [self.mean(i) for i in range(len(self.sums))]

    def gram(self, i: int) -> torch.Tensor:
        """A matrix with range i's eigenvalues (for sums, the mean itself)."""
        return self.mean(i)

    def gram_sizes(self) -> list[int]:
        return [e - s for s, e in self.ranges]


@dataclass
class QueryStats:
    """R_eval as the n eval queries' vectors [n, D] (float32), not as sums: `mean` forms a range's
    float64 E[g gᵀ] when the mix needs it, and `gram` gives a min(n, m)-sized matrix with the same
    non-zero eigenvalues (QQᵀ/n when n < m), so λ's spectrum costs n³ per range, not m³."""

    ranges: list[tuple[int, int]]
    vectors: torch.Tensor  # [n, D] float32

    @property
    def count(self) -> torch.Tensor:
        return torch.tensor(float(self.vectors.shape[0]), dtype=torch.float64)

    def _part(self, i: int) -> torch.Tensor:
        s, e = self.ranges[i]
        return self.vectors[:, s:e].double()  # [n, m]

    def mean(self, i: int) -> torch.Tensor:
        """[m, m] float64 QᵀQ / n of range i."""
        q = self._part(i)
        return q.T @ q / max(q.shape[0], 1)

    def gram(self, i: int) -> torch.Tensor:
        """[k, k] float64, k = min(n, m): QQᵀ / n when n < m (the same non-zero eigenvalues), else `mean`."""
        q = self._part(i)
        return q @ q.T / q.shape[0] if q.shape[0] < q.shape[1] else self.mean(i)

    def gram_sizes(self) -> list[int]:
        n = self.vectors.shape[0]
        return [min(n, e - s) for s, e in self.ranges]

    def means(self) -> list[torch.Tensor]:
        return [self.mean(i) for i in range(len(self.ranges))]


def spectrum(mats: Sequence[torch.Tensor] | RStats | QueryStats, progress: Progress = _silent,
             desc: str = "R spectrum") -> torch.Tensor:
    """All eigenvalues of a block-diagonal matrix (its blocks, or statistics' means), descending."""
    if isinstance(mats, (RStats, QueryStats)):
        stats = mats
        eig = threaded_map(lambda i: torch.linalg.eigvalsh(stats.gram(i)), range(len(stats.ranges)), progress, desc)
        return _sorted_spectrum(eig, [e - s for s, e in stats.ranges])
    eig = threaded_map(lambda m: torch.linalg.eigvalsh(m.double()), list(mats), progress, desc)
    return _sorted_spectrum(eig)


def _sorted_spectrum(eig: Sequence[torch.Tensor], sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Every range's eigenvalues in one descending vector, negatives (rounding) at 0; with `sizes`,
    each range's list is padded with zeros to its size (a Gram matrix's missing eigenvalues)."""
    eig = list(eig)
    if sizes is not None:
        eig += [torch.zeros(m - len(ev), dtype=torch.float64) for ev, m in zip(eig, sizes) if m > len(ev)]
    return torch.sort(torch.cat(eig).clamp(min=0.0), descending=True).values


def component_index(dim: int) -> int:
    """The paper's spectrum-matching index (~1000 of 65,536) scaled to this dimension."""
    return max(0, round(PAPER_COMPONENT_FRACTION * dim) - 1)


def auto_lambda(eig_train: torch.Tensor, eig_eval: torch.Tensor, index: int) -> tuple[float, int]:
    """λ with λ σ_eval[c] = (1 − λ) σ_train[c]; c clipped to where both spectra are non-zero."""
    tol = 1e-12
    nonzero = min(int((eig_train > tol * eig_train[0]).sum()), int((eig_eval > tol * eig_eval[0]).sum()))
    c = min(index, max(nonzero - 1, 0))
    st, se = float(eig_train[c]), float(eig_eval[c])
    if st + se <= 0:
        return 0.5, c
    return st / (st + se), c


def inv_sqrt(r: torch.Tensor, damping: float) -> torch.Tensor:
    """(R + δ · mean eigenvalue · I)^{-1/2}, float64 eigendecomposition, returned float32."""
    evals, evecs = torch.linalg.eigh(r.double())
    evals = evals.clamp(min=0.0)
    shift = damping * float(evals.mean()) if float(evals.mean()) > 0 else 1e-12
    scale = (evals + shift).rsqrt()
    return ((evecs * scale[None, :]) @ evecs.T).float()


def _damped(r: torch.Tensor, damping: float) -> torch.Tensor:
    """[..., m, m] float64 copy of r + δ · (trace / m) · I (1e-12 · I where the trace is not > 0):
    the damping of `inv_sqrt`, whose mean eigenvalue is the trace / m, without the eigenvalues."""
    a = r.double().clone()
    mean = a.diagonal(dim1=-2, dim2=-1).mean(dim=-1, keepdim=True)  # [..., 1]
    shift = torch.where(mean > 0, damping * mean, torch.full_like(mean, 1e-12))
    a.diagonal(dim1=-2, dim2=-1).add_(shift)
    return a


def chol_whitener(r: torch.Tensor, damping: float) -> torch.Tensor:
    """[..., m, m] → [..., m, m] float32 W = L^{-T}, L Lᵀ = R + δ · mean eigenvalue · I, in float64.

    W Wᵀ = (R + δ I)^{-1}, as with `inv_sqrt`, so x ↦ x @ W gives every inner product and norm the
    symmetric R^{-1/2} gives. The damping keeps R + δ I positive definite (its smallest eigenvalue
    is ≥ δ · trace / m, far above float64 rounding), so the factorization cannot fail on finite R;
    a non-finite R is refused by name.
    """
    a = _damped(r, damping)
    low, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        raise ValueError("R is not positive definite after damping (a NaN or inf in its statistics?)")
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    return torch.linalg.solve_triangular(low, eye, upper=False).transpose(-2, -1).float().contiguous()


#: float64 bytes one batched eigendecomposition may hold on the device (input, eigenvectors, result).
BATCH_BYTES = 2**30


def size_batches(sizes: Sequence[int], budget: int = BATCH_BYTES) -> list[list[int]]:
    """Range numbers grouped by equal size, each group cut so that its float64 [B, m, m] stack (and
    the eigenvectors and result beside it) fits `budget`: one batched call per group."""
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(sizes):
        by_size.setdefault(m, []).append(i)
    groups = []
    for m, idx in by_size.items():
        per = max(1, budget // (3 * 8 * m * m))
        groups += [idx[j:j + per] for j in range(0, len(idx), per)]
    return groups


def _inv_sqrt_stack(r: torch.Tensor, damping: float) -> torch.Tensor:
    """[B, m, m] → [B, m, m] float32: `inv_sqrt` of each matrix, one batched float64 `eigh`."""
    evals, evecs = torch.linalg.eigh(r.double())  # [B, m], [B, m, m]
    evals = evals.clamp(min=0.0)
    mean = evals.mean(dim=1, keepdim=True)  # [B, 1]
    shift = torch.where(mean > 0, damping * mean, torch.full_like(mean, 1e-12))
    scale = (evals + shift).rsqrt()
    return ((evecs * scale[:, None, :]) @ evecs.transpose(1, 2)).float()


def batched_map(fn: Callable[[torch.Tensor], torch.Tensor], make: Callable[[int], torch.Tensor], sizes: Sequence[int],
                device: str, progress: Progress = _silent, desc: str = "") -> list[torch.Tensor]:
    """[fn(make(i)) for each range i], equal-sized ranges stacked and run as one call on `device`
    (`size_batches`); results on the CPU, in order, progress as each group arrives."""
    out: list[torch.Tensor | None] = [None] * len(sizes)

    def run() -> Iterator[int]:
        for group in size_batches(sizes):
            stacked = torch.stack([make(i) for i in group]).to(device)  # [B, m, m]
            for i, res in zip(group, fn(stacked).cpu()):
                out[i] = res
                yield i

    for _ in progress(Sized(run(), len(sizes)), desc):
        pass
    return out  # type: ignore[return-value]


def eig_map(kind: str, make: Callable[[int], torch.Tensor], sizes: Sequence[int], damping: float, *, device: str = "cpu",
            batched: bool | None = None, progress: Progress = _silent, desc: str = "") -> list[torch.Tensor]:
    """Per range i: `inv_sqrt(make(i))` (kind "inv_sqrt"), `chol_whitener(make(i))` (kind
    "cholesky") or the eigenvalues of make(i) (kind "eigvalsh"); `sizes[i]` is make(i)'s side.

    Batched (`batched_map`, the default on an accelerator) or one range per CPU thread
    (`threaded_map`, the default on the CPU). Why both: on a GPU one batched call of equal-sized
    matrices keeps the device busy, while on a CPU a batched `eigh` is a loop over the same LAPACK
    call (measured no faster: README, "Throughput"), and the threads are what overlaps them. The
    CPU path is the one every index was built with, so its bytes are unchanged.
    """
    if batched is None:
        batched = torch.device(device).type != "cpu"
    if batched:
        stack = {"inv_sqrt": lambda r: _inv_sqrt_stack(r, damping), "cholesky": lambda r: chol_whitener(r, damping),
                 "eigvalsh": lambda r: torch.linalg.eigvalsh(r.double())}[kind]
        return batched_map(stack, make, sizes, device, progress, desc)
    one = {"inv_sqrt": lambda i: inv_sqrt(make(i), damping), "cholesky": lambda i: chol_whitener(make(i), damping),
           "eigvalsh": lambda i: torch.linalg.eigvalsh(make(i))}[kind]
    return threaded_map(one, range(len(sizes)), progress, desc)


@dataclass
class Preconditioner:
    """The whitener W per range (R^{-1/2}, or L^{-T} with `info["factor"]` "cholesky"); `apply`
    maps [N, D] → [N, D], x ↦ x @ W per range. kind 'none' is the identity."""

    kind: str  # none | train | mixed
    ranges: list[tuple[int, int]] = field(default_factory=list)
    mats: list[torch.Tensor] = field(default_factory=list)
    lam: float | None = None
    damping: float = DEFAULT_DAMPING
    info: dict = field(default_factory=dict)

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return vectors
        out = vectors.clone().float()
        for (s, e), m in zip(self.ranges, self.mats):
            out[:, s:e] = vectors[:, s:e].float() @ m  # [N, m] @ [m, m]
        return out

    def to_json(self) -> dict:
        return {"kind": self.kind, "lambda": self.lam, "damping": self.damping, "n_ranges": len(self.ranges), **self.info}

    def save(self, path: str | Path) -> None:
        """W per range (named `r{i}.inv_sqrt` whatever the factor; the description says which) and
        the ranges. (Older indexes' files also hold each range's float64
        Σ g gᵀ as `{train,eval}.r{i}.sum` and the counts; `load` reads past them.)"""
        tensors = {f"r{i}.inv_sqrt": m.contiguous() for i, m in enumerate(self.mats)}
        tensors["ranges"] = torch.tensor(self.ranges, dtype=torch.int64).reshape(-1, 2)
        write_safetensors(path, tensors, metadata={"kind": self.kind})

    @staticmethod
    def load(path: str | Path, info: dict) -> "Preconditioner":
        if info.get("kind", "none") == "none":
            return Preconditioner("none")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:  # only R^{-1/2}: older files also hold the sums
            ranges = [tuple(int(x) for x in row) for row in fh.get_tensor("ranges").tolist()]
            mats = [fh.get_tensor(f"r{i}.inv_sqrt") for i in range(len(ranges))]
        extra = {k: v for k, v in info.items() if k not in ("kind", "lambda", "damping", "n_ranges")}
        return Preconditioner(info["kind"], ranges, mats, info.get("lambda"), info.get("damping", DEFAULT_DAMPING), extra)


def fit(
    kind: str,
    train: RStats | None,
    eval_: RStats | QueryStats | None = None,
    *,
    lam: float | None = None,
    damping: float = DEFAULT_DAMPING,
    dim: int | None = None,
    factor: str = "eigh",
    progress: Progress = _silent,
    device: str = "cpu",
    batched: bool | None = None,
) -> Preconditioner:
    """The whitener of R_train (`train`) or of λ R_eval + (1 − λ) R_train (`mixed`).

    `factor`: "eigh", the symmetric R^{-1/2}, or "cholesky", L^{-T} (the same scores; module docstring).
    `progress` wraps each loop of factorizations (one per range: the spectra for λ, then W).
    `device`, `batched`: where and how they run (`eig_map`; the statistics stay on the CPU).
    """
    if kind == "none":
        return Preconditioner("none")
    if factor not in R_FACTORS:
        raise ValueError(f"unknown R factor {factor!r} ({', '.join(R_FACTORS)})")
    assert train is not None
    info: dict = {"train_count": int(train.count)}
    if factor != "eigh":  # an eigh preconditioner's description stays what it always was
        info["factor"] = factor
    sizes = [e - s for s, e in train.ranges]
    whiten, name = ("inv_sqrt", "R^-1/2") if factor == "eigh" else ("cholesky", "R Cholesky")

    def eig(kind_: str, make: Callable[[int], torch.Tensor], desc: str, sizes_: list[int] = sizes) -> list[torch.Tensor]:
        return eig_map(kind_, make, sizes_, damping, device=device, batched=batched, progress=progress, desc=desc)

    if kind == "train":
        mats = eig(whiten, train.mean, f"{name} (train)")
        return Preconditioner("train", train.ranges, mats, None, damping, info)
    if kind != "mixed" or eval_ is None:
        raise ValueError("a mixed preconditioner needs eval query statistics")
    info["eval_count"] = int(eval_.count)
    if lam is None:
        dim = dim or train.ranges[-1][1]
        index = component_index(dim)
        eig_train = _sorted_spectrum(eig("eigvalsh", train.mean, "R_train spectrum"))
        eig_eval = _sorted_spectrum(eig("eigvalsh", eval_.gram, "R_eval spectrum", eval_.gram_sizes()), sizes)
        lam, used = auto_lambda(eig_train, eig_eval, index)
        info.update({"lambda_source": "auto", "component_index": index, "component_index_used": used})
    else:
        info["lambda_source"] = "given"

    mats = eig(whiten, lambda i: eval_.mean(i).mul_(lam).add_(train.mean(i), alpha=1.0 - lam), f"{name} (mixed)")
    return Preconditioner("mixed", train.ranges, mats, float(lam), damping, info)
