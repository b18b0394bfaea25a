"""The pretraining loop shared by APE and BPR: CPU/CUDA, mixed precision, torchrun DDP, background data
workers, progress bar, CSV log and loss plot, atomic checkpoints and ``--resume``."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from nnunet_ape import distributed
from nnunet_ape.checkpoint import load_checkpoint, save_atomic, unwrap
from nnunet_ape.errors import InputError
from nnunet_ape.models.ape import count_parameters
from nnunet_ape.pretrain.cache import CachedCT, prepare_cache
from nnunet_ape.threads import threads_per_process
from nnunet_ape.training_log import CsvLog, plot_loss_curve

LAST = "checkpoint_last.pt"
FINAL = "checkpoint_final.pt"
CONFIG = "config.json"  # the settings a run started with; --resume checks them


@dataclass
class LoopConfig:
    """Settings of any pretraining loop (APE, BPR); paper defaults (DESIGN section 2)."""

    iterations: int = 150_000
    lr: float = 3e-4
    lr_schedule: str = "constant"
    weight_decay: float = 1e-6
    grad_clip: float = 1.0
    device: str = "auto"
    amp: bool = True
    workers: int = 4
    threads: int | None = None  # torch threads of the training process: None = cores left after the workers; 0 = torch's own
    checkpoint_every: int = 1000
    max_minutes: float | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class Task:
    """What a loop trains: how to build the model (fresh, or from a checkpoint's ``model_config``), the stream of
    batches, the loss of a batch, and what the checkpoint records."""

    name: str
    format: str
    log_columns: list[str]
    build_model: Callable[[dict | None], nn.Module]
    model_config: Callable[[nn.Module], dict]
    stream: Callable[[list[CachedCT], int, int], IterableDataset]
    # runs the forward under autocast(device, cfg.amp) and computes the loss itself in float32
    loss: Callable[[nn.Module, dict, torch.device], tuple[torch.Tensor, dict[str, float]]]
    extra_state: dict = field(default_factory=dict)


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(cfg: LoopConfig, iteration: int, minutes: float = 0.0) -> float:
    """Learning rate for the step after ``iteration`` steps and ``minutes`` of this invocation: constant (the
    paper), or cosine decay to 0 over the run's budget, whichever of ``iterations`` and ``max_minutes`` ends it
    first (for short runs, where the last iterations then settle instead of jumping around)."""
    if cfg.lr_schedule != "cosine":
        return cfg.lr
    progress = iteration / max(cfg.iterations, 1)
    if cfg.max_minutes:
        progress = max(progress, minutes / cfg.max_minutes)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA (bf16 where supported, else fp16); nothing on CPU."""
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _minutes_left(budget_minutes: float, elapsed_seconds: float) -> str:
    left = max(0.0, 60 * budget_minutes - elapsed_seconds)
    return f"{int(left // 60)}:{int(left % 60):02d}"


def _checkpoint_state(task: Task, model, optimizer, scaler, iteration: int, cfg: LoopConfig) -> dict:
    return {
        "format": task.format,
        "model_config": task.model_config(unwrap(model)),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "iteration": iteration,
        "train_config": cfg.to_dict(),
        **task.extra_state,
    }


MAX_SKIPPED_STEPS = 20


def _optimizer_step(loss: torch.Tensor | None, model, optimizer, scaler, lr: float, grad_clip: float) -> bool:
    """One AdamW step at ``lr`` with gradient clipping (and loss scaling for fp16); ``loss`` None (not finite on
    some rank) skips the step and returns False."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    if loss is None:
        return False
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return True


def check_output_folder(out_dir: Path, resume: bool) -> None:
    """Refuse to overwrite an earlier run unless resuming; refuse to resume a run that is not there."""
    has_run = (out_dir / LAST).exists()
    if resume and not has_run:
        raise InputError(f"{out_dir}: no {LAST} to resume from; drop --resume to start a new run")
    if not resume and has_run:
        raise InputError(f"{out_dir}: already holds a pretraining run; pass --resume to continue it or choose a new folder")


# settings a resumed run may change: how long and where it runs, not what it learns from
RESUMABLE_SETTINGS = frozenset({"iterations", "max_minutes", "device", "amp", "workers", "threads", "checkpoint_every"})


def _flatten(settings: dict, prefix: str = "") -> dict:
    """Nested settings -> ``{"batch.points": ..., ...}``."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumed_settings(out_dir: Path, cfg: LoopConfig) -> None:
    """Refuse to resume the run in ``out_dir`` with settings other than those it started with (its ``config.json``),
    outside :data:`RESUMABLE_SETTINGS`: a run that changed its batches or schedule halfway is neither recipe."""
    saved = out_dir / CONFIG
    if not saved.exists():  # runs from before config.json
        return
    before, now = _flatten(json.loads(saved.read_text())), _flatten(cfg.to_dict())
    # a setting the run's config.json lacks came with a later version, whose default is what the run did
    changed = [f"{key} {before[key]} -> {now[key]}" for key in sorted(set(before) & set(now))
               if key.split(".")[0] not in RESUMABLE_SETTINGS and before[key] != now[key]]
    if changed:
        raise InputError(f"{out_dir}: --resume with other settings than the run started with ({'; '.join(changed)}); "
                         "pass the run's own flags (see its config.json) or start a new run in a new folder")


def run_training(task: Task, images: list[Path], out_dir: Path, cfg: LoopConfig, resume: bool = False) -> Path:
    """Train ``task`` on ``images``; returns the final checkpoint path.

    Writes into ``out_dir``: ``cache/`` (canonical foreground-cropped CTs), ``log.csv``, ``loss.png``,
    ``checkpoint_last.pt`` every ``checkpoint_every`` iterations and ``checkpoint_final.pt`` at the end.
    Launched by torchrun it trains data-parallel; rank 0 writes the files.
    """
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise InputError(f"--lr-schedule {cfg.lr_schedule}: unknown; choose one of {', '.join(LR_SCHEDULES)}")
    out_dir = Path(out_dir)
    runtime = distributed.setup(cfg.device)
    threads = torch.get_num_threads()
    try:
        return _train(task, images, out_dir, cfg, resume, runtime)
    finally:
        torch.set_num_threads(threads)  # a caller (the demo, a test session) goes on with its own setting
        distributed.teardown(runtime)


def _train(task: Task, images: list[Path], out_dir: Path, cfg: LoopConfig, resume: bool, runtime: distributed.Runtime) -> Path:
    check_output_folder(out_dir, resume)
    if resume:
        check_resumed_settings(out_dir, cfg)
    if runtime.is_main:
        cached = prepare_cache(images, out_dir / "cache")
    distributed.barrier(runtime)
    if not runtime.is_main:
        cached = prepare_cache(images, out_dir / "cache")  # all entries exist now: only reads metadata
    device = runtime.device
    if cfg.threads != 0:
        torch.set_num_threads(cfg.threads or threads_per_process(runtime.local_world_size, workers=cfg.workers))
    torch.manual_seed(cfg.seed + runtime.rank)
    state = load_checkpoint(out_dir / LAST, task.format) if resume else None
    # a resumed run keeps the architecture it was started with
    model = task.build_model(state["model_config"] if state else None).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    start = 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
    if runtime.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    log = CsvLog(out_dir / "log.csv", task.log_columns)
    if runtime.is_main:
        log.truncate(start)
        (out_dir / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))
    # a resumed run draws new batches instead of replaying the first ones
    stream = task.stream(cached, cfg.seed * 1_000_003 + start, runtime.rank)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        prefetch_factor=2 if cfg.workers > 0 else None,
    )
    if runtime.is_main:
        print(
            f"{task.name} pretraining: {len(cached)} CTs, model {task.model_config(unwrap(model))} ({count_parameters(model):,} "
            f"parameters), device {device}, {runtime.world_size} process(es), {torch.get_num_threads()} torch thread(s) + "
            f"{cfg.workers} data worker(s), iterations {start}->{cfg.iterations}"
        )
    progress = tqdm(total=cfg.iterations, initial=start, desc=f"pretrain {task.name.lower()}", disable=not runtime.is_main, dynamic_ncols=True)
    began = time.monotonic()
    iteration, skipped = start, 0
    model.train()
    batches = iter(loader)
    while iteration < cfg.iterations:
        batch = next(batches)
        loss, parts = task.loss(model, batch, device)
        lr = learning_rate(cfg, iteration, (time.monotonic() - began) / 60)
        if runtime.world_size > 1 and cfg.max_minutes:  # clocks differ: every rank takes rank 0's rate
            lr = distributed.broadcast_float(lr, runtime)
        finite = distributed.all_ranks_true(bool(torch.isfinite(loss)), runtime)  # ranks skip together or not at all
        skipped += not _optimizer_step(loss if finite else None, model, optimizer, scaler, lr, cfg.grad_clip)
        if skipped > MAX_SKIPPED_STEPS:
            raise RuntimeError(
                f"loss was not finite in {skipped} steps; lower --lr, or pass --no-amp if this happens with mixed precision"
            )
        iteration += 1
        parts = distributed.mean_across_ranks(parts, runtime)
        out_of_time = cfg.max_minutes is not None and time.monotonic() - began > 60 * cfg.max_minutes
        if runtime.world_size > 1:  # every rank must stop at the same iteration
            flag = torch.tensor([float(out_of_time)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if runtime.is_main:
            log.append({"iteration": iteration, **parts, "lr": lr, "seconds": round(time.monotonic() - began, 3)})
            progress.update(1)
            postfix = {"loss": f"{parts['loss']:.4f}"}
            if cfg.max_minutes is not None:  # the run may end by the clock before the bar is full
                postfix["time left"] = _minutes_left(cfg.max_minutes, time.monotonic() - began)
            progress.set_postfix(postfix)
            if iteration % cfg.checkpoint_every == 0 or iteration == cfg.iterations or out_of_time:
                save_atomic(_checkpoint_state(task, model, optimizer, scaler, iteration, cfg), out_dir / LAST)
                plot_loss_curve(log, out_dir / "loss.png", title=f"{task.name} pretraining")
        if out_of_time:
            break
    progress.close()
    if runtime.is_main and iteration < cfg.iterations:
        print(f"{task.name} pretraining: --max-minutes {cfg.max_minutes:g} ended the run after {iteration} of "
              f"{cfg.iterations} iterations; --resume continues it", file=sys.stderr)
    final = out_dir / FINAL
    if runtime.is_main:
        state = _checkpoint_state(task, model, optimizer, scaler, iteration, cfg)
        del state["optimizer"], state["scaler"]
        save_atomic(state, final)
        plot_loss_curve(log, out_dir / "loss.png", title=f"{task.name} pretraining")
    distributed.barrier(runtime)
    return final
