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

Sites that read the same input tensor (a Llama layer's q/k/v, its gate/up) are found once, by a
gradient-free forward of two tokens before the first batch; then the first of them to run projects
that input for all of them with their R matrices stacked, one [Σk, n] product instead of a skinny
[k, n] product each. The input's identity is checked every time, so a model that does otherwise is
only slower, never wrong, and every batch, first or not, is computed the same way (a resumed or
multi-process build writes the same bytes). Every block's k × k sums go straight into its slice of
one [B, D] output.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from tracestar.batching import Batch, forward_loss, shifted_targets
from tracestar.model import Site, Tracked, fused_activations
from tracestar.normalizer import Normalizer
from tracestar.projection import Block, gaussian, layout_dim

# Model families whose causal-LM forward is exactly `lm_head(base_model(...).last_hidden_state)`
# (no logit scaling or soft-capping); for these the LM head and the loss are fused (below).
_PLAIN_HEAD_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3"}


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
        autocast: torch.dtype | None = None,
    ):
        self.model = model
        self.tracked = tracked
        self.blocks = blocks
        self.dim = layout_dim(blocks)
        self.device = torch.device(device)
        # Optional mixed precision for the model's own forward/backward (e.g. torch.bfloat16 on a
        # CPU with AVX512-BF16). Off by default: the exactness guarantees are for fp32. Under it the
        # projections run in that dtype too (as autocast would run them), with L and R stored in
        # it once, so activations and δ are not copied to fp32 and back at every site; the
        # products accumulate in fp32 inside BLAS and the per-example k × k sums are fp32.
        self.autocast = autocast
        proj_dtype = autocast if autocast is not None else torch.float32
        block_of = {p: i for i, b in enumerate(blocks) for p in b.params}
        self.mats: dict[str, _SideMats] = {}
        for t in tracked:
            bi = block_of[t.name]
            k = blocks[bi].k
            a, b = t.shape
            s = normalizer.scales[t.name]
            left = gaussian(seed, t.name, "L", k, a) * s.row[None, :].float()
            right = gaussian(seed, t.name, "R", k, b) * s.col[None, :].float()
            self.mats[t.name] = _SideMats(left.to(self.device, proj_dtype), right.to(self.device, proj_dtype), bi)
        self._head = self._find_head()
        self._acc: list[torch.Tensor] | None = None
        self._token_acc: list[torch.Tensor] | None = None
        self._per_token = False
        # Shared-input groups (see the module docstring): site number → the group it belongs to.
        self._sites = [(site, self.mats[t.name]) for t in tracked for site in t.sites]
        self._groups: dict[int, _InputGroup] | None = None  # None until `_find_groups` ran
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # site → (input, its projection)

    def _find_head(self):
        """(head module, its side matrices) when the LM head + loss can be fused, else None."""
        config = getattr(self.model, "config", None)
        get = getattr(self.model, "get_output_embeddings", None)
        if config is None or get is None or getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES:
            return None
        head = get()
        if not isinstance(head, nn.Linear) or head.bias is not None:
            return None
        for t in self.tracked:
            for site in t.sites:
                if site.module is head and site.kind == "linear":
                    return head, self.mats[t.name]
        return None

    # --- hooks -------------------------------------------------------------------------------

    def _forward_hook(self, number: int, site: Site, mats: _SideMats):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            x = inputs[0]
            if site.kind == "embedding":
                xp = nn.functional.embedding(x, mats.left.T)  # [B, T, k] = columns of L at the ids
            else:
                xp = self._x_projection(number, x)  # [B, T, k]
            if not output.requires_grad:
                output.requires_grad_(True)
            output.register_hook(self._grad_hook(site, mats, xp))
            return output

        return hook

    def _grad_hook(self, site: Site, mats: _SideMats, xp: torch.Tensor):
        def hook(delta: torch.Tensor):
            if site.kind == "linear":
                left, right = _project(mats.left, delta), xp  # [B, T, k] each
            else:
                left, right = xp, _project(mats.right, delta)
            if self._per_token:
                # [B, T, k, k] per-position contributions (explain.py); small inputs only
                self._token_acc[mats.block] += left.unsqueeze(-1).float() * right.unsqueeze(-2).float()
            else:
                # in place into the block's [B, k, k] slice of the output: no temporary
                acc = self._acc[mats.block]
                acc.baddbmm_(left.transpose(1, 2).to(acc.dtype), right.to(acc.dtype))
            return None

        return hook

    def _x_projection(self, number: int, x: torch.Tensor) -> torch.Tensor:
        """[B, T, k] the input side of site `number`, from its group's stacked product when the
        group's first site already projected this very tensor."""
        hit = self._pending.pop(number, None)
        if hit is not None and hit[0] is x:
            return hit[1]
        group = (self._groups or {}).get(number)
        if group is None or hit is not None:  # no group, or a sibling projected another tensor: alone
            return _project(_x_side(*self._sites[number]), x)
        parts = _project(group.stacked, x).split(group.sizes, dim=2)  # views of one [Σk, B·T] product
        for member, part in zip(group.members, parts):
            if member != number:
                self._pending[member] = (x, part)
        return parts[group.members.index(number)]

    def _find_groups(self, batch: Batch) -> None:
        """Which Linear / Conv1D sites read the same tensor: one gradient-free forward of the first
        example's first two tokens, recording each site's input (stacked x-side R, module docstring)."""
        if self._groups is not None:
            return
        seen: list[tuple[int, torch.Tensor]] = []  # holds every input, so no id() is reused meanwhile

        def recorder(number: int):
            def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
                seen.append((number, inputs[0]))

            return hook

        handles = [site.module.register_forward_hook(recorder(n))
                   for n, (site, _) in enumerate(self._sites) if site.kind != "embedding"]
        ids = batch.input_ids[:1, :2]
        try:
            with torch.no_grad(), fused_activations(self.model):
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           position_ids=torch.arange(ids.shape[1], device=ids.device)[None], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        by_input: dict[int, list[int]] = {}
        for number, x in seen:
            by_input.setdefault(id(x), []).append(number)
        groups: dict[int, _InputGroup] = {}
        for members in by_input.values():
            members = list(dict.fromkeys(members))  # a module called twice on one input is one member
            if len(members) < 2:
                continue
            mats = [_x_side(*self._sites[m]) for m in members]
            group = _InputGroup(members, [m.shape[0] for m in mats], torch.cat(mats, dim=0))
            groups.update({m: group for m in members})
        self._groups = groups

    @contextmanager
    def _hooked(self):
        handles = []
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            for number, (site, mats) in enumerate(self._sites):
                handles.append(site.module.register_forward_hook(self._forward_hook(number, site, mats)))
            with fused_activations(self.model):
                yield
        finally:
            for h in handles:
                h.remove()
            for p, flag in saved:
                p.requires_grad_(flag)
            self._pending.clear()

    def _autocast(self):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _attention(self, batch: Batch):
        """The attention kernel for this batch (`attention_kernel`)."""
        return attention_kernel(self.device, self.autocast, batch.input_ids.shape[1])

    # --- public ------------------------------------------------------------------------------

    def vectors(self, batch: Batch) -> torch.Tensor:
        """[B, D] corrected, projected per-example gradients (before R and normalization)."""
        batch = batch.to(self.device)
        B = batch.input_ids.shape[0]
        self._find_groups(batch)
        out = torch.zeros(B, self.dim, device=self.device)  # [B, D]; each block sums into its slice
        self._acc = [out[:, b.offset : b.offset + b.size].view(B, b.k, b.k) for b in self.blocks]
        self._per_token = False
        try:
            with self._hooked(), self._autocast(), self._attention(batch):
                if self._head is None:
                    loss = forward_loss(self.model, batch)  # [B]
                else:
                    loss = self._fused_loss(batch)  # [B], the head's block filled in during backward
                self._end_forward()
                loss.sum().backward()
        finally:
            self._acc = None
        return out

    def _end_forward(self) -> None:
        """After the forward: a projection that no site asked for is not kept through the backward."""
        self._pending.clear()

    def _fused_loss(self, batch: Batch) -> torch.Tensor:
        """[B] the same loss as `forward_loss`, with the LM head fused with the loss."""
        gold, weight = shifted_targets(batch)
        return _FusedHeadLoss.apply(_base_hidden(self.model, batch), self, gold, weight)

    def token_vectors(self, batch: Batch) -> torch.Tensor:
        """[B, T, D] the same vectors split by the position whose activation carries them.

        Summing over T gives `vectors(batch)` exactly: the gradient is a sum over positions.
        """
        batch = batch.to(self.device)
        B, T = batch.input_ids.shape
        self._find_groups(batch)
        self._token_acc = [torch.zeros(B, T, b.k, b.k, device=self.device) for b in self.blocks]
        self._per_token = True
        try:
            with self._hooked(), self._autocast(), self._attention(batch):
                loss = forward_loss(self.model, batch)
                self._end_forward()
                loss.sum().backward()
            return torch.cat([a.reshape(B, T, -1) for a in self._token_acc], dim=2)
        finally:
            self._per_token = False
            self._token_acc = None


