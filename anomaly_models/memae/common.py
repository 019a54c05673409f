"""What the image and the video MemAE share: memory options and the training loop around run_epochs.

Loss = reconstruction MSE + entropy_weight * addressing entropy (paper Eq. 10, official code).
Every epoch's history also records the memory diagnostics (entropy, share of weights zeroed by the
shrinkage, slots used) and whether the memory collapsed, which is warned about as it happens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from anomaly_models.base import AnomalyModel
from anomaly_models.errors import ConfigError
from anomaly_models.memae.memory import (
    Addressing,
    addressing_entropy,
    detect_collapse,
    memory_statistics,
    slots_in_use,
)
from anomaly_models.training import TrainingDiverged, resolve_device, run_epochs, seed_everything


class MemoryCollapseWarning(UserWarning):
    """The memory addressing collapsed during training (see `detect_collapse`)."""


@dataclass(frozen=True)
class MemoryOptions:
    """Hyper-parameters of the memory and its loss; defaults of the paper and official code."""

    memory_size: int = 500  # N items (paper: 100 for MNIST, 500 for CIFAR-10, 2000 for video)
    shrink_threshold: float = 1.0  # lambda in units of 1/N (paper: 1 to 3; official video code: 5)
    addressing: Addressing = "dot"  # dot: official code; cosine: the paper's Eq. 5
    addressing_temperature: float = 1.0  # softmax(similarity / T); paper and official code: 1
    entropy_weight: float = 0.0002  # alpha of the entropy loss
    collapse_fraction: float = 0.95  # warn when this share of positions is empty or goes to one slot

    def __post_init__(self):
        lows = {"memory_size": 1, "shrink_threshold": 0, "entropy_weight": 0}
        for key, low in lows.items():
            value = getattr(self, key)
            if value < low:
                raise ConfigError(f"{key}: must be >= {low}, got {value}")
        if self.addressing_temperature <= 0:
            raise ConfigError(f"addressing_temperature: must be > 0, got {self.addressing_temperature}")
        if not 0 < self.collapse_fraction <= 1:
            raise ConfigError(f"collapse_fraction: must be in (0, 1], got {self.collapse_fraction}")

    @property
    def shrink_lambda(self) -> float:
        return self.shrink_threshold / self.memory_size


class MemoryNetwork(nn.Module):
    """A network whose `reconstruct` also returns the addressing weights (None without memory)."""

    def reconstruct(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(inputs)[0]


class MemAEModel(AnomalyModel):
    """Training shared by the MemAE variants; subclasses build `network` and the scorer."""

    network: MemoryNetwork

    def fit(self, train_loader: DataLoader, val_loader: DataLoader | None = None) -> list[dict]:
        t, c = self.train_config, self.config
        seed_everything(t.seed)
        device = resolve_device(t.device)
        self.network.to(device)
        optimizer = torch.optim.Adam(self.network.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        used = torch.zeros(c.memory_size, dtype=torch.bool, device=device)
        completed: list[dict] = []
        last_good: dict[str, torch.Tensor] | None = None  # first taken after a resumed run's restore

        def step(inputs: torch.Tensor):
            nonlocal last_good
            if last_good is None:
                last_good = _snapshot(self.network)
            self.check_input(inputs)
            reconstruction, weights = self.network.reconstruct(inputs)
            mse = F.mse_loss(reconstruction.float(), inputs.float())
            if weights is None:
                return mse, {}
            if self.network.training:
                used.logical_or_(slots_in_use(weights))
            loss = mse + c.entropy_weight * addressing_entropy(weights)
            return loss, {"mse": mse.item(), **memory_statistics(weights)}

        def on_epoch_end(epoch: int, record: dict) -> None:
            nonlocal last_good
            if "train_entropy" in record:
                record["memory_slots_used"] = float(used.sum().item())
                used.zero_()
                reason = detect_collapse(
                    {k: record[f"train_{k}"] for k in ("empty_fraction", "top_slot_share")},
                    c.collapse_fraction,
                )
                record["memory_collapsed"] = float(reason is not None)
                if reason:
                    warnings.warn(
                        f"{self.name} epoch {epoch + 1}: memory collapse: {reason}",
                        MemoryCollapseWarning, stacklevel=2,
                    )
            completed.append(record)
            last_good = _snapshot(self.network)

        try:
            self.history = run_epochs(
                self.network, optimizer, step, train_loader, val_loader, t.epochs, device,
                t.mixed_precision, on_epoch_end=on_epoch_end, checkpoint=self.epoch_checkpoint,
                desc=self.name,
            )
        except TrainingDiverged as error:
            if last_good is not None:
                self.network.load_state_dict(last_good)
            self.network.cpu().eval()
            self.history = completed
            kept = f"the weights after epoch {completed[-1]['epoch']}" if completed else "its initial weights"
            raise TrainingDiverged(f"{self.name}: {error}; the model keeps {kept}") from None
        self.network.cpu().eval()
        return self.history


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
