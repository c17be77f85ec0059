"""Running a command under `torchrun --nproc_per_node N`: every rank takes its share, rank 0 merges."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> list[int]:
        """Indices of the inputs this rank takes: every size-th one, starting at its rank."""
        return list(range(self.rank, count, self.size))


def world_from_env() -> World:
    """This process's place among torchrun's processes (rank 0 of 1 when not under torchrun)."""
    return World(
        rank=int(os.environ.get("RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(world: World, device: str) -> str:
    """Join the process group when there are several ranks (gloo on the CPU, NCCL on CUDA); returns the
    device this rank runs on (cuda:LOCAL_RANK for cuda)."""
    import torch
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    if cuda and world.size > 1:
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def gather_all(world: World, value):
    """Every rank's value, in rank order, on every rank (a one-element list without torchrun)."""
    import torch.distributed as dist

    if world.size == 1:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def finish(world: World) -> None:
    import torch.distributed as dist

    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
