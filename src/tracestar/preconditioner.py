"""R: TrackStar's Gauss–Newton Hessian approximation, mixed between train and eval, as R^{-1/2}.

    R_train = E_{z ~ corpus}[g gᵀ]      R_eval = E_{z ~ queries}[g gᵀ]      (g = P(∇L/√V))
    R = λ R_eval + (1 − λ) R_train
    Ḡ = unit(R^{-1/2} g)

R is block-diagonal: each projection block's k² coordinates are cut into contiguous ranges of at
most `r_block` and each range gets its own matrix. Statistics are kept as sums (Σ g gᵀ, count) so
ranks can all-reduce them. λ is chosen by matching the two sorted eigenvalue spectra (all blocks
together) at a component index c: the c-th eigenvalue of λ R_eval equals the c-th of (1 − λ) R_train,
i.e. λ = σ_train[c] / (σ_train[c] + σ_eval[c]). The paper used c ≈ 1000 of 65,536 components; we
scale c to the index's dimension. R^{-1/2} comes from an eigendecomposition in float64 with
damping δ · mean eigenvalue added to the spectrum.

Costs, at 2^16 dimensions (34 ranges of ~1,922): the sums are float32 (the raw vectors they are
made of are float32; a sum takes one rounding per update, ~1e-7 relative, far below the damping
and the stored vectors' fp16 step), half the memory of float64 and 2-5× faster to accumulate. Each
eigendecomposition stays float64 (its error relative to the damped spectrum's floor is what
matters, and float32 would leave ~1e-3 there). They run one per thread with one LAPACK thread
each, as many at once as torch has threads: a multi-threaded float64 `eigh` of this size ran 10×
slower than a single-threaded one on a busy 2-core machine, and the ranges are independent.
Nothing but R^{-1/2} is written: the statistics can always be recomputed from the raw shards (that
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
from tracestar.options import DEFAULT_DAMPING, DEFAULT_R_BLOCK
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


def spectrum(mats: Sequence[torch.Tensor] | RStats, progress: Progress = _silent, desc: str = "R spectrum") -> torch.Tensor:
    """All eigenvalues of a block-diagonal matrix (its blocks, or an RStats' means), descending."""
    if isinstance(mats, RStats):
        stats = mats
        eig = threaded_map(lambda i: torch.linalg.eigvalsh(stats.mean(i)), range(len(stats.sums)), progress, desc)
    else:
        eig = threaded_map(lambda m: torch.linalg.eigvalsh(m.double()), list(mats), progress, desc)
    return _sorted_spectrum(eig)


def _sorted_spectrum(eig: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every range's eigenvalues in one descending vector, negatives (rounding) at 0."""
    return torch.sort(torch.cat(list(eig)).clamp(min=0.0), descending=True).values


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
    """Per range i: `inv_sqrt(make(i))` (kind "inv_sqrt") or its eigenvalues (kind "eigvalsh").

    Batched (`batched_map`, the default on an accelerator) or one range per CPU thread
    (`threaded_map`, the default on the CPU). Why both: on a GPU one batched call of equal-sized
    matrices keeps the device busy, while on a CPU a batched `eigh` is a loop over the same LAPACK
    call (measured no faster: README, "Throughput"), and the threads are what overlaps them. The
    CPU path is the one every index was built with, so its bytes are unchanged.
    """
    if batched is None:
        batched = torch.device(device).type != "cpu"
    if batched:
        fn = (lambda r: _inv_sqrt_stack(r, damping)) if kind == "inv_sqrt" else (lambda r: torch.linalg.eigvalsh(r.double()))
        return batched_map(fn, make, sizes, device, progress, desc)
    one = (lambda i: inv_sqrt(make(i), damping)) if kind == "inv_sqrt" else (lambda i: torch.linalg.eigvalsh(make(i)))
    return threaded_map(one, range(len(sizes)), progress, desc)


@dataclass
class Preconditioner:
    """R^{-1/2} per range; `apply` maps [N, D] → [N, D]. kind 'none' is the identity."""

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
            out[:, s:e] = vectors[:, s:e].float() @ m  # m is symmetric
        return out

    def to_json(self) -> dict:
        return {"kind": self.kind, "lambda": self.lam, "damping": self.damping, "n_ranges": len(self.ranges), **self.info}

    def save(self, path: str | Path) -> None:
        """R^{-1/2} per range and the ranges. (Older indexes' files also hold each range's float64
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
    eval_: RStats | None = None,
    *,
    lam: float | None = None,
    damping: float = DEFAULT_DAMPING,
    dim: int | None = None,
    progress: Progress = _silent,
    device: str = "cpu",
    batched: bool | None = None,
) -> Preconditioner:
    """R^{-1/2} for `train` (R_train alone) or `mixed` (λ R_eval + (1 − λ) R_train).

    `progress` wraps each loop of eigendecompositions (one per range: the spectra for λ, then R^{-1/2}).
    `device`, `batched`: where and how they run (`eig_map`; the sums stay on the CPU).
    """
    if kind == "none":
        return Preconditioner("none")
    assert train is not None
    info: dict = {"train_count": int(train.count)}
    sizes = [e - s for s, e in train.ranges]

    def eig(kind_: str, make: Callable[[int], torch.Tensor], desc: str) -> list[torch.Tensor]:
        return eig_map(kind_, make, sizes, damping, device=device, batched=batched, progress=progress, desc=desc)

    if kind == "train":
        mats = eig("inv_sqrt", train.mean, "R^-1/2 (train)")
        return Preconditioner("train", train.ranges, mats, None, damping, info)
    if kind != "mixed" or eval_ is None:
        raise ValueError("a mixed preconditioner needs eval query statistics")
    info["eval_count"] = int(eval_.count)
    if lam is None:
        dim = dim or train.ranges[-1][1]
        index = component_index(dim)
        eig_train = _sorted_spectrum(eig("eigvalsh", train.mean, "R_train spectrum"))
        eig_eval = _sorted_spectrum(eig("eigvalsh", eval_.mean, "R_eval spectrum"))
        lam, used = auto_lambda(eig_train, eig_eval, index)
        info.update({"lambda_source": "auto", "component_index": index, "component_index_used": used})
    else:
        info["lambda_source"] = "given"

    mats = eig("inv_sqrt", lambda i: eval_.mean(i).mul_(lam).add_(train.mean(i), alpha=1.0 - lam), "R^-1/2 (mixed)")
    return Preconditioner("mixed", train.ranges, mats, float(lam), damping, info)
