"""Optimizer states as training code writes them: find them, map every entry to its parameter, check it.

A torch optimizer's `state_dict()` keys its per-parameter state by position — the order in which
the parameters were handed to the optimizer, group after group — not by name. Reading a state
therefore means recovering that order, and a wrong guess is silent wherever two parameters share a
shape (q/k/v/o, gate/up): the wrong matrix's V would be used. This module owns that step for the
normalizer and for tail-patch.

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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from tracestar.errors import UserError

MAPPINGS = ("names", "trainer-groups", "parameter-order")

#: Files and folders that hold an optimizer state inside a checkpoint directory.
_STATE_FILE = re.compile(r"^optimizer(_\d+)?\.(pt|bin|pth)$")
_STATE_DIR = re.compile(r"^optimizer(_\d+)?$")

#: Module wrappers that prefix parameter names (torch.compile, activation checkpointing, FSDP1, DDP).
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")

#: Trainer's name patterns (transformers ≥ 4.47) for parameters that get no weight decay.
_NO_DECAY_PATTERNS = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]


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
        want = _expected_shape(key, self.shapes[name])
        if want is not None and tuple(v.shape) != want:
            raise UserError(f"{where} has shape {_fmt(v.shape)}; the parameter needs {_fmt(want)}")
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


# --- finding the state --------------------------------------------------------------------------


def locate(path: str | Path) -> Path:
    """The file or DCP directory that holds the optimizer state `path` names; UserError if none or several."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: optimizer state not found")
    if path.is_file() or _is_dcp(path):
        return path
    found = states_in_dir(path)
    if not found:
        raise UserError(f"{path}: no optimizer state here (looked for optimizer.pt, optimizer.bin and a "
                        "torch.distributed.checkpoint directory)")
    if len(found) > 1:
        raise UserError(f"{path}: holds {len(found)} optimizer states ({', '.join(p.name for p in found)}); name one of them")
    return found[0]


def states_in_dir(directory: str | Path) -> list[Path]:
    """Every optimizer state a checkpoint directory holds: optimizer[_N].pt/.bin, DCP folders."""
    directory = Path(directory)
    if _is_dcp(directory):
        return [directory]
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if (p.is_file() and _STATE_FILE.match(p.name)) or (p.is_dir() and _STATE_DIR.match(p.name) and _is_dcp(p)))


def find_in_dir(directory: str | Path) -> Path | None:
    """The one optimizer state inside a model or checkpoint directory, else None (none, or several)."""
    found = states_in_dir(directory)
    return found[0] if len(found) == 1 else None


