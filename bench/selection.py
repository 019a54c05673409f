"""The selection splits of the benches: train-split images for comparing settings.

The normal class's held-out part (label 0) against every other class's held-out part (label 1):
none of them is trained on, none is a test image, so a setting chosen on it is not chosen on the
test split.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from anomaly_models.data.common import RecordDataset
from anomaly_models.ssae.corruption import value_noise
from anomaly_models.transforms import Preprocessing


def selection_set(dataset_class, root: Path, normal: str, classes: tuple[str, ...], pre: Preprocessing):
    """Held-out images of every class of `classes`, labelled anomalous unless of class `normal`."""
    records = []
    for cls in classes:
        held_out = dataset_class(root, cls, "val", pre).records
        records += [replace(r, label=int(cls != normal)) for r in held_out]
    return RecordDataset(records, pre, cache=True)


def synthetic_defects(normal: torch.Tensor, sources: torch.Tensor, seed: int, area: tuple[float, float] = (0.01, 0.1),
                      opacity: tuple[float, float] = (0.5, 1.0)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A selection set for a category whose only anomalies are its test split: the held-out normal
    images (label 0) and one copy of each with a synthetic defect (label 1, its mask), DRAEM-style:
    a Perlin-like noise region covering `area` of the image, filled with a foreign image from
    `sources` (another dataset, resized) at a random opacity. Neither family is a training
    corruption of SSAE (those copy from the same category or draw procedural textures).

    `normal` (N, C, H, W) and `sources` (M, C, H, W) normalised alike; returns images (2N, C, H, W),
    masks (2N, H, W) uint8 and labels (2N,)."""
    g = torch.Generator().manual_seed(seed)
    n, _, height, width = normal.shape
    defective, masks = normal.clone(), torch.zeros(2 * n, height, width, dtype=torch.uint8)
    for i in range(n):
        noise = value_noise(height, width, int(torch.randint(2, 9, (1,), generator=g)), 2, g)
        fraction = area[0] + (area[1] - area[0]) * float(torch.rand((), generator=g))
        region = noise >= torch.quantile(noise.flatten(), 1 - fraction)
        alpha = opacity[0] + (opacity[1] - opacity[0]) * float(torch.rand((), generator=g))
        source = sources[int(torch.randint(0, len(sources), (1,), generator=g))]
        defective[i] = torch.where(region, (1 - alpha) * normal[i] + alpha * source, normal[i])
        masks[n + i] = region
    labels = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    return torch.cat([normal, defective]), masks, labels
