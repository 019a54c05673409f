"""MemAE for images (the paper's MNIST / CIFAR-10 experiments), registered as `memae`.

The encoder and decoder are the baseline `ae`'s (ConvEncoder / ConvDecoder: Conv-BN-LeakyReLU(0.2)
with stride-2 down-sampling, transposed convolutions up, linear output), with the memory addressed
at every position of the latent map between them, so `memae` and `ae` built from the same
AutoencoderConfig values differ only by the memory. Scores and maps are the baseline's: squared
error averaged over channels, Gaussian-smoothed; image score = max (or top-k mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anomaly_models.ae import AutoencoderConfig, ConvDecoder, ConvEncoder, ReconstructionScorer
from anomaly_models.base import register_model
from anomaly_models.errors import ConfigError
from anomaly_models.memae.common import MemAEModel, MemoryNetwork, MemoryOptions
from anomaly_models.memae.memory import MemoryModule
from anomaly_models.training import seeded
from anomaly_models.transforms import Preprocessing


@dataclass(frozen=True)
class MemAEConfig(MemoryOptions, AutoencoderConfig):
    """The baseline autoencoder's options plus the memory's; the memory items have latent_channels values."""


class MemoryAutoencoder(MemoryNetwork):
    """image -> encoder -> memory read-out -> decoder -> reconstruction."""

    def __init__(self, channels: int, config: MemAEConfig):
        super().__init__()
        self.encoder = ConvEncoder(channels, config)
        self.memory = MemoryModule(
            config.memory_size, config.latent_channels, config.shrink_lambda, config.addressing
        )
        self.decoder = ConvDecoder(channels, config)

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent, weights = self.memory(self.encoder(images))
        return self.decoder(latent), weights


@register_model
class MemAE(MemAEModel):
    name = "memae"
    config_class = MemAEConfig

    def __init__(self, config=None, train=None, preprocessing=None):
        super().__init__(config, train, preprocessing)
        with seeded(self.train_config.seed):
            self.network = MemoryAutoencoder(self.preprocessing.channels, self.config)

    @classmethod
    def default_preprocessing(cls, config: MemAEConfig) -> Preprocessing:
        return Preprocessing(image_size=256)

    def scorer(self) -> ReconstructionScorer:
        c = self.config
        return ReconstructionScorer(self.network, c.smoothing_sigma, c.score_reduction, c.top_k)

    def check_input(self, images: torch.Tensor) -> None:
        factor = 2**self.config.num_downsamples
        if images.ndim != 4 or images.shape[-1] % factor or images.shape[-2] % factor:
            raise ConfigError(
                f"{self.name} needs (B, C, H, W) images with H and W divisible by {factor} "
                f"(2**model.{self.name}.num_downsamples), got {tuple(images.shape)}: set "
                f"preprocessing.image_size to a multiple of {factor}"
            )
