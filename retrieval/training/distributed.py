"""One process or many under torchrun: the process group, each rank's device and share of a batch, DDP.

Under torchrun (WORLD_SIZE > 1) every rank takes an equal slice of each global batch, scores it
against all ranks' rows (`losses.gather_with_grad`, so the loss covers the global batch) and
DistributedDataParallel averages the gradients. Each rank's gradient holds only the part that
flows through its own rows, so the backward pass scales the loss by the world size: the average
becomes the sum, the gradient of the whole batch, and an update equals one process's on the
whole batch. The temperature's gradient is already complete on every rank and is divided back.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from retrieval import runtime


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place: rank, world size, the device it trains on."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0

    def local(self, n: int) -> slice:
        """This rank's equal slice of a global batch of `n` (all_gather needs equal sizes)."""
        per_rank = n // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def init_distributed(device: str | torch.device | None = None) -> Ranks:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl on GPUs, gloo on CPUs); else one process.

    The device: `device` when given; under torchrun the GPU of LOCAL_RANK (or the CPU);
    otherwise `runtime.default_device()`. Ranks other than 0 log only warnings and errors, so a
    run's progress reads once.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(0, 1, torch.device(device) if device else runtime.default_device())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if device:
        chosen = torch.device(device)
    elif torch.cuda.is_available():
        chosen = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    else:
        chosen = torch.device("cpu")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if dist.get_rank() != 0:
        logging.getLogger("retrieval.training").setLevel(logging.WARNING)
    return Ranks(dist.get_rank(), dist.get_world_size(), chosen)


def wrap(module: torch.nn.Module, ranks: Ranks, find_unused: bool = False) -> torch.nn.Module:
    """`module` under DistributedDataParallel when there are several ranks, else itself."""
    if ranks.world == 1:
        return module
    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def backward(value: torch.Tensor, ranks: Ranks, logit_scale: torch.nn.Parameter) -> None:
    """Backpropagate the global-batch loss so that DDP's average of the ranks' gradients is their sum."""
    (value * ranks.world).backward()
    if ranks.world > 1 and logit_scale.grad is not None:
        logit_scale.grad /= ranks.world
