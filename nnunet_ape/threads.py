"""How many torch threads a CPU process should run, so that processes sharing the cores do not oversubscribe them."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a SLURM or taskset allocation, not the machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_process(processes: int = 1, workers: int = 0) -> int:
    """Torch intra-op threads for each of ``processes`` processes sharing this process's cores, less ``workers``
    single-threaded helpers each process runs beside it (data-loading workers, as torch's DataLoader sets them);
    at least 1. Torch's own default, one thread per core, oversubscribes the cores as soon as the others are busy,
    and its OpenMP threads then wait on each other for whole scheduler slices."""
    return max(1, available_cores() // max(processes, 1) - workers)
