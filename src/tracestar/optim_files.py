"""Where an optimizer state lies and how one process loads it.

A state can be a file (`optimizer.pt` from HF `Trainer`, `optimizer.bin` from accelerate's
`save_state`, any `torch.save`d state_dict, also one nested in a dict such as
``{"model": ..., "optimizer": ...}``), a directory holding one of those (a Trainer
`checkpoint-N/`, an accelerate state directory), or a `torch.distributed.checkpoint` directory
(`.metadata` + `*.distcp`, as FSDP2 training writes it), read by this one process with only its
optimizer entries materialized. What the state means is `optim_state.py`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from tracestar.errors import UserError

#: Files and folders that hold an optimizer state inside a checkpoint directory.
_STATE_FILE = re.compile(r"^optimizer(_\d+)?\.(pt|bin|pth)$")


_STATE_DIR = re.compile(r"^optimizer(_\d+)?$")


def locate(path: str | Path) -> Path:
    """The file or DCP directory that holds the optimizer state `path` names; UserError if none or several."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: optimizer state not found")
    if path.is_file() or is_dcp(path):
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
    if is_dcp(directory):
        return [directory]
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if (p.is_file() and _STATE_FILE.match(p.name)) or (p.is_dir() and _STATE_DIR.match(p.name) and is_dcp(p)))


def find_in_dir(directory: str | Path) -> Path | None:
    """The one optimizer state inside a model or checkpoint directory, else None (none, or several)."""
    found = states_in_dir(directory)
    return found[0] if len(found) == 1 else None


def is_dcp(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def written_by_trainer(path: Path) -> bool:
    folder = path if path.is_dir() else path.parent
    return (folder / "trainer_state.json").is_file()


def load_file(path: Path) -> Any:
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


def load_dcp(path: Path) -> Any:
    """The optimizer entries of a DCP checkpoint as one nested dict (model weights are not read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import (
        _load_state_dict,  # what dcp_to_torch_save uses
    )

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


def find_state_dict(obj: Any, where: str) -> dict[str, Any]:
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
