"""MemAE for images (the paper's MNIST / CIFAR-10 experiments), registered as `memae`.

The encoder and decoder are the baseline `ae`'s (ConvEncoder / ConvDecoder: Conv-BN-LeakyReLU(0.2)
with stride-2 down-sampling, transposed convolutions up, linear output), with the memory between
them, so `memae` and `ae` built from the same AutoencoderConfig values differ only by the memory.
Scores and maps are the baseline's: squared error averaged over channels, Gaussian-smoothed; image
score = max (or top-k mean).

Where the memory is addressed (`memory_scope`):
- `position`: every position of the latent map is a query of `latent_channels` values, as the
  official video code does for its 3D feature maps. A few items then rebuild any local pattern,
  anomalies included, so on one-class MNIST it does not help (bench/memae.py);
- `image`: the whole latent map is ONE query (memory items of latent_channels x h x w values): the
  paper's image setting as we read it (Sec. 3.3: "the encoding z" of an image, N = 100 items for
  MNIST, 500 for CIFAR-10), where each item is a prototype of the normal class, so an anomaly is
  rebuilt as a sparse mix of normal prototypes. Needs the image size fixed at training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    """The baseline autoencoder's options plus the memory's and where it is addressed."""

    memory_scope: Literal["position", "image"] = "position"  # see the module docstring


class MemoryAutoencoder(MemoryNetwork):
    """image -> encoder -> memory read-out -> decoder -> reconstruction."""

    def __init__(self, channels: int, config: MemAEConfig, image_size: int):
        super().__init__()
        self.encoder = ConvEncoder(channels, config)
        self.scope = config.memory_scope
        item = config.latent_channels
        if self.scope == "image":
            item *= (image_size // 2**config.num_downsamples) ** 2
        self.memory = MemoryModule(
            config.memory_size, item, config.shrink_lambda, config.addressing, config.addressing_temperature
        )
        self.decoder = ConvDecoder(channels, config)

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.encoder(images)
        if self.scope == "position":
            read, weights = self.memory(latent)
        else:  # one query per image: (B, C*h*w, 1) -> weights (B, N, 1)
            read, weights = self.memory(latent.flatten(1).unsqueeze(-1))
            read = read.reshape(latent.shape)
        return self.decoder(read), weights


@register_model
class MemAE(MemAEModel):
    name = "memae"
    config_class = MemAEConfig

    def __init__(self, config=None, train=None, preprocessing=None):
        super().__init__(config, train, preprocessing)
        with seeded(self.train_config.seed):
            self.network = MemoryAutoencoder(
                self.preprocessing.channels, self.config, self.preprocessing.output_size
            )

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
        size = self.preprocessing.output_size
        if self.config.memory_scope == "image" and images.shape[-2:] != (size, size):
            raise ConfigError(
                f"{self.name} with memory_scope image reads {size} px images only "
                f"(preprocessing.image_size), got {tuple(images.shape)}"
            )
