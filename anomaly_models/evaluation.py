"""Scoring a dataset with any model and computing its metrics, written once for every method."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomaly_models.base import AnomalyModel
from anomaly_models.data import RecordDataset
from anomaly_models.metrics import compute_metrics
from anomaly_models.training import resolve_device


@dataclass
class Predictions:
    """Everything a run's evaluation, report and plots need, in dataset order."""

    scores: np.ndarray  # (N,) image scores
    labels: np.ndarray  # (N,) 0 normal / 1 anomalous
    maps: np.ndarray | None  # (N, H, W) float32 anomaly maps, or None for image-only methods
    masks: np.ndarray | None  # (N, H, W) bool ground truth, or None when the dataset has none
    paths: list[str]
    defect_types: list[str]


@torch.no_grad()
def predict_dataset(
    model: AnomalyModel, dataset: RecordDataset, batch_size: int = 32, device: str = "auto",
    num_workers: int = 0,
) -> Predictions:
    """Run `model.predict` over a dataset in batches, on the GPU when there is one."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.to(resolve_device(device))
    scores, labels, maps, masks, paths, defects = [], [], [], [], [], []
    for batch in tqdm(loader, desc=f"predict {model.name}", leave=False, disable=None):
        batch_scores, batch_maps = model.predict(batch.image)
        scores.append(batch_scores.float().numpy())
        labels.append(batch.label.numpy())
        if batch_maps is not None:
            maps.append(batch_maps.float().numpy())
        if dataset.has_masks:
            masks.append(batch.mask.numpy().astype(bool))
        paths += batch.path
        defects += batch.defect_type
    model.to(torch.device("cpu"))
    return Predictions(
        scores=np.concatenate(scores),
        labels=np.concatenate(labels),
        maps=np.concatenate(maps) if maps else None,
        masks=np.concatenate(masks) if masks else None,
        paths=paths,
        defect_types=defects,
    )


def evaluate(predictions: Predictions, fpr_limit: float = 0.3) -> dict[str, float | None]:
    """Image AUROC, F1-max and, where masks and maps exist, pixel AUROC, AUPRO and pixel F1-max."""
    return compute_metrics(
        predictions.labels, predictions.scores, predictions.masks, predictions.maps, fpr_limit
    )