def _is_dcp(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def _written_by_trainer(path: Path) -> bool:
    folder = path if path.is_dir() else path.parent
    return (folder / "trainer_state.json").is_file()


def _load_file(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"{path}: not a torch optimizer state ({type(exc).__name__}: {first})") from None


def _load_dcp(path: Path) -> Any:
    """The optimizer entries of a DCP checkpoint as one nested dict (model weights are not read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # what dcp_to_torch_save uses

    try:
        reader = FileSystemReader(str(path))
        meta = reader.read_metadata()
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path}: unreadable torch.distributed.checkpoint ({type(exc).__name__}: {exc})") from None
    planner_data = meta.planner_data or {}

    def optimizer_key(key: str) -> bool:
        parts = [str(p) for p in planner_data.get(key, (key,))]
        return any(p in ("state", "param_groups") or p.startswith(("state.", "param_groups.")) for p in parts)

    keys = {k for k in meta.state_dict_metadata if optimizer_key(k)}
    if not keys:
        raise UserError(f"{path}: this torch.distributed.checkpoint holds no optimizer state")
    sd: dict[str, Any] = {}
    # The public `load` fills only keys already present; this rebuilds the dict from the metadata.
    _load_state_dict(sd, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    return sd


def _find_state_dict(obj: Any, where: str) -> dict[str, Any]:
    """The {state, param_groups} dict in what was loaded, possibly nested or flattened."""
    found: list[dict[str, Any]] = []

    def walk(o: Any, depth: int) -> None:
        if not isinstance(o, Mapping) or depth > 4:
            return
        if "state" in o and "param_groups" in o:
            found.append(dict(o))
            return
        flat = _unflatten(o)
        if flat is not None:
            found.append(flat)
            return
        for v in o.values():
            walk(v, depth + 1)

    walk(obj, 0)
    if not found:
        raise UserError(f"{where}: not an optimizer state_dict (no 'state' and 'param_groups' inside)")
    if len(found) > 1:
        raise UserError(f"{where}: holds {len(found)} optimizer states; save or name just one")
    return found[0]


def _unflatten(d: Mapping[str, Any]) -> dict[str, Any] | None:
    """`flatten_optimizer_state_dict` form ('state.<fqn>.<key>', 'param_groups.<fqn>.<hp>') → nested.

    State keys and hyperparameter names hold no dots, so the last dot splits name from key. Groups
    are rebuilt from parameters that share every hyperparameter, in first-seen order.
    """
    if not d or not all(isinstance(k, str) and k.startswith(("state.", "param_groups.")) for k in d):
        return None
    state: dict[str, dict[str, Any]] = {}
    hyper: dict[str, dict[str, Any]] = {}
    for key, value in d.items():
        head, rest = key.split(".", 1)
        name, leaf = rest.rsplit(".", 1)
        (state if head == "state" else hyper).setdefault(name, {})[leaf] = value
    groups: list[dict[str, Any]] = []
    for name, hp in hyper.items():
        hp = {k: v for k, v in hp.items() if k not in ("params", "param_names")}
        group = next((g for g in groups if {k: v for k, v in g.items() if k != "params"} == hp), None)
        if group is None:
            group = {**hp, "params": []}
            groups.append(group)
        group["params"].append(name)
    for name in state:
        if name not in hyper:
            raise UserError(f"flattened optimizer state names '{name}' in 'state' but not in 'param_groups'")
    return {"state": state, "param_groups": groups}


# --- mapping ------------------------------------------------------------------------------------


def read(path: str | Path, model: nn.Module) -> OptimizerState:
    """Locate, load and map the optimizer state at `path` onto `model`; every check done here."""
    where = locate(path)
    raw = _load_dcp(where) if _is_dcp(where) else _load_file(where)
    sd = _find_state_dict(raw, str(where))
    return from_state_dict(sd, model, source=str(Path(path).resolve()), files=[str(where.resolve())],
                           trainer_hint=_written_by_trainer(where))


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
    names_given = _names_given(groups_in, keyed, source)
    if names_given is not None:
        mapping = "names"
        assign = dict(zip(flat_keys, _canonical_names(names_given, model, source, state_in, flat_keys)))
        for key, name in assign.items():
            problem = _shape_problem(state_in.get(key), shapes[name])
            if problem:
                raise UserError(f"{source}: optimizer state for '{name}' has {problem[0]} of shape {_fmt(problem[1])}; "
                                f"the parameter is {_fmt(shapes[name])}")
    else:
        mapping, order = _choose_order(keyed, state_in, model, shapes, source, trainer_hint)
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


def _names_given(groups: list[Mapping[str, Any]], keyed: list[list[Any]], source: str) -> list[str] | None:
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


def _canonical_names(given: list[str], model: nn.Module, source: str, state: Mapping, keys: list) -> list[str]:
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
                            f"{' ' + _fmt(shape) if shape else ''}, which this model does not have")
        out.append(alias[clean])
    seen: set[str] = set()
    for name, canon in zip(given, out):
        if canon in seen:
            raise UserError(f"{source}: optimizer state lists parameter '{canon}' twice (as '{name}')")
        seen.add(canon)
    return out


def _choose_order(keyed: list[list[Any]], state: Mapping, model: nn.Module, shapes: dict[str, tuple[int, ...]],
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
        raise UserError(f"{source}: ambiguous optimizer state: entry {flat[i]} is '{o1[i]}' {_fmt(shapes[o1[i]])} by {m1} "
                        f"but '{o2[i]}' {_fmt(shapes[o2[i]])} by {m2}; save the optimizer with named parameters")
    return fits[0]


def _order_problem(flat: list[Any], order: list[str], state: Mapping, shapes: dict[str, tuple[int, ...]],
                   method: str, source: str) -> str | None:
    """Why the state does not fit `order` (count, then the first shape mismatch), or None."""
    if len(flat) != len(order):
        return (f"{source}: optimizer state lists {len(flat)} parameters, the model has {len(order)} "
                f"({method}); the state does not belong to this model")
    for key, name in zip(flat, order):
        problem = _shape_problem(state.get(key), shapes[name])
        if problem:
            return (f"{source}: optimizer state entry {key} (mapped by {method} to '{name}') has {problem[0]} of shape "
                    f"{_fmt(problem[1])}; the parameter is {_fmt(shapes[name])}")
    return None


def _expected_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
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


def _shape_problem(st: Mapping[str, Any] | None, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]] | None:
    """(key, its shape) of the first known tensor that does not fit a parameter of `shape`."""
    if not st:
        return None
    for key, value in st.items():
        if not torch.is_tensor(value) or value.dim() == 0 or value.numel() == 0:
            continue
        want = _expected_shape(key, shape)
        if want is not None and tuple(value.shape) != want:
            return key, tuple(value.shape)
    return None


# --- Trainer's groups ---------------------------------------------------------------------------


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


def _first_shape(st: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    for v in (st or {}).values():
        if torch.is_tensor(v) and v.dim() > 0:
            return tuple(v.shape)
    return None


def _fmt(shape: Iterable[int] | None) -> str:
    return "[" + ", ".join(str(int(s)) for s in (shape or ())) + "]"
