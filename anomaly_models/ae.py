"""Baseline: a plain convolutional autoencoder scored by its reconstruction error.

The reference every reconstruction method must beat. The encoder/decoder follow the MemAE code's
style (Conv-BN-LeakyReLU(0.2) with stride-2 down-sampling, transposed convolutions up, no output
activation) so that MemAE can be compared with the same network and budget. Anomaly map: squared
error averaged over channels, Gaussian-smoothed; image score: its maximum (or top-k mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from anomaly_models.base import AnomalyModel, check_divisible, register_model
from anomaly_models.scoring import ScoreReduction, gaussian_smooth, image_scores, residual_map, standardise
from anomaly_models.training import resolve_device, run_epochs, seed_everything, seeded
from anomaly_models.transforms import Preprocessing


@dataclass(frozen=True)
class AutoencoderConfig:
    base_channels: int = 32  # channels after the first down-sampling, doubled at each next one
    max_channels: int = 256
    num_downsamples: int = 4  # image size must be divisible by 2**num_downsamples
    latent_channels: int = 64  # bottleneck width: smaller forgets more (and reconstructs less)
    smoothing_sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in pixels
    score_reduction: ScoreReduction = "max"
    top_k: int = 100  # pixels averaged when score_reduction is topk_mean


def _down(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _up(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.LeakyReLU(0.2, inplace=True),
    )


class ConvEncoder(nn.Sequential):
    """Stride-2 conv stages down to a `latent_channels` map at 1/2**num_downsamples resolution."""

    def __init__(self, in_channels: int, config: AutoencoderConfig):
        widths = _widths(config)
        stages = [_down(c_in, c_out) for c_in, c_out in zip([in_channels, *widths[:-1]], widths)]
        super().__init__(*stages, nn.Conv2d(widths[-1], config.latent_channels, 1))


class ConvDecoder(nn.Sequential):
    """Mirror of ConvEncoder with transposed convolutions; linear output (no activation)."""

    def __init__(self, out_channels: int, config: AutoencoderConfig):
        widths = _widths(config)[::-1]
        stages = [_up(c_in, c_out) for c_in, c_out in zip(widths, widths[1:])]
        last = nn.ConvTranspose2d(widths[-1], out_channels, 3, stride=2, padding=1, output_padding=1)
        super().__init__(nn.Conv2d(config.latent_channels, widths[0], 1), *stages, last)


def _widths(config: AutoencoderConfig) -> list[int]:
    return [min(config.base_channels * 2**i, config.max_channels) for i in range(config.num_downsamples)]


class ConvAutoencoder(nn.Module):
    """The network alone: image -> reconstruction."""

    def __init__(self, channels: int, config: AutoencoderConfig):
        super().__init__()
        self.encoder = ConvEncoder(channels, config)
        self.decoder = ConvDecoder(channels, config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images))


class ReconstructionScorer(nn.Module):
    """Export-ready scoring graph: images -> (image scores, anomaly maps).

    The map is the residual between each image and its reconstruction (`residual` None: squared
    pixel error averaged over channels; else e.g. a `scoring.FeatureResidual`), Gaussian-smoothed,
    and, when `mean` / `std` are given, standardised per pixel; the image score reduces that map.
    """

    def __init__(self, network: nn.Module, sigma: float, reduction: ScoreReduction, top_k: int,
                 residual: nn.Module | None = None, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None):
        super().__init__()
        self.network, self.residual = network, residual
        self.sigma, self.reduction, self.top_k = sigma, reduction, top_k
        self.standardised = mean is not None
        if self.standardised:
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

    def residual_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) smoothed residual maps, before any standardisation."""
        reconstructions = self.network(images)
        if self.residual is None:
            return residual_map(images, reconstructions, self.sigma)
        return gaussian_smooth(self.residual(images, reconstructions), self.sigma)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.residual_maps(images)
        if self.standardised:
            maps = standardise(maps, self.mean, self.std)
        return image_scores(maps, self.reduction, self.top_k), maps


@register_model
class Autoencoder(AnomalyModel):
    name = "ae"
    config_class = AutoencoderConfig

    def __init__(self, config=None, train=None, preprocessing=None):
        super().__init__(config, train, preprocessing)
        with seeded(self.train_config.seed):
            self.network = ConvAutoencoder(self.preprocessing.channels, self.config)

    @classmethod
    def default_preprocessing(cls, config: AutoencoderConfig) -> Preprocessing:
        return Preprocessing(image_size=256)

    def scorer(self) -> ReconstructionScorer:
        c = self.config
        return ReconstructionScorer(self.network, c.smoothing_sigma, c.score_reduction, c.top_k)

    def fit(self, train_loader: DataLoader, val_loader: DataLoader | None = None) -> list[dict]:
        check_divisible(self.name, [self.preprocessing.output_size], self.config.num_downsamples)
        t = self.train_config
        seed_everything(t.seed)
        device = resolve_device(t.device)
        self.network.to(device)
        optimizer = torch.optim.Adam(self.network.parameters(), lr=t.lr, weight_decay=t.weight_decay)

        def step(images: torch.Tensor):
            return nn.functional.mse_loss(self.network(images), images), {}

        self.history = run_epochs(
            self.network, optimizer, step, train_loader, val_loader, t.epochs, device,
            t.mixed_precision, checkpoint=self.epoch_checkpoint, desc=self.name,
        )
        self.network.cpu().eval()
        return self.history

    def check_input(self, images: torch.Tensor) -> None:
        check_divisible(self.name, images.shape[-2:], self.config.num_downsamples)
