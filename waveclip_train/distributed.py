"""Data-parallel training under torchrun: the process group, this process's place in it, and the sampler.

Under torchrun each process takes its shard of every global batch (`ResumableSampler`, a seeded
DistributedSampler) and DistributedDataParallel averages the gradients (gloo on the CPU, NCCL on the
GPU). Launched without torchrun (WORLD_SIZE unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclasses.dataclass
class Dist:
    """This process's rank among `world` processes; rank 0 writes files and prints."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # the rank on this machine: which GPU to use

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, x: Tensor) -> Tensor:
        """Average a tensor over the processes."""
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x

    def say(self, *message) -> None:
        """Print on the main process only."""
        if self.main:
            print(*message, flush=True)


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1).

    Returns:
        This process's place, and its device (on CUDA, the GPU of its local rank).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(), device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", rank.local_rank)
        torch.cuda.set_device(device)
    return rank, device


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, rank: Dist, device: torch.device) -> nn.Module:
    """The module the training step calls: DistributedDataParallel over `model` with several processes."""
    if rank.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (seeded shuffle, no padding) that can start part-way through an epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` indices of this process's share of the epoch."""
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start
