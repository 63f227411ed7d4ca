"""Per-example projected, corrected gradients by the factored trick — never a weight gradient.

For a linear use y = W x over tokens t, ∇W = Σ_t δ_t x_tᵀ, so the corrected, projected gradient is

    L (D_r ∇W D_c) Rᵀ = Σ_t (L D_r δ_t)(R D_c x_t)ᵀ          (stored orientation [out, in])

A forward hook projects each site's input side to k, a tensor hook on the site's output projects
δ to k, and one batched matmul forms each example's k × k sum. `D_r`, `D_c` (the optimizer
correction, `normalizer.py`) are folded into L and R once. Conv1D and embeddings store [in, out],
so there x goes left and δ right; an embedding's x is a one-hot row, whose projection is a column
lookup of L. A tied embedding / LM head uses one (L, R) pair, and both uses add to its block.

Parameters are frozen while capturing, so autograd computes only activation gradients: indexing
costs less than a training step's backward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tracestar.batching import Batch, forward_loss
from tracestar.model import Site, Tracked
from tracestar.normalizer import Normalizer
from tracestar.projection import Block, gaussian, layout_dim


@dataclass
class _SideMats:
    left: torch.Tensor  # [k, a]  L · D_r
    right: torch.Tensor  # [k, b]  R · D_c
    block: int


class FactoredCapture:
    """Computes G(z) = P(∇L(z)/√V) for every example of a batch: `vectors(batch)` → [B, D]."""

    def __init__(
        self,
        model: nn.Module,
        tracked: list[Tracked],
        blocks: list[Block],
        normalizer: Normalizer,
        seed: int,
        *,
        device: torch.device | str = "cpu",
    ):
        self.model = model
        self.tracked = tracked
        self.blocks = blocks
        self.dim = layout_dim(blocks)
        self.device = torch.device(device)
        block_of = {p: i for i, b in enumerate(blocks) for p in b.params}
        self.mats: dict[str, _SideMats] = {}
        for t in tracked:
            bi = block_of[t.name]
            k = blocks[bi].k
            a, b = t.shape
            s = normalizer.scales[t.name]
            left = gaussian(seed, t.name, "L", k, a) * s.row[None, :].float()
            right = gaussian(seed, t.name, "R", k, b) * s.col[None, :].float()
            self.mats[t.name] = _SideMats(left.to(self.device), right.to(self.device), bi)
        self._acc: list[torch.Tensor] | None = None
        self._token_acc: list[torch.Tensor] | None = None
        self._per_token = False

    # --- hooks -------------------------------------------------------------------------------

    def _forward_hook(self, site: Site, mats: _SideMats):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            x = inputs[0]
            if site.kind == "embedding":
                xp = nn.functional.embedding(x, mats.left.T)  # [B, T, k] = columns of L at the ids
            elif site.kind == "conv1d":
                xp = x.to(mats.left.dtype) @ mats.left.T  # [B, T, k]
            else:
                xp = x.to(mats.right.dtype) @ mats.right.T  # [B, T, k]
            if not output.requires_grad:
                output.requires_grad_(True)
            output.register_hook(self._grad_hook(site, mats, xp))
            return output

        return hook

    def _grad_hook(self, site: Site, mats: _SideMats, xp: torch.Tensor):
        def hook(delta: torch.Tensor):
            if site.kind == "linear":
                dp = delta.to(mats.left.dtype) @ mats.left.T  # [B, T, k]
                left, right = dp, xp
            else:
                dp = delta.to(mats.right.dtype) @ mats.right.T  # [B, T, k]
                left, right = xp, dp
            if self._per_token:
                # [B, T, k, k] per-position contributions (explain.py); small inputs only
                self._token_acc[mats.block] += left.unsqueeze(-1) * right.unsqueeze(-2)
            else:
                self._acc[mats.block] += torch.bmm(left.transpose(1, 2), right)  # [B, k, k]
            return None

        return hook

    @contextmanager
    def _hooked(self):
        handles = []
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            for t in self.tracked:
                for site in t.sites:
                    handles.append(site.module.register_forward_hook(self._forward_hook(site, self.mats[t.name])))
            yield
        finally:
            for h in handles:
                h.remove()
            for p, flag in saved:
                p.requires_grad_(flag)

    # --- public ------------------------------------------------------------------------------

    def vectors(self, batch: Batch) -> torch.Tensor:
        """[B, D] corrected, projected per-example gradients (before R and normalization)."""
        batch = batch.to(self.device)
        B = batch.input_ids.shape[0]
        self._acc = [torch.zeros(B, b.k, b.k, device=self.device) for b in self.blocks]
        self._per_token = False
        with self._hooked():
            loss = forward_loss(self.model, batch)  # [B]
            loss.sum().backward()
        out = torch.cat([a.reshape(B, -1) for a in self._acc], dim=1)  # [B, D]
        self._acc = None
        return out

    def token_vectors(self, batch: Batch) -> torch.Tensor:
        """[B, T, D] the same vectors split by the position whose activation carries them.

        Summing over T gives `vectors(batch)` exactly: the gradient is a sum over positions.
        """
        batch = batch.to(self.device)
        B, T = batch.input_ids.shape
        self._token_acc = [torch.zeros(B, T, b.k, b.k, device=self.device) for b in self.blocks]
        self._per_token = True
        try:
            with self._hooked():
                loss = forward_loss(self.model, batch)
                loss.sum().backward()
            return torch.cat([a.reshape(B, T, -1) for a in self._token_acc], dim=2)
        finally:
            self._per_token = False
            self._token_acc = None
