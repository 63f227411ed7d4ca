"""The model side: local loading, a fingerprint, and which weight matrices TrackStar tracks.

θ in TrackStar is *every* trainable matrix: linear layers (HF `nn.Linear`, GPT-2's `Conv1D`), the
token and position embeddings, and an untied LM head. A tied embedding / LM head is one parameter
with two uses ("sites"); both contribute to its gradient. Norms and biases are left out and the
share of parameters covered is reported.

Every matrix is handled in its *stored* orientation [a, b] (Linear: [out, in]; Conv1D and
Embedding: [in, out]), which is also the orientation of the optimizer's statistics, so V never
needs re-orienting.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tracestar.errors import UserError

try:  # GPT-2 style models store linear weights transposed
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

# HF activation modules that compute the tanh approximation of GELU,
# 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as a chain of element-wise ops (eight tensors each
# way for GPT-2's `gelu_new`). torch has the same function as one fused kernel with a fused
# backward; see `fused_activations`.
_TANH_GELU_CLASSES = ("NewGELUActivation", "FastGELUActivation")


@dataclass
class Site:
    """One use of a tracked matrix in the forward pass.

    `kind` says what the module sees: 'linear' (weight [out, in]: δ on the left, x on the right),
    'conv1d' (weight [in, out]: x left, δ right), 'embedding' (weight [vocab, d]: one-hot ids left,
    δ right).
    """

    module_name: str
    module: nn.Module
    kind: str


@dataclass
class Tracked:
    """A tracked weight matrix, in stored orientation [a, b], with every site that uses it."""

    name: str
    param: nn.Parameter
    sites: list[Site] = field(default_factory=list)
    layer: int | None = None
    group: str = "other"

    @property
    def shape(self) -> tuple[int, int]:
        a, b = self.param.shape
        return int(a), int(b)


def load_model(model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local HF directory: never the network, never remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise UserError(f"{path}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model.to(device).eval()
    return model, tokenizer


def model_window(model: nn.Module) -> int | None:
    """The most positions the model can attend over (`n_positions` / `max_position_embeddings`), or
    None when its config does not say: longer inputs would index past its position embedding."""
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _layer_of(module_name: str) -> int | None:
    match = re.search(r"\.(\d+)(\.|$)", module_name)
    return int(match.group(1)) if match else None


def _group_of(module_name: str, kind: str) -> str:
    low = module_name.lower()
    if kind == "embedding" or "lm_head" in low or "embed_out" in low:
        return "embed"
    if any(tag in low for tag in ("attn", "attention")):
        return "attn"
    if any(tag in low for tag in ("mlp", "ffn", "feed_forward")):
        return "mlp"
    return "other"


def _site_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def tracked_matrices(model: nn.Module) -> list[Tracked]:
    """Every trainable weight matrix with its sites, in `named_parameters` order (ties merged)."""
    by_param: dict[int, Tracked] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for module_name, module in model.named_modules():
        kind = _site_kind(module)
        weight = getattr(module, "weight", None)
        if kind is None or weight is None or not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            continue
        key = id(weight)
        if key not in by_param:
            by_param[key] = Tracked(
                name=names[key], param=weight, layer=_layer_of(module_name), group=_group_of(module_name, kind)
            )
        by_param[key].sites.append(Site(module_name, module, kind))
        if by_param[key].group != "embed" and _group_of(module_name, kind) == "embed":
            by_param[key].group = "embed"
    order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    return sorted(by_param.values(), key=lambda t: order[id(t.param)])


def coverage(model: nn.Module, tracked: list[Tracked]) -> dict:
    """Share of the model's parameters that the tracked matrices represent (ties counted once)."""
    total = sum(p.numel() for p in model.parameters())
    covered = sum(t.param.numel() for t in tracked)
    left_out = [n for n, p in model.named_parameters() if all(p is not t.param for t in tracked)]
    return {
        "n_params": int(total),
        "n_tracked": int(covered),
        "share": covered / total if total else 0.0,
        "left_out": left_out[:50],
        "n_left_out": len(left_out),
    }


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the config and every parameter's name, shape, dtype and bytes."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"):
            cfg.pop(volatile, None)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        data = param.detach().to("cpu").contiguous().view(-1)
        h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary, special tokens and (fast tokenizers) full serialisation."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")


@contextmanager
def fused_activations(model: nn.Module):
    """While active, tanh-GELU activation modules run torch's fused kernel instead of their op chain.

    Same function (the results differ only in rounding, ~1e-7 relative); on GPT-2-style models the
    unfused chain is the largest element-wise cost of a forward+backward. Used by capture only:
    the model is restored on exit, so training and evaluation code see it unchanged.
    """
    # A module whose forward is already replaced on the instance (e.g. wrapped by another library's
    # hooks) is left alone: swapping it would bypass that wrapper.
    swapped = [m for m in model.modules() if type(m).__name__ in _TANH_GELU_CLASSES and "forward" not in vars(m)]
    for m in swapped:
        m.forward = _tanh_gelu  # instance attribute: shadows the class method
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward

