"""P: the fixed two-sided (Kronecker) Gaussian projection, per block.

A module gradient G [a, b] maps to `L G Rᵀ` [k, k], with L [k, a] and R [k, b] i.i.d. N(0, 1/k).
The projections of a block's matrices are summed — one projection of the block-diagonal matrix —
and the output is the concatenation of the blocks' flattened k×k results (dimension Σ k²).

The matrices are regenerated from (seed, parameter name, side), never stored: an index records
only the seed and the layout.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from tracestar.model import Tracked
from tracestar.options import DEFAULT_DIM


@dataclass
class Block:
    """One projection block: its name, side k, the parameters it sums, and where it sits in the vector."""

    name: str
    k: int
    params: list[str]
    offset: int

    @property
    def size(self) -> int:
        return self.k * self.k

    def to_json(self) -> dict:
        return {"name": self.name, "k": self.k, "params": self.params, "offset": self.offset}

    @staticmethod
    def from_json(d: dict) -> "Block":
        return Block(d["name"], int(d["k"]), list(d["params"]), int(d["offset"]))


#: The most contiguous layer groups of the paper layout (each split into attention and MLP blocks).
PAPER_GROUPS = 8


def _paper_groups(tracked: list[Tracked], max_groups: int = PAPER_GROUPS) -> list[tuple[str, list[Tracked]]]:
    """Paper layout: embeddings/head, then contiguous layer groups × {attention, MLP}."""
    layers = sorted({t.layer for t in tracked if t.layer is not None and t.group in ("attn", "mlp", "other")})
    n_groups = max(1, min(max_groups, len(layers)))
    per = math.ceil(len(layers) / n_groups) if layers else 1
    group_of_layer = {layer: i // per for i, layer in enumerate(layers)}
    buckets: dict[str, list[Tracked]] = {}
    for t in tracked:
        if t.group == "embed" or t.layer is None:
            key = "embed"
        else:
            part = "mlp" if t.group == "mlp" else "attn"
            g = group_of_layer[t.layer]
            first, last = layers[g * per], layers[min(len(layers), (g + 1) * per) - 1]
            key = f"layers{first}-{last}.{part}" if first != last else f"layer{first}.{part}"
        buckets.setdefault(key, []).append(t)
    return list(buckets.items())


def make_layout(tracked: list[Tracked], *, kind: str = "paper", dim: int = DEFAULT_DIM,
                max_groups: int = PAPER_GROUPS) -> list[Block]:
    """Blocks whose k is chosen so that Σ k² ≈ `dim`, never above the block's own smaller side.

    A k larger than min(Σa, Σb) would only add redundant coordinates, so small models get fewer
    dimensions than asked (recorded in the manifest). `max_groups` caps the paper layout's layer
    groups.
    """
    if kind == "paper":
        groups = _paper_groups(tracked, max_groups)
    elif kind == "module":
        groups = [(t.name, [t]) for t in tracked]
    else:
        raise ValueError(f"unknown block layout {kind!r} (paper or module)")
    k_target = max(1, int(math.isqrt(max(1, dim // len(groups)))))
    blocks, offset = [], 0
    for name, members in groups:
        side_a = sum(t.shape[0] for t in members)
        side_b = sum(t.shape[1] for t in members)
        k = max(1, min(k_target, side_a, side_b))
        blocks.append(Block(name=name, k=k, params=[t.name for t in members], offset=offset))
        offset += k * k
    return blocks


def layout_dim(blocks: list[Block]) -> int:
    return sum(b.size for b in blocks)


def _seed_for(seed: int, name: str, side: str) -> int:
    digest = hashlib.sha256(f"tracestar:{seed}:{name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def gaussian(seed: int, name: str, side: str, k: int, n: int) -> torch.Tensor:
    """The [k, n] matrix with i.i.d. N(0, 1/k) entries for one side ('L' or 'R') of one parameter.

    Generated on the CPU with a generator seeded from (seed, name, side), so every machine, device
    and process regenerates the same matrix.
    """
    gen = torch.Generator(device="cpu").manual_seed(_seed_for(seed, name, side))
    return torch.randn(k, n, generator=gen, dtype=torch.float32) / math.sqrt(k)


def project_dense(grad: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """`L G Rᵀ` for an explicit gradient [a, b] — the reference the factored path must equal."""
    return left @ grad @ right.T
