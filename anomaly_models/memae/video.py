"""MemAE for video (the official code's AutoEncoderCov3DMem), registered as `memae_video`.

Input: clips (B, 1, 16, H, W) of grayscale frames scaled to [-1, 1] (see `anomaly_models/data/video.py`). Encoder:
Conv3d 1 -> 96 -> 128 -> 256 -> 256, kernel 3, strides (1,2,2) then (2,2,2), each with BatchNorm3d and
LeakyReLU(0.2); the memory (N = 2000 over C = 256, lambda = 0.0025) at every spatio-temporal position;
decoder: the mirrored ConvTranspose3d stack with a linear output. `use_memory: false` gives the
official plain 3D autoencoder (AutoEncoderCov3D), the baseline of the paper's Table 1.

Official scoring: a clip's error is the mean over frames and pixels of the L2 norm (over channels)
of the residual, and scores the clip's centre frame; per video the errors e are turned into the
regularity s = 1 - (e - min e) / (max e - min e), and the frame-level AUC is computed over the pooled
frames of all test videos with 1 - s as the anomaly score. The map of a clip is the baseline's
residual map (channel-averaged squared error, smoothed) of its centre frame, for pixel metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from anomaly_models.base import register_model
from anomaly_models.data.video import VideoFrameDataset, frame_level_auc, video_preprocessing
from anomaly_models.errors import ConfigError
from anomaly_models.evaluation import predict_dataset
from anomaly_models.memae.common import MemAEModel, MemoryNetwork, MemoryOptions
from anomaly_models.memae.memory import MemoryModule
from anomaly_models.metrics import compute_metrics
from anomaly_models.scoring import residual_map
from anomaly_models.training import seeded
from anomaly_models.transforms import Preprocessing


@dataclass(frozen=True)
class VideoMemAEConfig(MemoryOptions):
    memory_size: int = 2000
    shrink_threshold: float = 5.0  # official 0.0025 = 5 / 2000
    widths: tuple[int, ...] = (96, 128, 256, 256)  # Conv3d widths; the memory works on the last
    clip_length: int = 16  # frames per clip
    use_memory: bool = True  # false: the official AE baseline, same network without memory
    smoothing_sigma: float = 4.0  # Gaussian smoothing of the centre-frame residual map, in pixels

    def __post_init__(self):
        super().__post_init__()
        if not self.widths or min(self.widths) < 1:
            raise ConfigError(f"widths: need at least one positive channel count, got {list(self.widths)}")


def _strides(depth: int) -> list[tuple[int, int, int]]:
    return [(1, 2, 2)] + [(2, 2, 2)] * (depth - 1)


def _block(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.BatchNorm3d(channels), nn.LeakyReLU(0.2, inplace=True)]


class VideoMemoryAutoencoder(MemoryNetwork):
    """clip -> Conv3d encoder -> memory read-out (optional) -> ConvTranspose3d decoder."""

    def __init__(self, channels: int, config: VideoMemAEConfig):
        super().__init__()
        widths, strides = list(config.widths), _strides(len(config.widths))
        down = []
        for c_in, c_out, stride in zip([channels, *widths[:-1]], widths, strides):
            down += _block(nn.Conv3d(c_in, c_out, 3, stride, padding=1), c_out)
        self.encoder = nn.Sequential(*down)
        self.memory = (
            MemoryModule(config.memory_size, widths[-1], config.shrink_lambda, config.addressing,
                         config.addressing_temperature)
            if config.use_memory else None
        )
        up = []
        outputs = [*widths[-2::-1], channels]
        for i, (c_in, c_out, stride) in enumerate(zip(widths[::-1], outputs, strides[::-1])):
            conv = nn.ConvTranspose3d(
                c_in, c_out, 3, stride, padding=1, output_padding=tuple(s - 1 for s in stride)
            )
            up += [conv] if i == len(widths) - 1 else _block(conv, c_out)  # linear output
        self.decoder = nn.Sequential(*up)
        self.apply(_official_init)

    def reconstruct(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        latent = self.encoder(clips)
        if self.memory is None:
            return self.decoder(latent), None
        latent, weights = self.memory(latent)
        return self.decoder(latent), weights


def _official_init(module: nn.Module) -> None:
    """The official weights_init: convolutions N(0, 0.02), BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm3d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class ClipScorer(nn.Module):
    """Export-ready scoring graph: clips -> (official clip errors, centre-frame residual maps)."""

    def __init__(self, network: nn.Module, sigma: float):
        super().__init__()
        self.network, self.sigma = network, sigma

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.network(clips)
        errors = (clips - reconstruction).pow(2).sum(dim=1).sqrt().flatten(1).mean(dim=1)
        centre = clips.shape[2] // 2
        return errors, residual_map(clips[:, :, centre], reconstruction[:, :, centre], self.sigma)


@register_model
class VideoMemAE(MemAEModel):
    name = "memae_video"
    config_class = VideoMemAEConfig
    reads = "clips"

    def __init__(self, config=None, train=None, preprocessing=None):
        super().__init__(config, train, preprocessing)
        c = self.config
        if c.clip_length % 2 ** (len(c.widths) - 1):
            raise ConfigError(
                f"model.{self.name}.clip_length: {c.clip_length} is not divisible by "
                f"{2 ** (len(c.widths) - 1)} (the temporal down-sampling of {len(c.widths)} stages)"
            )
        with seeded(self.train_config.seed):
            self.network = VideoMemoryAutoencoder(self.preprocessing.channels, c)

    @classmethod
    def default_preprocessing(cls, config: VideoMemAEConfig) -> Preprocessing:
        return video_preprocessing()

    def scorer(self) -> ClipScorer:
        return ClipScorer(self.network, self.config.smoothing_sigma)

    @property
    def clip_length(self) -> int:
        return self.config.clip_length

    def check_input(self, clips: torch.Tensor) -> None:
        c, factor = self.config, 2 ** len(self.config.widths)
        expected = (self.preprocessing.channels, c.clip_length)
        if clips.ndim != 5 or tuple(clips.shape[1:3]) != expected or clips.shape[-1] % factor \
                or clips.shape[-2] % factor:
            raise ConfigError(
                f"{self.name} needs clips (B, {expected[0]}, {expected[1]}, H, W) with H and W "
                f"divisible by {factor}, got {tuple(clips.shape)} (clips come from VideoFrameDataset; "
                f"set preprocessing.image_size to a multiple of {factor})"
            )


def evaluate_video(
    model: VideoMemAE, dataset: VideoFrameDataset, batch_size: int = 8, device: str = "auto",
    fpr_limit: float = 0.3,
) -> dict[str, float | None]:
    """Frame-level AUC (official, per-video normalised), AUC of the raw pooled errors, pixel metrics."""
    predictions = predict_dataset(model, dataset, batch_size, device)
    metrics = compute_metrics(
        predictions.labels, predictions.scores, predictions.masks, predictions.maps, fpr_limit
    )
    metrics["frame_auc"] = frame_level_auc(predictions.scores, predictions.labels, dataset.clip_videos)
    metrics["frame_auc_pooled_raw"] = metrics.pop("image_auroc")
    metrics["num_frames"] = len(dataset)
    return metrics
