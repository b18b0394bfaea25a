"""How many processes may run models on one GPU together: each holds its own CUDA context (about 0.5 GB), its own
models and one case's temporaries, so more processes than fit run out of GPU memory, and more than 2 do not make
the GPU faster."""

from __future__ import annotations

import subprocess
import sys

# one process's GPU memory for a 512x512x300 CT: CUDA context, APE and BPR models, the CT as network input before it
# is resampled to the model's spacing, the sliding-window batches and the map on the model's grid (an estimate with
# headroom: not measured on a GPU yet)
GPU_BYTES_PER_PROCESS = 4 << 30
MOST_GPU_PROCESSES = 2  # one process's network passes keep a GPU busy; a second overlaps its CPU-side steps


def gpu_processes(requested: int, free_bytes: int | None, per_process: int = GPU_BYTES_PER_PROCESS,
                  most: int = MOST_GPU_PROCESSES) -> int:
    """How many of ``requested`` processes may share a GPU with ``free_bytes`` of free memory (None: unknown), each
    needing about ``per_process`` bytes: at most ``most``, at least 1."""
    fit = most if free_bytes is None else free_bytes // max(per_process, 1)
    return int(max(1, min(requested, most, fit)))


def free_gpu_memory(device: str, timeout_s: float = 120.0) -> int | None:
    """Free memory in bytes of the CUDA ``device`` (``cuda`` or ``cuda:N``), or None where it cannot be read. Read in
    a short-lived child process: in this one a CUDA context (about 0.5 GB of the GPU) would stay for the whole run."""
    code = f"import torch; print(torch.cuda.mem_get_info(torch.device({device!r}))[0])"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, check=True)
        return int(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None
