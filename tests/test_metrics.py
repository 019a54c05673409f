"""Metrics against scikit-learn, brute-force loops, a slow reference AUPRO and hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomaly_models import metrics
from anomaly_models.errors import DataError
from anomaly_models.metrics import aupro, compute_metrics, f1_max, image_auroc, pixel_auroc, pixel_metrics


def _blobs(rng: np.random.Generator, n: int = 3, size: int = 32, fraction: float = 0.1) -> np.ndarray:
    """Masks with a few irregular anomalous regions per image."""
    field = ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 2, 2))
    return field > np.quantile(field, 1 - fraction)


def _noisy_maps(rng: np.random.Generator, masks: np.ndarray, noise: float = 0.4, decimals: int | None = None):
    """Blurred masks plus noise, optionally rounded so that many scores tie."""
    maps = ndimage.gaussian_filter(masks.astype(np.float64), sigma=(0, 1.5, 1.5)) + noise * rng.random(masks.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps.astype(np.float32)


def _reference_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and PRO at every distinct threshold, one boolean prediction at a time, from (0, 0)."""
    gt = masks.astype(bool)
    regions = []
    for i in range(len(gt)):
        labelled, count = ndimage.label(gt[i], structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append((predicted & ~gt).sum() / (~gt).sum())
        pros.append(np.mean([predicted[i][region].mean() for i, region in regions]))
    return np.array(fprs), np.array(pros)


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    fprs, pros = _reference_pro_curve(masks, maps)
    pro_at_limit = np.interp(fpr_limit, fprs, pros)
    keep = fprs <= fpr_limit
    return np.trapezoid(np.append(pros[keep], pro_at_limit), np.append(fprs[keep], fpr_limit)) / fpr_limit


def _brute_force_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over every distinct threshold (predict score >= t) and the lowest t reaching it."""
    best, best_threshold = -1.0, None
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        tp = np.sum(predicted & (labels == 1))
        f1 = 2 * tp / (predicted.sum() + labels.sum())
        if f1 >= best - 1e-12:
            best, best_threshold = max(best, f1), threshold
    return best, best_threshold


# --- image level ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn_and_pair_counting(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.5 * labels, 1)  # ties across classes
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(labels, scores) == pytest.approx(pairs, abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1])
def test_f1_max_matches_brute_force(decimals):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 150)
    scores = rng.random(150) + 0.4 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    f1, threshold = f1_max(labels, scores)
    expected_f1, expected_threshold = _brute_force_f1(labels, scores)
    assert f1 == pytest.approx(expected_f1, abs=1e-12)
    assert threshold == expected_threshold


def test_image_metrics_need_both_classes():
    with pytest.raises(DataError, match="both normal and anomalous"):
        image_auroc(np.ones(5, dtype=int), np.arange(5.0))
    with pytest.raises(DataError, match="both normal and anomalous"):
        f1_max(np.zeros(5, dtype=int), np.arange(5.0))


def test_image_metrics_reject_mismatched_lengths():
    with pytest.raises(DataError, match="same length"):
        image_auroc([0, 1, 1], [0.1, 0.2])


# --- pixel level against scikit-learn and brute force --------------------------------------


@pytest.mark.parametrize("decimals", [None, 1, 0])  # continuous, ~15 levels, 2 levels
def test_pixel_auroc_matches_sklearn(decimals):
    rng = np.random.default_rng(4)
    masks = _blobs(rng, n=4, size=40)
    maps = _noisy_maps(rng, masks, noise=1.0, decimals=decimals)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_with_scores_tied_across_classes():
    rng = np.random.default_rng(5)
    masks = rng.random((2, 30, 30)) < 0.2
    maps = rng.integers(0, 4, masks.shape).astype(np.float32) + masks * rng.integers(0, 2, masks.shape)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)


def test_pixel_f1_max_matches_brute_force():
    rng = np.random.default_rng(6)
    masks = _blobs(rng)
    maps = _noisy_maps(rng, masks, noise=0.8, decimals=2)
    expected, _ = _brute_force_f1(masks.ravel().astype(int), maps.ravel())
    assert pixel_metrics(masks, maps)["pixel_f1_max"] == pytest.approx(expected, abs=1e-12)


def test_chunked_sort_of_normal_pixels_gives_the_same_metrics(monkeypatch):
    rng = np.random.default_rng(7)
    masks = _blobs(rng, n=4)
    maps = _noisy_maps(rng, masks, decimals=2)
    single = pixel_metrics(masks, maps)
    monkeypatch.setattr(metrics, "_MIN_CHUNK_SIZE", 100)
    monkeypatch.setattr(metrics, "_SORT_THREADS", 3)
    assert len(metrics._sorted_chunks(np.zeros(1000, dtype=np.float32))) == 3
    assert pixel_metrics(masks, maps) == pytest.approx(single, abs=1e-12)


# --- AUPRO -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "decimals", "fpr_limit"), [(8, None, 0.3), (9, 2, 0.3), (10, 1, 0.3), (11, 2, 0.05), (12, 1, 1.0)])
def test_aupro_matches_slow_reference(seed, decimals, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = _blobs(rng)
    maps = _noisy_maps(rng, masks, decimals=decimals)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(_reference_aupro(masks, maps, fpr_limit), abs=1e-9)


def test_perfect_map_scores_one():
    masks = _blobs(np.random.default_rng(13))
    result = pixel_metrics(masks, masks.astype(np.float32))
    assert result == {"pixel_auroc": 1.0, "aupro": pytest.approx(1.0, abs=1e-12), "pixel_f1_max": 1.0}


@pytest.mark.parametrize("seed", range(5))
def test_aupro_of_random_maps_is_at_most_one(seed):
    rng = np.random.default_rng(seed)
    masks = _blobs(rng, fraction=0.3)
    maps = rng.random(masks.shape).astype(np.float32)
    for fpr_limit in (0.01, 0.3, 1.0):
        assert 0.0 <= aupro(masks, maps, fpr_limit) <= 1.0 + 1e-12


def _two_regions(other_half_score: float) -> tuple[np.ndarray, np.ndarray]:
    """One 10x10 image: region A (4 px) fully at 0.9; region B (8 px) half at 0.9, half at
    `other_half_score`; 22 of the 88 normal pixels at 0.5 (FPR 0.25), the other 66 at 0."""
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:3, 1:3] = True  # A
    mask[6:8, 3:7] = True  # B, not 8-connected to A
    score = np.zeros((10, 10), dtype=np.float32)
    score[1:3, 1:3] = 0.9
    score[6, 3:7] = 0.9
    score[7, 3:7] = other_half_score
    normal = np.flatnonzero(~mask.ravel())[:22]
    score.ravel()[normal] = 0.5
    return mask[None], score[None]


def test_aupro_hand_computed_two_regions():
    # Curve: (0,0) -> (0, 0.75) [A 1, B 0.5] -> (0.25, 0.75) -> (0.25, 1) [rest of B at 0.1] -> (1, 1).
    masks, maps = _two_regions(other_half_score=0.1)
    assert aupro(masks, maps, 0.3) == pytest.approx((0.25 * 0.75 + 0.05 * 1.0) / 0.3, abs=1e-12)  # 19/24
    assert aupro(masks, maps, 0.2) == pytest.approx(0.75, abs=1e-12)
    # 12 anomalous pixels: 8 found at FPR 0, all at FPR 0.25.
    result = pixel_metrics(masks, maps)
    assert result["pixel_auroc"] == pytest.approx(0.25 * 8 / 12 + 0.75, abs=1e-12)  # 11/12
    assert result["pixel_f1_max"] == pytest.approx(2 * 8 / (8 + 12), abs=1e-12)  # 0.8 at threshold 0.9


def test_aupro_hand_computed_tie_between_regions_and_normal_pixels():
    # The rest of B ties with 22 normal pixels at 0.5: one diagonal segment (0, 0.75) -> (0.25, 1).
    masks, maps = _two_regions(other_half_score=0.5)
    assert aupro(masks, maps, 0.3) == pytest.approx((0.25 * (0.75 + 1.0) / 2 + 0.05) / 0.3, abs=1e-12)
    # Interpolated at FPR 0.1: PRO 0.75 + 0.25 * 0.1 / 0.25 = 0.85.
    assert aupro(masks, maps, 0.1) == pytest.approx(0.1 * (0.75 + 0.85) / 2 / 0.1, abs=1e-12)


def test_regions_are_eight_connected():
    # A diagonal pair is one region of 2 px (4-connectivity would make it two regions).
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 3, 3] = True
    maps = np.where(mask, 0.0, 0.5).astype(np.float32)
    maps[0, 0, 0] = 1.0  # half of the pair found at FPR 0, then all normal pixels, then the rest
    assert aupro(mask, maps, 0.3) == pytest.approx((0.5 + 0.0) / 2, abs=1e-12)


# --- input handling and the combined dict ---------------------------------------------------


def test_shape_mismatch_raises_data_error_naming_shapes():
    with pytest.raises(DataError, match=r"\(2, 8, 8\).*\(2, 8, 9\)"):
        pixel_metrics(np.zeros((2, 8, 8), bool), np.zeros((2, 8, 9), np.float32))
    with pytest.raises(DataError, match="N, H, W"):
        pixel_metrics(np.zeros((8, 8), bool), np.zeros((8, 8), np.float32))


def test_masks_without_anomalous_pixels_give_none():
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    maps = np.random.default_rng(14).random((2, 8, 8))
    assert pixel_metrics(masks, maps) == {"pixel_auroc": None, "aupro": None, "pixel_f1_max": None}
    result = compute_metrics([0, 1], [0.2, 0.7], masks, maps)
    assert result["image_auroc"] == 1.0
    assert result["pixel_auroc"] is result["aupro"] is result["pixel_f1_max"] is None


def test_compute_metrics_returns_plain_floats():
    rng = np.random.default_rng(15)
    masks = _blobs(rng, n=4).astype(np.uint8)
    maps = _noisy_maps(rng, masks.astype(bool))
    labels = np.array([0, 1, 1, 0])
    scores = np.array([0.1, 0.8, 0.4, 0.5], dtype=np.float32)
    result = compute_metrics(labels, scores, masks, maps)
    assert set(result) == {"image_auroc", "f1_max", "f1_threshold", "pixel_auroc", "aupro", "pixel_f1_max"}
    assert all(type(value) is float for value in result.values())
    assert json.loads(json.dumps(result)) == result
    assert result["image_auroc"] == 0.75
    assert (result["f1_max"], result["f1_threshold"]) == (pytest.approx(0.8), pytest.approx(0.4))
    assert result["aupro"] == pytest.approx(_reference_aupro(masks, maps), abs=1e-9)

    image_only = compute_metrics(labels, scores)
    assert image_only["pixel_auroc"] is image_only["aupro"] is image_only["pixel_f1_max"] is None
    with pytest.raises(DataError, match="4 masks for 3 image labels"):
        compute_metrics(labels[:3], scores[:3], masks, maps)
