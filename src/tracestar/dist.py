"""torch.distributed, when launched by `torchrun`; a world of one otherwise (the same code path)."""

from __future__ import annotations

import os

import torch
import torch.distributed as td


def init_from_env(device: str = "cpu") -> None:
    """Join the process group that torchrun describes (gloo on CPU, NCCL on GPU)."""
    if td.is_available() and not td.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        td.init_process_group(backend=backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def active() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if active() else 0


def world() -> int:
    return td.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        td.barrier()


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum in place across ranks (on the CPU tensors the statistics live in)."""
    if active():
        if td.get_backend() == "nccl":
            moved = tensor.cuda()
            td.all_reduce(moved, op=td.ReduceOp.SUM)
            tensor.copy_(moved.cpu())
        else:
            td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def broadcast_object(obj):
    if not active():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]
