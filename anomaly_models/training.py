"""Pieces every trainable method shares: device choice, seeding, and the epoch loop.

A method supplies `step(batch) -> loss` (and optionally extra per-batch statistics); this loop
does the rest the same way for all: optimiser steps with optional CUDA mixed precision, a tqdm
bar, validation loss on normal held-out images, one history dict per epoch, and a stop with the
epoch and batch named when the loss turns NaN.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomaly_models.errors import ConfigError

log = logging.getLogger(__name__)

StepFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and batch."""


def resolve_device(spec: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is a config error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    if spec not in ("cpu", "cuda"):
        raise ConfigError(f"train.device: {spec!r} is not allowed (allowed: auto, cpu, cuda)")
    return torch.device(spec)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a generator for data loader shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device, enabled: bool):
    """float16 autocast on CUDA when enabled; a no-op on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def run_epochs(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: StepFn,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    epochs: int,
    device: torch.device,
    mixed_precision: bool = False,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    start_epoch: int = 0,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train `module` for epochs [start_epoch, epochs); `step` maps an image batch to a loss."""
    use_amp = mixed_precision and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history = []
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        module.train()
        totals: dict[str, float] = {}
        count = 0
        bar = tqdm(train_loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, disable=None)
        for batch_index, batch in enumerate(bar):
            images = batch.image.to(device, non_blocking=True)
            with autocast(device, use_amp):
                loss, stats = step(images)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()} at epoch {epoch + 1}, batch {batch_index + 1}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n = images.shape[0]
            count += n
            for key, value in {"loss": loss.item(), **stats}.items():
                totals[key] = totals.get(key, 0.0) + value * n
            bar.set_postfix(loss=f"{totals['loss'] / count:.4f}")
        if scheduler is not None:
            scheduler.step()
        record = {"epoch": epoch + 1, **{f"train_{k}": v / max(count, 1) for k, v in totals.items()}}
        if val_loader is not None and len(val_loader.dataset) > 0:
            record["val_loss"] = evaluate_loss(module, step, val_loader, device)
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        log.info(
            "%s epoch %d/%d: %s", desc, epoch + 1, epochs,
            ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"),
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    return history


@torch.no_grad()
def evaluate_loss(module: torch.nn.Module, step: StepFn, loader: DataLoader, device: torch.device) -> float:
    """Mean loss over a loader in eval mode (validation on held-out normal images)."""
    module.eval()
    total, count = 0.0, 0
    for batch in loader:
        images = batch.image.to(device)
        loss, _ = step(images)
        total += loss.item() * images.shape[0]
        count += images.shape[0]
    return total / max(count, 1) if count else math.nan
