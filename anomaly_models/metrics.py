"""Evaluation metrics of anomaly detection, image level and pixel level, in one place.

Image level: AUROC and F1-max of the image scores (scikit-learn). Pixel level: pixel AUROC,
AUPRO (area under the per-region-overlap curve up to an FPR limit, as defined by the MVTec AD
evaluation code) and pixel F1-max, all three read off one pass over the pixel scores.

The pixel metrics are built to be fast on a whole test set (tens of millions of pixels): the
ROC and PRO curves are piecewise linear and only bend at thresholds equal to the score of an
anomalous pixel, because between two such thresholds only normal pixels are added (a horizontal
segment). So the anomalous pixels, typically a few percent, are sorted with their region weights,
while the normal pixels only need to be counted above each of those thresholds: they are sorted
in a few chunks on parallel threads (NumPy releases the GIL while sorting) and counted with
`searchsorted`. The curves are exactly those of the MVTec AD `compute_pro` (cumulative sums over
all pixels sorted by descending score, ties merged, starting at (0, 0)) and of scikit-learn's
`roc_curve`, minus the points that lie on their straight horizontal segments.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from anomaly_models.errors import ConfigError, DataError

PIXEL_KEYS = ("pixel_auroc", "aupro", "pixel_f1_max")

# Connected ground-truth regions use 8-connectivity within an image, as the MVTec AD evaluation
# does, and never connect two images of the (N, H, W) stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True

# Normal-pixel scores are sorted in up to this many chunks on as many threads; a chunk is at
# least _MIN_CHUNK_SIZE scores, so small inputs take one plain sort.
_SORT_THREADS = min(os.cpu_count() or 1, 8)
_MIN_CHUNK_SIZE = 1 << 20


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores (label 1 = anomalous)."""
    y, s = _check_image_inputs(labels, scores)
    return float(roc_auc_score(y, s))


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (anomalous when score >= threshold).

    The lowest such threshold is returned when several reach the same F1.
    """
    y, s = _check_image_inputs(labels, scores)
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision 1, recall 0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def pixel_metrics(masks, maps, fpr_limit: float = 0.3) -> dict[str, float | None]:
    """Pixel AUROC, AUPRO up to `fpr_limit` (normalised to [0, 1]) and pixel F1-max.

    masks: (N, H, W) ground truth, nonzero = anomalous; maps: (N, H, W) anomaly maps, compared
    as float32 (the precision models produce; halves the memory and time of the sort).
    All three are None when no mask has an anomalous pixel (a dataset without masks).
    """
    gt, scores = _check_pixel_inputs(masks, maps)
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    n_pos = int(np.count_nonzero(gt))
    n_neg = gt.size - n_pos
    if n_pos == 0:
        return dict.fromkeys(PIXEL_KEYS)
    if n_neg == 0:
        raise DataError("every mask pixel is anomalous: pixel metrics need normal pixels too")

    # Anomalous pixels by descending score, each weighted 1 / (its region's size * number of
    # regions), so that summing the weights of detected pixels gives the mean region overlap.
    regions, n_regions = ndimage.label(gt, structure=_REGION_STRUCTURE)
    region_of_pixel = regions[gt]
    del regions
    region_size = np.bincount(region_of_pixel)
    weight = 1.0 / (region_size[region_of_pixel] * float(n_regions))
    pos_scores = scores[gt]
    order = np.argsort(pos_scores)[::-1]
    pos_scores = pos_scores[order]
    weight = weight[order]

    # One curve point per distinct anomalous score v (the end of its tie group): at threshold v,
    # tp anomalous pixels and fp_at normal pixels have score >= v; just above v, fp_above do.
    last = np.flatnonzero(np.append(pos_scores[1:] != pos_scores[:-1], True))
    values = pos_scores[last]
    tp = last + 1
    pro = np.minimum(np.cumsum(weight)[last], 1.0)
    neg_chunks = _sorted_chunks(scores[~gt])
    fp_at = n_neg - sum(np.searchsorted(chunk, values, side="left") for chunk in neg_chunks)
    fp_above = n_neg - sum(np.searchsorted(chunk, values, side="right") for chunk in neg_chunks)

    # Each tie group adds the segment (fp_above, previous tp) -> (fp_at, tp); between groups
    # only normal pixels are added.
    fpr = _vertices(fp_above, fp_at, n_neg) / n_neg
    tpr = _vertices(_previous(tp), tp, n_pos) / n_pos
    pro_curve = _vertices(_previous(pro), pro, 1.0)
    # F1 = 2 tp / (tp + fp + n_pos) only falls along a run of normal pixels, so its maximum is
    # at the end of a tie group.
    return {
        "pixel_auroc": float(np.trapezoid(tpr, fpr)),
        "aupro": _area_up_to(fpr, pro_curve, fpr_limit) / fpr_limit,
        "pixel_f1_max": float(np.max(2.0 * tp / (tp + fp_at + n_pos))),
    }


def aupro(masks, maps, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the PRO curve up to `fpr_limit`; None without anomalous pixels."""
    return pixel_metrics(masks, maps, fpr_limit)["aupro"]


