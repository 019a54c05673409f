"""Preprocessing that travels with a model: resize, optional centre crop, normalisation.

A `Preprocessing` is stored in every checkpoint, so evaluation, `predict` and serving apply exactly
the transform the model was trained with. Images and masks go through the same geometry (torchvision
v2 resizes `Mask`s with nearest-neighbour), so a mask stays aligned with its image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from anomaly_models.config import from_dict, to_dict
from anomaly_models.errors import ConfigError

# Pixel statistics of ImageNet, for backbones pretrained on it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic evaluation-time transform of one image (and its mask)."""

    image_size: int = 256  # images are resized to image_size x image_size
    crop_size: int | None = None  # then centre-cropped to crop_size, if given
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    color_mode: Literal["RGB", "L"] = "RGB"  # L: one grayscale channel

    def __post_init__(self):
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"preprocessing.mean/std: need {self.channels} values for color_mode "
                f"{self.color_mode!r}, got {len(self.mean)} and {len(self.std)}"
            )
        if self.crop_size and self.crop_size > self.image_size:
            raise ConfigError(
                f"preprocessing.crop_size: {self.crop_size} is larger than image_size {self.image_size}"
            )

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    @property
    def output_size(self) -> int:
        return self.crop_size or self.image_size

    def geometry(self) -> v2.Compose:
        """Resize (+ crop) for images and masks alike."""
        steps: list[v2.Transform] = [v2.Resize((self.image_size, self.image_size), antialias=True)]
        if self.crop_size:
            steps.append(v2.CenterCrop(self.crop_size))
        return v2.Compose(steps)

    def normalize(self) -> v2.Compose:
        """uint8 image tensor -> float, scaled to [0, 1], then standardised with mean/std."""
        return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

    def __call__(self, image: Image.Image, mask: Image.Image | None = None):
        """Transform a PIL image (and optional PIL mask) into (C,H,W) float and (H,W) uint8 tensors."""
        image_tensor = tv_tensors.Image(v2.functional.pil_to_tensor(image.convert(self.color_mode)))
        if mask is None:
            return self.normalize()(self.geometry()(image_tensor)), None
        mask_tensor = tv_tensors.Mask(v2.functional.pil_to_tensor(mask)[0])
        image_tensor, mask_tensor = self.geometry()(image_tensor, mask_tensor)
        return self.normalize()(image_tensor), mask_tensor.as_subclass(torch.Tensor)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation, back to [0, 1], for pictures and overlays."""
        mean = torch.tensor(self.mean, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(-1, 1, 1)
        return (images * std + mean).clamp(0, 1)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return from_dict(cls, data, "preprocessing")