#: Longest batch (positions) for which capture runs attention as the math kernel under bf16 on a
#: CPU. It keeps the [B, heads, T, T] probabilities for the backward: at 4,096 tokens per batch
#: and 128 positions, 1.2 MB per head and layer.
_MATH_ATTENTION_MAX_T = 128


def attention_kernel(device: torch.device, autocast: torch.dtype | None, positions: int):
    """Under bf16 autocast on a CPU, short batches run `scaled_dot_product_attention` as its math
    kernel (the same function): torch 2.13's CPU flash-attention backward in bf16 took 35 ms per
    SmolLM2 layer on 48 × 47 tokens against 5.6 ms for the math kernel's. Otherwise torch chooses.
    """
    if autocast is None or device.type != "cpu" or positions > _MATH_ATTENTION_MAX_T:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@dataclass
class _InputGroup:
    """Sites that read one input tensor: their x-side matrices stacked, [Σ sizes, n]."""

    members: list[int]
    sizes: list[int]
    stacked: torch.Tensor


def _x_side(site: Site, mats: _SideMats) -> torch.Tensor:
    """[k, n] the matrix that projects what a site reads: R·D_c for a Linear, L·D_r for a Conv1D."""
    return mats.left if site.kind == "conv1d" else mats.right


def _project(mat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B, T, k] = x @ matᵀ for mat [k, n], x [B, T, n], in the projection's dtype.

    The orientation that BLAS runs fastest depends on the dtype (`_k_rows_first`); both operands
    of the per-example k × k sum accept either result's strides.
    """
    B, T, n = x.shape
    k = mat.shape[0]
    flat = x.reshape(B * T, n).to(mat.dtype)  # a no-op for fp32, and for bf16 activations under autocast
    if _k_rows_first(mat):
        return (mat @ flat.T).view(k, B, T).permute(1, 2, 0)  # [B, T, k], strides (T, 1, B·T)
    return (flat @ mat.T).view(B, T, k)  # [B, T, k], contiguous


def _k_rows_first(mat: torch.Tensor) -> bool:
    """Whether to compute a projection as the k-row product mat @ xᵀ rather than x @ matᵀ.

    In fp32 on a CPU, for the odd k of the default layouts, BLAS runs the k-row product about
    1.5× faster. In bf16 (autocast) the CPU's bf16 kernels run x @ matᵀ 2-5× faster at SmolLM2's
    widths, and torch 2.13's bf16 mat @ xᵀ dies with a floating-point exception for some shapes
    with a long shared side (k = 32 against a 49,152-token head), so bf16 never takes it.
    """
    return mat.dtype == torch.float32


# --- the LM head and the loss, fused ----------------------------------------------------------


#: Fewest rows per chunk of the fused head. Every chunk streams the whole [V, d] head through
#: three products; at a 49,152-token vocabulary a cache-sized chunk (21 rows) made that stream,
#: not the arithmetic, the cost: 256 rows ran the head 2.8× faster on a 2-core CPU.
_HEAD_MIN_ROWS = 256


def _head_chunk(device: torch.device, V: int) -> int:
    """Rows of logits per chunk: cache-sized on a CPU (but at least `_HEAD_MIN_ROWS`, so that a
    large vocabulary's head is read once per many rows), large on an accelerator."""
    elements = (1 << 20) if device.type == "cpu" else (1 << 26)
    return max(_HEAD_MIN_ROWS, elements // max(1, V))


class _FusedHeadLoss(torch.autograd.Function):
    """Per-example summed cross-entropy of `hidden @ Wᵀ` and its gradient, in token chunks.

    The logits gradient of a summed cross-entropy is softmax − onehot, so each chunk computes its
    logits, the loss, δ = (softmax − onehot)·weight, the gradient of the hidden state δ W and the
    head's projected δ, L δ, while the chunk is in cache: [B, T, V] logits are never stored, there
    is no separate log-softmax / NLL backward, and rows that carry no loss (prompt, padding, last
    position) are skipped. Backward scales the saved results by the incoming per-example gradient
    and adds the head's k × k term to its block.
    """

    @staticmethod
    def forward(ctx, hidden, capture, gold, weight):
        head, mats = capture._head
        W = head.weight  # [V, d]
        B, T, d = hidden.shape
        V = W.shape[0]
        h = hidden.reshape(B * T, d)
        g, w = gold.reshape(-1), weight.reshape(-1)
        rows = torch.nonzero(w).squeeze(1)
        k = mats.left.shape[0]
        dh = torch.zeros(B * T, d, dtype=hidden.dtype, device=hidden.device)
        loss_tok = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
        step = _head_chunk(hidden.device, V)
        unit = bool((w.index_select(0, rows) == 1).all())  # the usual 0/1 loss mask: no scaling
        # The products run in the autocast dtype when autocast is on, with operands cast once here
        # rather than by autocast in every chunk (the [V, d] head alone is 28M elements at SmolLM2).
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else W.dtype
        Wc, hc, left = W.to(dtype), h.to(dtype), mats.left.to(dtype)  # L is already in it
        # the head's projected δ, L δ: [k, B·T] or [B·T, k], in the orientation of `_project`
        rows_first = _k_rows_first(left)
        dp = torch.zeros((k, B * T) if rows_first else (B * T, k), dtype=torch.float32, device=hidden.device)
        with torch.autocast(dev, enabled=False):
            for s in range(0, rows.numel(), step):
                r = rows[s : s + step]
                z = (hc.index_select(0, r) @ Wc.T).float()  # [n, V] logits
                logp = torch.log_softmax(z, dim=1)
                del z
                gr = g.index_select(0, r).unsqueeze(1)
                wr = w.index_select(0, r).unsqueeze(1).float()
                loss_tok.index_copy_(0, r, (logp.gather(1, gr) * wr).squeeze(1).neg_())
                p = logp.exp_()  # softmax, in place
                p.scatter_add_(1, gr, torch.full_like(wr, -1.0))  # softmax − onehot
                if not unit:
                    p.mul_(wr)  # δ
                pc = p.to(dtype)
                del logp, p
                dh.index_copy_(0, r, (pc @ Wc).to(dh.dtype))
                if rows_first:
                    dp.index_copy_(1, r, (left @ pc.T).float())
                else:
                    dp.index_copy_(0, r, (pc @ left.T).float())
        xp = _project(mats.right, hidden)  # [B, T, k] the head's input side
        ctx.capture, ctx.mats, ctx.shape, ctx.rows_first = capture, mats, (B, T, k), rows_first
        ctx.save_for_backward(dh, dp, xp)
        return loss_tok.view(B, T).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dp, xp = ctx.saved_tensors
        B, T, k = ctx.shape
        gl = grad_loss.float().view(B, 1, 1)
        acc = ctx.capture._acc[ctx.mats.block]
        per_example = dp.view(k, B, T).permute(1, 0, 2) if ctx.rows_first else dp.view(B, T, k).transpose(1, 2)
        left = per_example * gl  # [B, k, T]
        acc.baddbmm_(left.to(acc.dtype), xp.to(acc.dtype))
        grad_hidden = dh.view(B, T, -1) * gl.to(dh.dtype)
        return grad_hidden, None, None, None


def _base_hidden(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model.base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state

