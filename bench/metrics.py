"""Time the pixel metrics on a full MVTec AD test set against scikit-learn's roc_auc_score.

Real ground-truth masks (normal images: all-zero masks), synthetic anomaly maps (the mask blurred
and scaled per image, plus smooth and pixel noise; seeded) so that the metric values are
meaningful. Timed at the resolution on disk (512 px in the bundled data) and at the original
MVTec AD resolution of 900 px (masks upsampled with NEAREST).

    python bench/metrics.py [--data-root DIR] [--category bottle] [--sizes 512 900] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from anomaly_models.metrics import pixel_metrics  # noqa: E402
from entry import run  # noqa: E402  (bench/entry.py)


def default_data_root() -> Path:
    return Path(os.environ.get("ANOMALY_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")


def load_masks(category_dir: Path, size: int) -> np.ndarray:
    """(N, size, size) bool masks of every test image, in sorted defect/file order."""
    masks = []
    for defect_dir in sorted(p for p in (category_dir / "test").iterdir() if p.is_dir()):
        for image_path in sorted(defect_dir.glob("*.png")):
            if defect_dir.name == "good":
                masks.append(np.zeros((size, size), dtype=bool))
                continue
            mask_path = category_dir / "ground_truth" / defect_dir.name / f"{image_path.stem}_mask.png"
            if not mask_path.is_file():
                sys.exit(f"error: mask not found: {mask_path}")
            mask = Image.open(mask_path).convert("L")
            if mask.size != (size, size):
                mask = mask.resize((size, size), Image.NEAREST)
            masks.append(np.asarray(mask) >= 128)
    if not masks:
        sys.exit(f"error: no test images (*.png) under {category_dir / 'test'}")
    return np.stack(masks)


def synthetic_maps(masks: np.ndarray, seed: int) -> np.ndarray:
    """Imperfect float32 anomaly maps: blurred, randomly weakened masks plus smooth and pixel noise."""
    rng = np.random.default_rng(seed)
    size = masks.shape[-1]
    maps = np.empty(masks.shape, dtype=np.float32)
    for i, mask in enumerate(masks):
        signal = ndimage.gaussian_filter(mask.astype(np.float32), sigma=0.015 * size) * rng.uniform(0.3, 1.0)
        smooth_noise = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 0.01 * size)
        smooth_noise *= 0.15 / smooth_noise.std()  # same noise level at every resolution
        maps[i] = signal + smooth_noise + 0.05 * rng.standard_normal((size, size), dtype=np.float32)
    return maps


def best_time(function, repeat: int):
    """Smallest wall time over `repeat` calls, and the last result."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=default_data_root(),
                        help="folder holding mvtec_ad/ (default: $ANOMALY_DATA_DIR, else ../shared/data "
                             "next to the repository)")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 900], help="square resolutions to time")
    parser.add_argument("--repeat", type=int, default=1, help="time each call this many times, keep the fastest")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    category_dir = args.data_root / "mvtec_ad" / args.category
    if not (category_dir / "test").is_dir():
        parser.error(f"MVTec AD test folder not found: {category_dir / 'test'} "
                     "(set --data-root or ANOMALY_DATA_DIR to the folder holding mvtec_ad/)")

    print(f"{args.category}: pixel_metrics vs sklearn roc_auc_score, best of {args.repeat}, "
          f"{os.cpu_count()} CPUs")
    header = (f"{'size':>5} {'images':>6} {'pixels':>11} {'ours s':>7} {'sklearn s':>9} {'speed-up':>8} "
              f"{'AUROC ours':>11} {'AUROC sklearn':>13} {'|diff|':>8} {'AUPRO':>7} {'F1-max':>7}")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        masks = load_masks(category_dir, size)
        maps = synthetic_maps(masks, args.seed)
        ours_s, ours = best_time(lambda: pixel_metrics(masks, maps), args.repeat)
        sklearn_s, sklearn_auroc = best_time(lambda: roc_auc_score(masks.ravel(), maps.ravel()), args.repeat)
        print(f"{size:>5} {len(masks):>6} {masks.size:>11,} {ours_s:>7.2f} {sklearn_s:>9.2f} "
              f"{sklearn_s / ours_s:>7.1f}x {ours['pixel_auroc']:>11.6f} {sklearn_auroc:>13.6f} "
              f"{abs(ours['pixel_auroc'] - sklearn_auroc):>8.1e} "
              f"{ours['aupro']:>7.4f} {ours['pixel_f1_max']:>7.4f}", flush=True)
        del masks, maps


if __name__ == "__main__":
    run(main)
