"""Screen new images with a trained model before they join the normal training data.

A retrain that accepted an anomalous image as normal would learn the defect as normal. So the
images arriving in the inbox are first scored with the current champion; one scoring at or above
its decision threshold (the rule `anomaly predict` labels anomalous by) is kept out, with its
score and the threshold as the reason. No registry here: the caller loads the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from anomaly_models.base import AnomalyModel
from anomaly_models.data.common import load_image
from anomaly_models.errors import DataError
from anomaly_models.training import resolve_device


def score_images(model: AnomalyModel, paths: list[Path], batch_size: int = 16,
                 device: str = "auto") -> dict[Path, float]:
    """{path: anomaly score} for each readable image, with the model's own preprocessing; an
    unreadable one is left out (the inbox's own checks reject it, naming why)."""
    model.to(resolve_device(device))
    scores: dict[Path, float] = {}
    try:
        for start in range(0, len(paths), batch_size):
            batch = []
            for path in paths[start:start + batch_size]:
                try:
                    batch.append((path, model.preprocessing(load_image(path))[0]))
                except DataError:
                    continue
            if batch:
                values, _ = model.predict(torch.stack([tensor for _, tensor in batch]))
                scores.update({path: float(value) for (path, _), value in zip(batch, values)})
    finally:
        model.to(torch.device("cpu"))
    return scores


def anomalous(model: AnomalyModel, scores: dict[Path, float], who: str) -> dict[Path, str]:
    """{path: reason} for the images scoring at or above the model's threshold; `who` names the
    model in the reason (e.g. 'champion v3')."""
    threshold = model.threshold["value"]
    return {path: f"anomaly score {score:.4g} is at or above the threshold {threshold:.4g} of the {who}: "
                  f"not taken as a normal image"
            for path, score in scores.items() if score >= threshold}
