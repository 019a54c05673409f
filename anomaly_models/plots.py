"""Curves and pictures of an evaluation: ROC / PR curves (CSV for DVC, PNG for people) and heat-map overlays."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from anomaly_models.data import RecordDataset  # noqa: E402
from anomaly_models.evaluation import Predictions  # noqa: E402


def write_curves(predictions: Predictions, folder: str | Path) -> dict[str, Path]:
    """Image-level ROC and PR curves as CSV (DVC plots) and one PNG; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fpr, tpr, roc_thresholds = roc_curve(predictions.labels, predictions.scores)
    precision, recall, _ = precision_recall_curve(predictions.labels, predictions.scores)
    files = {"roc": folder / "roc.csv", "pr": folder / "pr.csv", "curves": folder / "curves.png"}
    _write_csv(files["roc"], ("fpr", "tpr", "threshold"), zip(fpr, tpr, roc_thresholds))
    _write_csv(files["pr"], ("recall", "precision"), zip(recall, precision))

    figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(10, 4.5))
    roc_axis.plot(fpr, tpr)
    roc_axis.plot([0, 1], [0, 1], linestyle=":", color="grey")
    roc_axis.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (image level)")
    pr_axis.plot(recall, precision)
    pr_axis.axhline(predictions.labels.mean(), linestyle=":", color="grey")
    pr_axis.set(xlabel="recall", ylabel="precision", title="precision-recall (image level)")
    figure.tight_layout()
    figure.savefig(files["curves"], dpi=100)
    plt.close(figure)
    return files


def plot_overlays(
    predictions: Predictions, dataset: RecordDataset, path: str | Path, count: int = 8
) -> Path | None:
    """Grid of the highest- and lowest-scoring test images with their anomaly maps on top."""
    order = np.argsort(predictions.scores)
    half = max(count // 2, 1)
    chosen = list(order[::-1][:half]) + list(order[:half])
    return plot_examples(predictions, dataset, chosen, path,
                         "highest (left) and lowest (right) scores; green: ground truth; bottom: anomaly map")


def plot_examples(
    predictions: Predictions, dataset: RecordDataset, indices, path: str | Path, title: str
) -> Path | None:
    """Images (top) and their anomaly maps over them (bottom), with ground-truth outlines."""
    if predictions.maps is None or len(indices) == 0:
        return None
    figure, axes = plt.subplots(2, len(indices), figsize=(2.2 * max(len(indices), 2), 4.6), squeeze=False)
    low, high = np.percentile(predictions.maps, [1, 99.9])
    for column, index in enumerate(indices):
        image = dataset[int(index)].image
        if image.ndim == 4:  # a video clip (C, T, H, W): its centre frame is the one scored
            image = image[:, image.shape[1] // 2]
        image = dataset.preprocessing.denormalize(image).permute(1, 2, 0).numpy()
        image = image.squeeze(-1) if image.shape[-1] == 1 else image
        cmap = "gray" if image.ndim == 2 else None
        axes[0, column].imshow(image, cmap=cmap)
        if predictions.masks is not None and predictions.masks[index].any():
            axes[0, column].contour(predictions.masks[index], levels=[0.5], colors="lime", linewidths=0.8)
        axes[0, column].set_title(f"{predictions.defect_types[index]}\nscore {predictions.scores[index]:.3g}",
                                  fontsize=8)
        axes[1, column].imshow(image, cmap=cmap)
        axes[1, column].imshow(predictions.maps[index], cmap="jet", alpha=0.5, vmin=low, vmax=high)
        for axis in axes[:, column]:
            axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def plot_histogram(predictions: Predictions, path: str | Path, threshold: float | None = None) -> Path:
    """Score distributions of normal vs anomalous test images, with the decision threshold."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(predictions.scores, bins=30)
    for label, name, colour in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
        axis.hist(predictions.scores[predictions.labels == label], bins=bins, alpha=0.6, label=name, color=colour)
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", label="threshold")
    axis.set(xlabel="image score", ylabel="images", title="score histogram (test split)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def _write_csv(path: Path, header: tuple[str, ...], rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows((f"{v:.6g}" for v in row) for row in rows)
