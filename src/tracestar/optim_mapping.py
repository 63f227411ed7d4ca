"""Which optimizer-state entry belongs to which parameter: names, Trainer's groups, or parameter order.

A torch state keys its entries by position, so the mapping is recovered (see `optim_state.py`
for the order of preference) and every entry is shape-checked against the parameter it is mapped
to; shapes alone cannot tell same-shaped parameters apart, which is why names win when present.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from tracestar.errors import UserError

#: Module wrappers that prefix parameter names (torch.compile, activation checkpointing, FSDP1, DDP).
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


#: Trainer's name patterns (transformers ≥ 4.47) for parameters that get no weight decay.
_NO_DECAY_PATTERNS = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]


def given_names(groups: list[Mapping[str, Any]], keyed: list[list[Any]], source: str) -> list[str] | None:
    """Parameter names the state carries: `param_names`, or FQN strings as its keys."""
    flat = [k for ks in keyed for k in ks]
    if flat and all(isinstance(k, str) for k in flat):
        return flat
    if groups and all("param_names" in g for g in groups):
        names = [n for g in groups for n in g["param_names"]]
        if len(names) != len(flat):
            raise UserError(f"{source}: 'param_names' lists {len(names)} parameters, 'params' {len(flat)}")
        return [str(n) for n in names]
    return None


def canonical_names(given: list[str], model: nn.Module, source: str, state: Mapping, keys: list) -> list[str]:
    """Each given name as `model.named_parameters()` spells it (wrapper prefixes dropped, tied aliases merged)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    alias = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    out: list[str] = []
    for name, key in zip(given, keys):
        clean = name
        for seg in _WRAPPER_SEGMENTS:
            clean = clean.replace(seg, "")
        if clean not in alias and clean.startswith("module."):
            clean = clean[len("module."):]
        if clean not in alias:
            shape = _first_shape(state.get(key))
            raise UserError(f"{source}: optimizer state names parameter '{name}'"
                            f"{' ' + fmt_shape(shape) if shape else ''}, which this model does not have")
        out.append(alias[clean])
    seen: set[str] = set()
    for name, canon in zip(given, out):
        if canon in seen:
            raise UserError(f"{source}: optimizer state lists parameter '{canon}' twice (as '{name}')")
        seen.add(canon)
    return out


def choose_order(keyed: list[list[Any]], state: Mapping, model: nn.Module, shapes: dict[str, tuple[int, ...]],
                  source: str, trainer_hint: bool) -> tuple[str, list[str]]:
    """(mapping, parameter name per position) for a state keyed by position."""
    sizes = [len(ks) for ks in keyed]
    flat = [k for ks in keyed for k in ks]
    candidates: list[tuple[str, list[str]]] = []
    for rule in _TRAINER_RULES:
        decay, rest = trainer_groups(model, rule)
        if len(sizes) == 2 and sizes == [len(decay), len(rest)]:
            candidates.append(("trainer-groups", decay + rest))
    in_order = [n for n, p in model.named_parameters()]
    candidates.append(("parameter-order", in_order))
    fits: list[tuple[str, list[str]]] = []
    first_problem: str | None = None
    for method, order in candidates:
        problem = _order_problem(flat, order, state, shapes, method, source)
        if problem is None:
            if all(order != o for _, o in fits):
                fits.append((method, order))
        elif first_problem is None:
            first_problem = problem
    if not fits:
        raise UserError(first_problem or f"{source}: the optimizer state does not fit this model")
    if len(fits) > 1:
        trainer = [f for f in fits if f[0] == "trainer-groups"]
        if trainer_hint and len(trainer) == 1:
            return trainer[0]
        (m1, o1), (m2, o2) = fits[0], fits[1]
        i = next(j for j, (a, b) in enumerate(zip(o1, o2)) if a != b)
        raise UserError(f"{source}: ambiguous optimizer state: entry {flat[i]} is '{o1[i]}' {fmt_shape(shapes[o1[i]])} by {m1} "
                        f"but '{o2[i]}' {fmt_shape(shapes[o2[i]])} by {m2}; save the optimizer with named parameters")
    return fits[0]


def _order_problem(flat: list[Any], order: list[str], state: Mapping, shapes: dict[str, tuple[int, ...]],
                   method: str, source: str) -> str | None:
    """Why the state does not fit `order` (count, then the first shape mismatch), or None."""
    if len(flat) != len(order):
        return (f"{source}: optimizer state lists {len(flat)} parameters, the model has {len(order)} "
                f"({method}); the state does not belong to this model")
    for key, name in zip(flat, order):
        problem = shape_problem(state.get(key), shapes[name])
        if problem:
            return (f"{source}: optimizer state entry {key} (mapped by {method} to '{name}') has {problem[0]} of shape "
                    f"{fmt_shape(problem[1])}; the parameter is {fmt_shape(shapes[name])}")
    return None


def expected_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape a known state tensor has for a parameter of `shape` (None: not a known key)."""
    if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "variance", "sum", "square_avg",
               "acc_delta", "exp_inf", "grad_avg", "prev", "ax"):
        return shape
    if len(shape) < 2:
        return None
    if key == "row_var":
        return shape[:-1] + (1,)
    if key == "col_var":
        return shape[:-2] + (1, shape[-1])
    if key == "exp_avg_sq_row":
        return shape[:-1]
    if key == "exp_avg_sq_col":
        return shape[:-2] + shape[-1:]
    return None


def shape_problem(st: Mapping[str, Any] | None, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]] | None:
    """(key, its shape) of the first known tensor that does not fit a parameter of `shape`."""
    if not st:
        return None
    for key, value in st.items():
        if not torch.is_tensor(value) or value.dim() == 0 or value.numel() == 0:
            continue
        want = expected_shape(key, shape)
        if want is not None and tuple(value.shape) != want:
            return key, tuple(value.shape)
    return None


def _layernorm_like(module: nn.Module, with_rmsnorm: bool) -> bool:
    if isinstance(module, nn.LayerNorm):
        return True
    return with_rmsnorm and type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


#: (no-decay name patterns, modules whose parameters never decay count RMSNorm-like classes too)
_TRAINER_RULES = (
    ("patterns", False),  # transformers ≥ 4.47: get_decay_parameter_names with name patterns
    ("bias", False),  # earlier: LayerNorm modules and names containing "bias"
    ("bias", True),  # earlier, with a model that registered its RMSNorm as LayerNorm-like
)


def trainer_groups(model: nn.Module, rule: tuple[str, bool] = _TRAINER_RULES[0]) -> tuple[list[str], list[str]]:
    """(weight-decay names, other names) as HF Trainer's `create_optimizer` groups trainable parameters."""
    names_by_kind, rmsnorm = rule
    under_norm: set[str] = set()
    for mod_name, module in model.named_modules():
        if mod_name and _layernorm_like(module, rmsnorm):
            under_norm.update(f"{mod_name}.{n}" for n, _ in module.named_parameters(remove_duplicate=False))

    def decays(name: str) -> bool:
        low = name.lower()
        if name in under_norm:
            return False
        if names_by_kind == "patterns":
            return not any(p.search(low) for p in _NO_DECAY_PATTERNS)
        return "bias" not in name

    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name) else rest).append(name)  # a tied weight is judged by its first name, as Trainer does
    return decay, rest


def _first_shape(st: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    for v in (st or {}).values():
        if torch.is_tensor(v) and v.dim() > 0:
            return tuple(v.shape)
    return None


def fmt_shape(shape: Iterable[int] | None) -> str:
    return "[" + ", ".join(str(int(s)) for s in (shape or ())) + "]"
