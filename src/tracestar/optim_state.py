"""Optimizer states as training code writes them: find them, map every entry to its parameter, check it.

A torch optimizer's `state_dict()` keys its per-parameter state by position — the order in which
the parameters were handed to the optimizer, group after group — not by name. Reading a state
therefore means recovering that order, and a wrong guess is silent wherever two parameters share a
shape (q/k/v/o, gate/up): the wrong matrix's V would be used. This module owns that step for the
normalizer and for tail-patch: what the state holds (`OptimizerState`, its second moments and its
step). Where the state lies on disk and how it is loaded is `optim_files.py`; which entry belongs
to which parameter is `optim_mapping.py`.

Where the state can be (`locate`):

- a file: `optimizer.pt` (HF `Trainer`), `optimizer.bin` (accelerate `save_state`), any
  `torch.save`d state_dict, also one nested in a dict such as ``{"model": ..., "optimizer": ...}``;
- a directory holding one of those (a Trainer `checkpoint-N/`, an accelerate state directory);
- a `torch.distributed.checkpoint` directory (`.metadata` + `*.distcp`, as FSDP2 training writes
  it); it is read by this one process with only its optimizer entries materialized.

How entries are mapped to parameters, in order of preference (recorded as `mapping`):

1. `names`: the state names its parameters — `param_names` in `param_groups` (optimizers built
   from `named_parameters()`, torch ≥ 2.5) or FQN keys (`get_optimizer_state_dict`, DCP, FSDP).
2. `trainer-groups`: HF `Trainer`'s two groups — every parameter that gets weight decay, then the
   rest, each in `named_parameters()` order. Which parameters decay is Trainer's rule: none inside
   a LayerNorm module, and (transformers ≥ 4.47) none whose lower-cased name matches `bias`,
   `layernorm`, `rmsnorm`, a `norm` path segment or `_norm`; older releases dropped only names
   containing "bias" (and modules registered as LayerNorm-like, such as RMSNorm). Every variant is
   tried; the group sizes and shapes select it.
3. `parameter-order`: the groups, concatenated, follow `model.parameters()`.

Every tensor of a known state key is shape-checked against its mapped parameter (Adam moments,
Adafactor's factored rows/columns, SGD momentum). An order is taken only if it fits every entry;
when index-based orders fit with different assignments the mapping is ambiguous and refused
(unless a `trainer_state.json` beside the file says the Trainer wrote it). Shapes cannot tell
same-shaped parameters apart, which is why names win whenever the state has them.

Second moments (`OptimizerState.second_moment`): Adam-family `exp_avg_sq / (1 − β₂ᵗ)` (AMSGrad's
`max_exp_avg_sq` when on), torch `Adafactor` `row_var`/`col_var`, HF `Adafactor`
`exp_avg_sq_row`/`exp_avg_sq_col`. States with no second moment (SGD, Lion, told apart by their
keys) raise `NoSecondMoment`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tracestar.errors import UserError
from tracestar.optim_files import (  # noqa: F401 (find_in_dir, states_in_dir re-exported)
    find_in_dir,
    find_state_dict,
    is_dcp,
    load_dcp,
    load_file,
    locate,
    states_in_dir,
    written_by_trainer,
)
from tracestar.optim_mapping import (  # noqa: F401 (trainer_groups re-exported)
    canonical_names,
    choose_order,
    expected_shape,
    fmt_shape,
    given_names,
    shape_problem,
    trainer_groups,
)

MAPPINGS = ("names", "trainer-groups", "parameter-order")


class NoSecondMoment(UserError):
    """The optimizer keeps no second moment (SGD, Lion): V must be estimated or left out."""

    def __init__(self, message: str, *, optimizer: str, source: str, mapping: str | None):
        super().__init__(message)
        self.optimizer, self.source, self.mapping = optimizer, source, mapping


@dataclass
class SecondMoment:
    """One parameter's V: either `full` (its shape) or factored `row` [a] and `col` [b] with
    V ≈ row colᵀ / mean(row)."""

    kind: str  # adam | torch_adafactor | hf_adafactor
    full: torch.Tensor | None = None
    row: torch.Tensor | None = None
    col: torch.Tensor | None = None


@dataclass
class OptimizerState:
    """A state whose entries are keyed by the model's (deduplicated) parameter names."""

    source: str  # what the user named
    files: list[str]  # what was read
    optimizer: str  # adamw | adam | nadam | radam | adafactor | hf_adafactor | sgd | lion | unknown
    mapping: str  # names | trainer-groups | parameter-order
    step: int | None  # the largest per-parameter step count
    groups: list[dict[str, Any]]  # hyperparameters per group (no `params` / `param_names`)
    group_names: list[list[str]]  # parameter names per group, in the saved order
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-parameter state
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def has_second_moment(self) -> bool:
        return self.optimizer in ("adamw", "adam", "nadam", "radam", "adafactor", "hf_adafactor")

    def group_of(self, name: str) -> dict[str, Any]:
        for hyper, names in zip(self.groups, self.group_names):
            if name in names:
                return hyper
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """What the manifest records about the state."""
        out = {"optimizer_state": self.source, "optimizer": self.optimizer, "mapping": self.mapping, "step": self.step}
        if self.notes:
            out["optimizer_notes"] = list(self.notes)
        return out

    def second_moment(self, name: str) -> SecondMoment:
        """V of parameter `name`; Adam's is bias-corrected with its group's β₂ and its step."""
        if not self.has_second_moment:
            raise self.missing_v_error()
        st = self.entries.get(name)
        if st is None:
            raise UserError(f"{self.source}: no optimizer state for parameter '{name}' (it was not trained with this optimizer)")
        shape = self.shapes[name]
        if _present(st, "row_var") and _present(st, "col_var"):
            row, col = self._checked(name, st, "row_var"), self._checked(name, st, "col_var")
            return SecondMoment("torch_adafactor", row=row.reshape(shape[:-1]), col=col.reshape(shape[:-2] + shape[-1:]))
        if _present(st, "exp_avg_sq_row") and _present(st, "exp_avg_sq_col"):
            return SecondMoment("hf_adafactor", row=self._checked(name, st, "exp_avg_sq_row"),
                                col=self._checked(name, st, "exp_avg_sq_col"))
        group = self.group_of(name)
        key = "max_exp_avg_sq" if group.get("amsgrad") and _present(st, "max_exp_avg_sq") else "exp_avg_sq"
        if _present(st, key) and self.optimizer not in ("adafactor", "hf_adafactor"):
            v = self._checked(name, st, key).double()
            step = self._step(name, st)
            betas = group.get("betas")
            if betas is not None and step > 0:
                v = v / (1.0 - self._beta2(name, betas) ** step)  # Adam's bias correction
            return SecondMoment("adam", full=v)
        raise UserError(f"{self.source}: the {self.optimizer} state of '{name}' has no second moment (keys: {sorted(st)})")

    def _checked(self, name: str, st: Mapping[str, Any], key: str) -> torch.Tensor:
        """State tensor `key` of parameter `name` as a second moment: the shape the optimizer keeps
        for that parameter, a floating-point dtype, finite, ≥ 0 and not zero everywhere. Anything
        else is a diverged run or a damaged file, and V read from it would skew every score without
        a sign (NaN spreads to every vector; an all-zero V becomes a 1e15 weight). Zeros in part
        are legitimate (rows that saw no gradient) and are floored by the normalizer."""
        v = st[key]
        where = f"{self.source}: optimizer state '{key}' of parameter '{name}'"
        want = expected_shape(key, self.shapes[name])
        if want is not None and tuple(v.shape) != want:
            raise UserError(f"{where} has shape {fmt_shape(v.shape)}; the parameter needs {fmt_shape(want)}")
        if not v.is_floating_point():
            raise UserError(f"{where} has dtype {str(v.dtype).replace('torch.', '')}; a second moment is floating-point")
        n_nan, n_inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
        if n_nan or n_inf:
            raise UserError(f"{where} holds {n_nan} NaN and {n_inf} inf among {v.numel()} values "
                            "(a diverged run or a damaged file); V cannot be read from it")
        n_neg = int((v < 0).sum())
        if n_neg:
            raise UserError(f"{where} holds {n_neg} negative values (min {float(v.min()):.3g}); "
                            "a second moment is a mean of squares")
        if not bool((v > 0).any()):
            raise UserError(f"{where} is zero everywhere (the optimizer never saw a gradient for it); "
                            "pass --no-optimizer-correction, or a state from a run that trained it")
        return v

    def _step(self, name: str, st: Mapping[str, Any]) -> int:
        """The step count of `name`'s entry (0 when the state keeps none): a whole number ≥ 0."""
        raw = st.get("step")
        step = _as_int(raw)
        if raw is not None and (step is None or step < 0):
            shown = raw.item() if torch.is_tensor(raw) and raw.numel() == 1 else raw
            raise UserError(f"{self.source}: optimizer state 'step' of parameter '{name}' is {shown!r}; "
                            "expected a count ≥ 0")
        return step or 0

    def _beta2(self, name: str, betas: Any) -> float:
        """β₂ of `name`'s group for the bias correction: a number in [0, 1)."""
        try:
            beta2 = float(betas[1])
        except (TypeError, ValueError, IndexError, KeyError):
            beta2 = float("nan")
        if not 0.0 <= beta2 < 1.0:
            raise UserError(f"{self.source}: param group 'betas' of parameter '{name}' is {betas!r}; "
                            "expected (β₁, β₂) with 0 ≤ β₂ < 1")
        return beta2

    def missing_v_error(self) -> NoSecondMoment:
        """The one-line error for a state without V (the caller raises it, or estimates V instead)."""
        keys = sorted({k for st in self.entries.values() for k in st}) or ["none"]
        what = {"sgd": "SGD", "lion": "Lion", "unknown": "optimizer"}.get(self.optimizer, self.optimizer)
        return NoSecondMoment(
            f"{self.source}: the {what} state keeps no second moment (state keys: {', '.join(keys)}); "
            "pass --estimate-v-if-missing to estimate V from the corpus, or --no-optimizer-correction",
            optimizer=self.optimizer, source=self.source, mapping=self.mapping)

    def torch_state_dict(self) -> dict[str, Any]:
        """A `state_dict` for an optimizer whose groups hold `self.group_names`' parameters in that order."""
        sd: dict[str, Any] = {"state": {}, "param_groups": []}
        i = 0
        for hyper, group in zip(self.groups, self.group_names):
            idx = []
            for name in group:
                if name in self.entries:
                    sd["state"][i] = self.entries[name]
                idx.append(i)
                i += 1
            sd["param_groups"].append({**hyper, "params": idx})
        return sd

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The checkpoint's own optimizer over `model`'s parameters, with its state and hyperparameters."""
        cls = _optimizer_class(self.optimizer)
        if cls is None:
            raise UserError(f"{self.source}: cannot replay a {self.optimizer} step (no such optimizer here)")
        params = dict(model.named_parameters())
        opt = cls([{"params": [params[n] for n in names]} for names in self.group_names])
        try:
            opt.load_state_dict(self.torch_state_dict())
        except (ValueError, KeyError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"{self.source}: the {self.optimizer} state does not load into {cls.__name__}: {first}") from None
        return opt


# --- mapping ------------------------------------------------------------------------------------


def read(path: str | Path, model: nn.Module) -> OptimizerState:
    """Locate, load and map the optimizer state at `path` onto `model`; every check done here."""
    where = locate(path)
    raw = load_dcp(where) if is_dcp(where) else load_file(where)
    sd = find_state_dict(raw, str(where))
    return from_state_dict(sd, model, source=str(Path(path).resolve()), files=[str(where.resolve())],
                           trainer_hint=written_by_trainer(where))


def from_state_dict(sd: Mapping[str, Any], model: nn.Module, *, source: str = "<state_dict>",
                    files: list[str] | None = None, trainer_hint: bool = False) -> OptimizerState:
    """Map an in-memory optimizer state_dict onto `model` (see the module docstring for how)."""
    groups_in = sd.get("param_groups")
    state_in = sd.get("state")
    if not isinstance(groups_in, list) or not isinstance(state_in, Mapping):
        raise UserError(f"{source}: not an optimizer state_dict ('param_groups' must be a list, 'state' a dict)")
    named = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in named.items()}
    keyed = [list(g.get("params", [])) for g in groups_in]
    flat_keys = [k for ks in keyed for k in ks]
    if len(set(flat_keys)) != len(flat_keys):
        raise UserError(f"{source}: a parameter appears twice in 'param_groups'")
    names_given = given_names(groups_in, keyed, source)
    if names_given is not None:
        mapping = "names"
        assign = dict(zip(flat_keys, canonical_names(names_given, model, source, state_in, flat_keys)))
        for key, name in assign.items():
            problem = shape_problem(state_in.get(key), shapes[name])
            if problem:
                raise UserError(f"{source}: optimizer state for '{name}' has {problem[0]} of shape {fmt_shape(problem[1])}; "
                                f"the parameter is {fmt_shape(shapes[name])}")
    else:
        mapping, order = choose_order(keyed, state_in, model, shapes, source, trainer_hint)
        assign = dict(zip(flat_keys, order))
    group_names = [[assign[k] for k in ks] for ks in keyed]
    entries = {assign[k]: dict(st) for k, st in state_in.items() if k in assign}
    stray = [k for k in state_in if k not in assign]
    if stray:
        raise UserError(f"{source}: optimizer state has entries for {stray[:3]} that no param group lists")
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in groups_in]
    optimizer, notes = _optimizer_kind(groups, entries)
    steps = [s for s in (_as_int(st.get("step")) for st in entries.values()) if s is not None]
    return OptimizerState(source=source, files=files or [], optimizer=optimizer, mapping=mapping,
                          step=max(steps) if steps else None, groups=groups, group_names=group_names,
                          entries=entries, shapes={n: shapes[n] for n in entries}, notes=notes)


# --- the optimizer ------------------------------------------------------------------------------


def _optimizer_kind(groups: list[dict[str, Any]], entries: Mapping[str, Mapping[str, Any]]) -> tuple[str, list[str]]:
    """Which optimizer wrote the state, from its state keys and group hyperparameters."""
    keys = {k for st in entries.values() for k, v in st.items() if not (torch.is_tensor(v) and v.numel() == 0)}
    hp = set().union(*(g.keys() for g in groups)) if groups else set()
    notes: list[str] = []
    if {"row_var", "col_var"} & keys or "beta2_decay" in hp:
        return "adafactor", notes
    if {"exp_avg_sq_row", "exp_avg_sq_col"} & keys or {"decay_rate", "clip_threshold"} <= hp:
        return "hf_adafactor", notes
    if "exp_avg_sq" in keys:
        if "momentum_decay" in hp or "mu_product" in keys:
            return "nadam", notes
        if "amsgrad" not in hp and "decoupled_weight_decay" in hp:
            return "radam", notes
        decoupled = {g.get("decoupled_weight_decay") for g in groups}
        if decoupled == {True}:
            return "adamw", notes
        if decoupled == {False}:
            return "adam", notes
        if any(float(g.get("weight_decay", 0) or 0) for g in groups):
            notes.append("AdamW assumed: the state does not say whether its weight decay is decoupled")
        return "adamw", notes
    if "momentum_buffer" in keys or {"momentum", "nesterov"} <= hp:
        return "sgd", notes
    if "exp_avg" in keys and "betas" in hp:
        return "lion", notes
    return "unknown", notes


def _optimizer_class(kind: str):
    if kind == "hf_adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    return {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "nadam": torch.optim.NAdam, "radam": torch.optim.RAdam,
            "adafactor": torch.optim.Adafactor, "sgd": torch.optim.SGD}.get(kind)


# --- small helpers ------------------------------------------------------------------------------


def _present(st: Mapping[str, Any], key: str) -> bool:
    v = st.get(key)
    return torch.is_tensor(v) and v.numel() > 0


def _as_int(v: Any) -> int | None:
    """A step count as an int; None when there is none or it is no finite number (NaN, a string)."""
    if torch.is_tensor(v) and v.numel() == 1:
        v = v.item()
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return int(v)
    return None


