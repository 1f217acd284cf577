"""Data-parallel training with torch.distributed, started by torchrun or by `--nproc`.

Each process trains on its slice of every global batch; DistributedDataParallel
averages the gradients. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous; a single process without them is simply world size 1. The backend
is NCCL when there is a GPU, else Gloo (CPU). Multi-node runs use torchrun's
usual rendezvous options (--nnodes, --rdzv-endpoint, ...).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from petal.params import Int, check_param


@dataclass(frozen=True)
class World:
    rank: int  # this process, 0..size-1; rank 0 writes checkpoints, logs and the model
    size: int
    local_rank: int  # this process on its machine: picks the GPU, and who decodes images
    local_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """The sums over all processes of a few numbers (epoch statistics)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def init_world() -> World:
    """Join the process group torchrun described in the environment (or be alone)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size, local_rank, local_size, device)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m petal ARGV` in `nproc` processes on this machine through torchrun.

    `argv` is the command line of this process; its --nproc option is removed, so
    the workers do not launch again. Returns torchrun's exit code.
    """
    check_param("nproc", nproc, Int(1))
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    # torchrun would set 1 thread per process; on a CPU give each its share of the cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "petal", *args]
    return subprocess.call(cmd, env=env)
