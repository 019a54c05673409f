"""The visual check of a trained SSAE: one PNG row per image, for people and for the run's log.

Columns: input, a corrupted copy (the training corruption, seeded), the reconstruction of that
copy (does the model repair it?), the reconstruction of the input, the anomaly map, and the
ground truth when there is one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from anomaly_models.errors import DataError
from anomaly_models.files import atomic_open
from anomaly_models.ssae.model import SelfSupervisedAutoencoder, batch_generator

COLUMNS = ("input", "corrupted input", "repaired corruption", "reconstruction", "anomaly map", "ground truth")


@torch.no_grad()
def save_visual_check(
    model: SelfSupervisedAutoencoder,
    images: torch.Tensor,
    path: str | Path,
    masks: torch.Tensor | None = None,
    seed: int = 0,
    dpi: int = 100,
) -> Path:
    """Write the grid for preprocessed `images` (B, C, H, W); `masks` (B, H, W) in {0, 1} or {0, 255}."""
    truth = _binary_masks(masks, images) if masks is not None else None
    corrupted, _ = model.corruption()(images, batch_generator(seed, 2, 0))
    repaired = model.reconstruct(corrupted)
    reconstruction = model.reconstruct(images)
    _, maps = model.predict(images)
    rows = [images, corrupted, repaired, reconstruction]
    pictures = [model.preprocessing.denormalize(r).permute(0, 2, 3, 1).numpy() for r in rows]

    columns = len(COLUMNS) if truth is not None else len(COLUMNS) - 1
    figure = Figure(figsize=(2.2 * columns, 2.2 * len(images)))
    axes = figure.subplots(len(images), columns, squeeze=False)
    top = float(maps.max()) or 1.0  # one colour scale for all maps, so rows compare
    for i, row in enumerate(axes):
        for j, picture in enumerate(pictures):
            row[j].imshow(picture[i].squeeze(-1) if picture.shape[-1] == 1 else picture[i],
                          cmap="gray", vmin=0, vmax=1)
        row[4].imshow(maps[i].numpy(), cmap="jet", vmin=0, vmax=top)
        if truth is not None:
            row[5].imshow(truth[i].numpy(), cmap="gray", vmin=0, vmax=1)
        for j, axis in enumerate(row):
            axis.set_axis_off()
            if i == 0:
                axis.set_title(COLUMNS[j], fontsize=9)
    figure.tight_layout()
    path = Path(path)
    with atomic_open(path) as file:
        figure.savefig(file, format="png", dpi=dpi)
    return path


def _binary_masks(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Masks as {0, 1} floats; values other than {0, 1} or {0, 255} are a DataError."""
    expected = (images.shape[0], *images.shape[-2:])
    if tuple(masks.shape) != expected:
        raise DataError(f"masks: expected shape {expected}, got {tuple(masks.shape)}")
    values = set(torch.unique(masks).tolist())
    if not (values <= {0, 1} or values <= {0, 255}):
        raise DataError(f"masks: values must be 0/1 or 0/255, got {sorted(values)[:6]}")
    return (masks > 0).float()
