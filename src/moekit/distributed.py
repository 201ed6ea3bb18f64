"""Data-parallel runs under ``torchrun``: the process group, this process's rank and device.

``torchrun --nproc-per-node N -m moekit profile ...`` starts N copies of the command with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set. Each copy reads the same data, runs every N-th
sequence, and the accumulators are all-reduced (they are sums and maxima), so every rank ends with
the profile of all the data; rank 0 alone writes it. NCCL on GPUs, gloo on CPUs; several nodes work
the same way (``--nnodes``, ``--rdzv-endpoint``), since only the process group is involved.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from moekit.errors import UserError


@dataclass(frozen=True)
class Rank:
    """Where this process stands in a data-parallel run (rank 0 of 1 when not launched by torchrun)."""

    rank: int
    world: int
    device: str

    @property
    def writes(self) -> bool:
        """Whether this process writes the outputs (only rank 0 does)."""
        return self.rank == 0


def world_size() -> int:
    """The number of processes torchrun started (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def data_parallel(device: str) -> Iterator[Rank]:
    """Join torchrun's process group if this process was launched by torchrun (and leave it afterwards);
    yield this process's rank and the device it computes on (``cuda`` means the local rank's GPU)."""
    world = world_size()
    if world == 1:
        yield Rank(0, 1, device)
        return
    import torch
    import torch.distributed as dist

    if device == "auto":
        raise UserError("--device auto spreads one model over this host's GPUs; under torchrun every process holds "
                        "its own copy: use --device cuda (each rank takes its local GPU) or --device cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield Rank(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if created:
            dist.destroy_process_group()
