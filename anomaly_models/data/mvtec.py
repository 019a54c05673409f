"""MVTec AD layout, for the official categories and for any product folder laid out the same way.

    <root>/<category>/train/good/*.png              normal training images
    <root>/<category>/test/good/*.png               normal test images
    <root>/<category>/test/<defect>/*.png           anomalous test images
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Splits: "train" and "val" are a seeded partition of train/good (normal images only, so thresholds
and model selection never see the test set); "test" is everything under test/. A product without a
ground_truth/ folder is fine (masks are then unknown and pixel metrics are skipped); a ground_truth/
folder that lacks the mask of one defective image is an error naming the missing file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from anomaly_models.data.common import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    RecordDataset,
    check_folder,
    list_images,
    split_normal,
)
from anomaly_models.data.kinds import DatasetKind, register_dataset
from anomaly_models.errors import DataError
from anomaly_models.transforms import Preprocessing

NORMAL = "good"
Split = Literal["train", "val", "test"]


class MVTecAD(RecordDataset):
    """One category of an MVTec-AD-layout dataset."""

    def __init__(
        self,
        root: str | Path,
        category: str,
        split: Split,
        preprocessing: Preprocessing | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        on_bad_image: Literal["error", "skip"] = "error",
        cache: bool = False,
    ):
        root = Path(root)
        check_folder(root, "MVTec data root")
        self.category_dir = check_folder(
            root / category, f"category {category!r}", lambda: _available(root)
        )
        self.category = category
        if split in ("train", "val"):
            records = self._normal_train_records(val_fraction, seed, split)
            has_masks = False
        elif split == "test":
            records, has_masks = self._test_records()
        else:
            raise DataError(f"unknown split {split!r} (allowed: train, val, test)")
        super().__init__(records, preprocessing or Preprocessing(), on_bad_image, has_masks, cache)

    def _normal_train_records(self, val_fraction: float, seed: int, split: str) -> list[ImageRecord]:
        folder = check_folder(self.category_dir / "train" / NORMAL, "training folder")
        images = list_images(folder)
        if not images:
            raise DataError(f"no images in {folder} (expected {', '.join(IMAGE_EXTENSIONS)} files)")
        train, val = split_normal(images, val_fraction, seed)
        chosen = train if split == "train" else val
        return [ImageRecord(str(p), 0, NORMAL) for p in chosen]

    def _test_records(self) -> tuple[list[ImageRecord], bool]:
        test_dir = check_folder(self.category_dir / "test", "test folder")
        gt_dir = self.category_dir / "ground_truth"
        has_masks = gt_dir.is_dir()
        records = []
        for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
            defect = defect_dir.name
            for path in list_images(defect_dir):
                if defect == NORMAL:
                    records.append(ImageRecord(str(path), 0, NORMAL))
                else:
                    mask = _find_mask(gt_dir / defect, path.stem) if has_masks else None
                    records.append(ImageRecord(str(path), 1, defect, mask))
        if not records:
            raise DataError(f"no test images under {test_dir}")
        return records, has_masks


def _find_mask(folder: Path, stem: str) -> str:
    """The official name is <stem>_mask.png; other extensions and a bare <stem> are accepted."""
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            candidate = folder / f"{name}{ext}"
            if candidate.is_file():
                return str(candidate)
    raise DataError(f"mask not found: {folder / (stem + '_mask.png')}")


def _available(root: Path) -> str:
    names = sorted(d.name for d in root.iterdir() if (d / "train" / NORMAL).is_dir())
    return f"available categories: {', '.join(names) or 'none'}"


@register_dataset
class MVTecKind(DatasetKind):
    """`<root>/<category>/...`: a run reads one category folder, fetched per category."""

    name = "mvtec"
    folder = "mvtec_ad"
    subject_key = "category"

    def subject_folder(self, config) -> str:
        return config.category

    def build(self, root, config, split, preprocessing, clip_length=None) -> MVTecAD:
        return MVTecAD(root, config.category, split, preprocessing, config.val_fraction, config.split_seed,
                       config.on_bad_image, config.cache_images)

    def fetch(self, root, config) -> Path:
        from anomaly_models.data.download import download_dataset

        return download_dataset("mvtec", root, category=config.category)

    def normal_train_folder(self, root, config) -> Path:
        return Path(root) / config.category / "train" / NORMAL
