"""torchrun data-parallel setup: NCCL on CUDA, gloo on CPU; a plain single process when not under torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank among ``world_size`` processes and its torch device."""

    rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # processes of this run on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; otherwise the named device (error if CUDA is asked but absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from nnunet_ape.errors import InputError

        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def setup(device_name: str) -> Runtime:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1); returns this process's Runtime."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return Runtime(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world_size, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def mean_across_ranks(values: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """Average logged scalars over ranks (identity in a single process)."""
    if runtime.world_size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t)
    return {k: float(v) / runtime.world_size for k, v in zip(keys, t.tolist())}


def broadcast_float(value: float, runtime: Runtime) -> float:
    """Rank 0's ``value`` on every rank (identity in a single process)."""
    if runtime.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    dist.broadcast(t, src=0)
    return float(t.item())


def all_ranks_true(flag: bool, runtime: Runtime) -> bool:
    """True only when ``flag`` is True on every rank."""
    if runtime.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier(runtime: Runtime) -> None:
    """Wait for all ranks (no-op in a single process)."""
    if runtime.world_size > 1:
        dist.barrier()


def teardown(runtime: Runtime) -> None:
    """Destroy the process group if this process created one."""
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
