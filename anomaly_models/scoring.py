"""From a reconstruction to an anomaly map and an image score, shared by the autoencoder methods.

Kept in torch (not scipy) so the whole scoring graph runs on the GPU and exports to ONNX.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torchvision.transforms.v2 import functional as F

ScoreReduction = Literal["max", "topk_mean"]


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, H, W) maps; kernel spans +-4 sigma as in anomalib and scipy.

    Done as two matrix products, columns then rows, with the blur of the identity (reflect borders
    included): the same result as the 2-D convolution, but a one-channel 33x33 convolution costs as
    much as half the autoencoder's forward pass on a CPU, the products a few percent of it.
    """
    if sigma <= 0:
        return maps
    kernel = 2 * math.ceil(4 * sigma) + 1

    def blur_matrix(size: int) -> torch.Tensor:  # row i: where pixel i's weight lands
        identity = torch.eye(size, dtype=maps.dtype, device=maps.device)
        return F.gaussian_blur(identity.unsqueeze(0), [kernel, 1], [sigma, sigma]).squeeze(0)

    height, width = maps.shape[-2:]
    return blur_matrix(height).T @ maps @ blur_matrix(width)


def residual_map(images: torch.Tensor, reconstructions: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-pixel squared error averaged over channels, then smoothed: (B, C, H, W) -> (B, H, W)."""
    return gaussian_smooth((images - reconstructions).pow(2).mean(dim=1), sigma)


def image_scores(
    maps: torch.Tensor, reduction: ScoreReduction = "max", top_k: int = 100
) -> torch.Tensor:
    """Reduce (B, H, W) maps to (B,) scores: the maximum, or the mean of the top-k pixels."""
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.amax(dim=1)
    return flat.topk(min(top_k, flat.shape[1]), dim=1).values.mean(dim=1)


class FeatureResidual(nn.Module):
    """(images, reconstructions) -> (B, H, W): 1 - cosine similarity of their pretrained features.

    A reconstruction that is right but a little blurred differs from its input at every edge in
    pixel space; in the feature space of an ImageNet network the same blur moves a location little
    while a missing or foreign part moves it a lot. Each of `layers` gives one map of one minus
    the cosine similarity per location, upsampled to the image size (bilinear); the maps are summed.
    `scale` / `shift` turn the method's normalised inputs into the backbone's (affine per channel).
    """

    def __init__(self, backbone: nn.Module, layers: tuple[str, ...], scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.backbone, self.layers = backbone, tuple(layers)
        self.register_buffer("scale", scale.view(1, -1, 1, 1).float())
        self.register_buffer("shift", shift.view(1, -1, 1, 1).float())

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        both = torch.cat([images, reconstructions]) * self.scale + self.shift
        total = 0
        for maps in self.backbone.feature_maps(both, self.layers):
            first, second = maps.chunk(2)
            distance = 1 - nn.functional.cosine_similarity(first, second, dim=1)
            total = total + nn.functional.interpolate(
                distance.unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False
            )[:, 0]
        return total


def map_statistics(maps: torch.Tensor, std_sigma: float, std_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and std of (N, H, W) anomaly maps of normal images, for `standardise`.

    The std of a few dozen maps is noisy, so it is smoothed (`std_sigma` pixels) and kept above
    `std_floor` times its mean, so that no pixel where normal images happen to agree is blown up.
    """
    mean = maps.mean(dim=0)
    std = gaussian_smooth(maps.std(dim=0, unbiased=len(maps) > 1).unsqueeze(0), std_sigma)[0]
    return mean, std.clamp_min(std_floor * std.mean().item())


def standardise(maps: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(maps - mean) / std per pixel: how unusual each pixel is for this position on normal images."""
    return (maps - mean) / std
