"""Pieces every trainable method shares: device choice, seeding, and the epoch loop.

A method supplies `step(batch) -> loss` (and optionally extra per-batch statistics); this loop
does the rest the same way for all: optimiser steps with optional CUDA mixed precision, a tqdm
bar, validation loss on normal held-out images, one history dict per epoch, and a stop with the
epoch and batch named when the loss turns NaN. Under torchrun the same loop trains with
DistributedDataParallel (anomaly_models/distributed.py): losses are summed over the processes, so
the history is the one a single process would record, and only rank 0 writes the checkpoint.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from anomaly_models.distributed import data_parallel, is_main_process, sum_over_processes
from anomaly_models.errors import CheckpointError, ConfigError
from anomaly_models.files import atomic_torch_save, read_torch_file

log = logging.getLogger(__name__)

RESTART_HINT = "; delete it, or train with --no-resume to start from scratch"
StepFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


def batch_images(batch: Any, device: torch.device) -> torch.Tensor:
    """What `step` receives unless told otherwise: the batch's images on `device`."""
    return batch.image.to(device, non_blocking=True)


class EpochCheckpoint:
    """Training state written after every epoch, so a killed run resumes where it stopped.

    The file carries a fingerprint of everything that defines the run (method config, training
    config, preprocessing, data); a file with another fingerprint is ignored, never resumed from.
    """

    def __init__(self, path: str | Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def restore(self, modules: dict[str, Any]) -> tuple[int, list[dict]]:
        """Load saved states into `modules` (name -> object with load_state_dict); (next epoch, history)."""
        if not self.path.is_file():
            return 0, []
        state = read_torch_file(self.path, "partial checkpoint", damaged_hint=RESTART_HINT)
        if not isinstance(state, dict) or not {"fingerprint", "epoch", "history", "modules"} <= set(state):
            raise CheckpointError(f"{self.path} is not a partial checkpoint of this project{RESTART_HINT}")
        if state["fingerprint"] != self.fingerprint:
            log.info("ignoring %s: it belongs to a run with other settings", self.path)
            return 0, []
        try:
            for name, module in modules.items():
                if module is not None:
                    module.load_state_dict(state["modules"][name])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:  # torch's mismatch errors
            raise CheckpointError(f"cannot resume from {self.path}: its saved state does not fit "
                                  f"({type(error).__name__}){RESTART_HINT}") from None
        log.info("resuming from %s after epoch %d", self.path, state["epoch"])
        return state["epoch"], list(state["history"])

    def save(self, epoch: int, modules: dict[str, Any], history: list[dict]) -> None:
        states = {name: m.state_dict() for name, m in modules.items() if m is not None}
        payload = {"fingerprint": self.fingerprint, "epoch": epoch, "history": history, "modules": states}
        atomic_torch_save(payload, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and batch."""


def resolve_device(spec: str, key: str = "train.device") -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is a config error (naming `key`)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: 'cuda' requested but no CUDA device is available")
    if spec not in ("cpu", "cuda"):
        raise ConfigError(f"{key}: {spec!r} is not allowed (allowed: auto, cpu, cuda)")
    return torch.device(spec)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a generator for data loader shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def seeded(seed: int):
    """Run a block (e.g. building a network) under `seed` without touching the global RNG state,
    so the same config always gives the same initial weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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
    checkpoint: EpochCheckpoint | None = None,
    desc: str = "train",
    step_input: Callable[[Any, torch.device], Any] = batch_images,
) -> list[dict[str, float]]:
    """Train `module` for `epochs` epochs; `step` maps an image batch to (loss, extra stats).

    `step_input` picks what `step` gets from each batch (default: the images; a supervised
    step may take (images, labels)).

    With a `checkpoint`, the state after each epoch is saved and an interrupted run resumes
    from it; the returned history then covers all epochs, the resumed ones included.
    """
    use_amp = mixed_precision and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    tracked = {"module": module, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    # Restored tensors land on the devices of the existing parameters (torch's load_state_dict).
    start_epoch, history = checkpoint.restore(tracked) if checkpoint else (0, [])
    train_step = data_parallel(module, step)  # after the restore: DDP copies rank 0's weights to all
    sampler = getattr(train_loader, "sampler", None)
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)  # a new order each epoch, the same on every process
        module.train()
        totals: dict[str, float] = {}
        count = 0
        bar = tqdm(train_loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False,
                   disable=None if is_main_process() else True)
        for batch_index, batch in enumerate(bar):
            inputs = step_input(batch, device)
            with autocast(device, use_amp):
                loss, stats = train_step(inputs)
            n = len(batch.image)
            values = {"loss": loss.item(), **stats}
            # Summed over the processes' shares of the batch: every process sees the global batch.
            n, *sums = sum_over_processes([n, *(v * n for v in values.values())])
            if not math.isfinite(sums[0]):
                raise TrainingDiverged(
                    f"loss is {sums[0] / n} at epoch {epoch + 1}, batch {batch_index + 1}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            count += n
            for key, total in zip(values, sums):
                totals[key] = totals.get(key, 0.0) + total
            bar.set_postfix(loss=f"{totals['loss'] / count:.4f}")
        if scheduler is not None:
            scheduler.step()
        record = {"epoch": epoch + 1, **{f"train_{k}": v / max(count, 1) for k, v in totals.items()}}
        if val_loader is not None and len(val_loader.dataset) > 0:
            record["val_loss"] = evaluate_loss(module, step, val_loader, device, step_input)
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        log.info(
            "%s epoch %d/%d: %s", desc, epoch + 1, epochs,
            ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"),
        )
        if on_epoch_end is not None:  # may add to `record`; runs before it is checkpointed
            on_epoch_end(epoch, record)
        if checkpoint is not None and is_main_process():
            checkpoint.save(epoch + 1, tracked, history)
    return history



@torch.no_grad()
def evaluate_loss(
    module: torch.nn.Module, step: StepFn, loader: DataLoader, device: torch.device,
    step_input: Callable[[Any, torch.device], Any] = batch_images,
) -> float:
    """Mean loss over a loader in eval mode (validation on held-out normal images)."""
    module.eval()
    total, count = 0.0, 0
    for batch in loader:
        loss, _ = step(step_input(batch, device))
        total += loss.item() * len(batch.image)
        count += len(batch.image)
    return total / count if count else math.nan
