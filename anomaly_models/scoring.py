"""From a reconstruction to an anomaly map and an image score, shared by the autoencoder methods.

Kept in torch (not scipy) so the whole scoring graph runs on the GPU and exports to ONNX.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
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