def pixel_auroc(masks, maps) -> float | None:
    """Pixel-level ROC AUC over all pixels of all images; None without anomalous pixels."""
    return pixel_metrics(masks, maps)["pixel_auroc"]


def compute_metrics(labels, scores, masks=None, maps=None, fpr_limit: float = 0.3) -> dict[str, float | None]:
    """All metrics of one evaluation as plain floats (JSON-ready).

    The pixel metrics are None when masks or maps are missing (image-only methods, datasets
    without masks) or when no mask has an anomalous pixel.
    """
    best_f1, threshold = f1_max(labels, scores)
    result: dict[str, float | None] = {
        "image_auroc": image_auroc(labels, scores),
        "f1_max": best_f1,
        "f1_threshold": threshold,
    }
    if masks is None or maps is None:
        result.update(dict.fromkeys(PIXEL_KEYS))
        return result
    n_images = len(np.asarray(labels))
    if len(masks) != n_images:
        raise DataError(f"{len(masks)} masks for {n_images} image labels: they must match one to one")
    result.update(pixel_metrics(masks, maps, fpr_limit))
    return result


def _check_image_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores as 1-D arrays of one length, with both classes present."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape:
        raise DataError(f"labels {y.shape} and scores {s.shape} must be 1-D arrays of the same length")
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"labels must be 0 (normal) or 1 (anomalous), got values {np.unique(y).tolist()}")
    if np.unique(y).size < 2:
        raise DataError(
            f"image AUROC and F1 need both normal and anomalous images, got labels {np.unique(y).tolist()}"
        )
    if np.isnan(s).any():
        raise DataError("image scores contain NaN")
    return y.astype(np.int8), s


def _check_pixel_inputs(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Masks as bool and maps as float32, both (N, H, W) of the same shape and without NaN."""
    gt = np.asarray(masks)
    scores = np.asarray(maps, dtype=np.float32)
    if gt.ndim != 3 or gt.shape != scores.shape:
        raise DataError(
            f"masks {gt.shape} and anomaly maps {scores.shape} must both be (N, H, W) with the same shape"
        )
    if np.isnan(scores).any():
        raise DataError("anomaly maps contain NaN")
    return gt.astype(bool, copy=False), scores


def _sorted_chunks(values: np.ndarray) -> list[np.ndarray]:
    """`values` sorted in place in contiguous chunks, one per thread; counts are summed over chunks."""
    n_chunks = max(1, min(_SORT_THREADS, values.size // _MIN_CHUNK_SIZE))
    chunks = np.array_split(values, n_chunks)
    if n_chunks == 1:
        chunks[0].sort()
    else:
        with ThreadPoolExecutor(n_chunks) as pool:
            list(pool.map(np.ndarray.sort, chunks))
    return chunks


def _previous(values: np.ndarray) -> np.ndarray:
    """`values` shifted by one: the value before each tie group, 0 before the first."""
    return np.concatenate(([0], values[:-1]))


def _vertices(before: np.ndarray, at: np.ndarray, end: float) -> np.ndarray:
    """Curve coordinates (0, before_0, at_0, before_1, at_1, ..., end) as float64."""
    out = np.empty(2 * len(at) + 2, dtype=np.float64)
    out[0] = 0.0
    out[1:-1:2] = before
    out[2:-1:2] = at
    out[-1] = end
    return out


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x <= x_max (x non-decreasing, x[0] = 0), y interpolated at x_max."""
    inside = int(np.searchsorted(x, x_max, side="right"))
    if inside == len(x):
        return float(np.trapezoid(y, x))
    x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
    y_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    return float(np.trapezoid(np.append(y[:inside], y_max), np.append(x[:inside], x_max)))
