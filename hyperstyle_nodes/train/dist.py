"""One process or many: torchrun's environment -> process group, device, and the few collectives the loop needs.

`torchrun --nproc_per_node=N python -m hyperstyle_nodes.train ...` runs data-parallel (NCCL on GPUs, gloo on CPU);
without torchrun the same code runs as one process and every collective is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .models import SetupError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    requested = requested.lower()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SetupError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        if ":" in requested:
            return torch.device(requested)
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested != "cpu":
        raise SetupError(f"--device must be auto, cpu, cuda or cuda:N, not {requested!r}")
    return torch.device("cpu")


def setup(device: str = "auto") -> DistInfo:
    """Join torchrun's process group if there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    if info.distributed:
        values = values.to(info.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(info: DistInfo, flag: bool) -> bool:
    """True on every process if `flag` is true on any (all processes stop at the same step)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(info: DistInfo, obj) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
