"""Decision thresholds that need no labelled anomalies, and the score normalisation built on them.

Rules (`evaluate.threshold_rule`), all computed on the NORMAL validation split, never on test:
- `quantile`: the q-quantile of normal validation scores (q = 0.995: about 0.5 % of normal
  images are flagged), the usual choice when no defects are labelled;
- `contamination`: the (1 - rate)-quantile, for users who know roughly what fraction of
  production images is defective;
- `f1`: when a labelled validation set exists (`evaluate.labelled_val_root`, a folder in the
  dataset's layout that is NOT the test data), the F1-optimal threshold on it.
The same value is the pixel threshold of the defect masks: the methods' image score is the
maximum (or top-k mean) of the anomaly map, so the two live in the same units.

Normalised score = logistic((score - threshold) / scale), scale = std of the normal validation
scores: in (0, 1), monotonic, exactly 0.5 at the threshold; the raw score is always kept too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from anomaly_models.errors import ConfigError, DataError


def fit_threshold(normal_scores: np.ndarray, rule: str, quantile: float, contamination: float) -> dict[str, Any]:
    """The threshold record stored in a model: rule, its parameter, value and normalisation scale."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size == 0:
        raise DataError("no normal validation images to set a threshold on (data.val_fraction is 0?)")
    if rule == "quantile":
        level = quantile
    elif rule == "contamination":
        level = 1.0 - contamination
    else:
        raise ConfigError(f"evaluate.threshold_rule: {rule!r} is not allowed (allowed: quantile, contamination, f1)")
    if not 0.0 < level <= 1.0:
        raise ConfigError(f"evaluate.threshold_{rule}: gives quantile {level}, which is not in (0, 1]")
    value = float(np.quantile(scores, level, method="higher"))
    scale = float(scores.std()) or 1.0
    return {"rule": rule, "quantile": level, "value": value, "scale": scale, "num_normal": int(scores.size)}


def f1_threshold(labels: np.ndarray, scores: np.ndarray, normal_scores: np.ndarray | None) -> dict[str, Any]:
    """F1-optimal threshold on a labelled validation set; the scale comes from its normal scores."""
    from anomaly_models.metrics import f1_max

    f1, value = f1_max(labels, scores)
    reference = np.asarray(scores)[np.asarray(labels) == 0] if normal_scores is None else normal_scores
    return {"rule": "f1", "f1": f1, "value": float(value), "scale": float(np.std(reference)) or 1.0,
            "num_normal": int(len(reference)), "num_labelled": int(len(labels))}


def normalize(scores: np.ndarray, threshold: dict[str, Any]) -> np.ndarray:
    """Map raw scores to (0, 1) with the threshold at exactly 0.5."""
    z = (np.asarray(scores, dtype=np.float64) - threshold["value"]) / threshold["scale"]
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))
