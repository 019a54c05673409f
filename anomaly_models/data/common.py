"""What every dataset shares: the sample layout, safe image loading and the folder-backed dataset.

A dataset is a list of `ImageRecord`s (where an image comes from, its label, its mask) plus the
`Preprocessing` of the model that reads it. Loading errors name the file; with
`on_bad_image="skip"` every image is decoded once up front and the unreadable ones are left out
with a warning, so one bad file does not stop a run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from anomaly_models.errors import DataError
from anomaly_models.transforms import Preprocessing

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_THRESHOLD = 128  # mask pixels >= this (of 255) are anomalous; tolerates JPEG-compressed masks


class Sample(NamedTuple):
    """One item of every dataset; torch's default collate batches it field by field."""

    image: torch.Tensor  # (C, H, W) float, normalised by the model's Preprocessing
    label: int  # 0 normal, 1 anomalous
    mask: torch.Tensor  # (H, W) uint8 in {0, 1}; all zeros for normal or unknown
    path: str  # where the image came from (file, or archive#index)
    defect_type: str  # "good" for normal images, else the defect or class name


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """Where one image comes from; `pixels` holds it when it lives inside an archive file."""

    path: str
    label: int
    defect_type: str
    mask_path: str | None = None
    pixels: np.ndarray | None = None


def class_folders(folder: Path) -> tuple[str, ...]:
    """The class names of a class-folder layout: the sub-folders of `folder`, sorted."""
    return tuple(sorted(d.name for d in folder.iterdir() if d.is_dir()))


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted so that splits are reproducible."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, turning any decoding failure into a DataError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None


def split_normal(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split of normal training items into (train, val); order within each is kept."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * len(items))) if len(items) > 1 else 0
    if val_fraction > 0 and len(items) > 1:
        n_val = max(1, n_val)
    held_out = set(np.random.default_rng(seed).permutation(len(items))[:n_val].tolist())
    train = [item for i, item in enumerate(items) if i not in held_out]
    val = [item for i, item in enumerate(items) if i in held_out]
    return train, val


class RecordDataset(Dataset):
    """A map-style dataset over image records, transformed by a model's Preprocessing."""

    def __init__(
        self,
        records: list[ImageRecord],
        preprocessing: Preprocessing,
        on_bad_image: Literal["error", "skip"] = "error",
        has_masks: bool = False,
        cache: bool = False,
    ):
        if on_bad_image not in ("error", "skip"):
            raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.preprocessing = preprocessing
        self.has_masks = has_masks
        self.records = list(records)
        self.skipped: list[str] = []  # paths left out because they could not be read
        # Preprocessing is deterministic, so an epoch-after-epoch reader can keep the tensors
        # instead of decoding and resizing every image again.
        self._cache: dict[int, Sample] | None = {} if cache else None
        if on_bad_image == "skip":
            self.records = self._readable(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        record = self.records[index]
        image = self._image(record)
        mask = self._mask(record, image.size)
        tensor, mask_tensor = self.preprocessing(image, mask)
        if mask_tensor is None:
            size = self.preprocessing.output_size
            mask_tensor = torch.zeros((size, size), dtype=torch.uint8)
        sample = Sample(tensor, record.label, mask_tensor, record.path, record.defect_type)
        if self._cache is not None:
            self._cache[index] = sample
        return sample

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def scored_records(self) -> list[ImageRecord]:
        """The images the metrics are over (every one; a clip dataset scores one frame per clip)."""
        return self.records

    @staticmethod
    def _image(record: ImageRecord) -> Image.Image:
        if record.pixels is not None:
            return Image.fromarray(record.pixels)
        return load_image(record.path)

    @staticmethod
    def _mask(record: ImageRecord, image_size: tuple[int, int]) -> Image.Image | None:
        if record.mask_path is None:
            return None
        mask = load_image(record.mask_path).convert("L")
        if mask.size != image_size:
            raise DataError(
                f"mask {record.mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
                f"{record.path} is {image_size[0]}x{image_size[1]}"
            )
        binary = (np.asarray(mask) >= MASK_THRESHOLD).astype(np.uint8)
        return Image.fromarray(binary)

    def unreadable(self, records: list[ImageRecord] | None = None) -> dict[str, str]:
        """Decode every image and mask once; {path: reason} for those that fail."""
        failures = {}
        for record in self.records if records is None else records:
            try:
                self._mask(record, self._image(record).size)
            except DataError as error:
                failures[record.path] = str(error)
        return failures

    def _readable(self, records: list[ImageRecord]) -> list[ImageRecord]:
        failures = self.unreadable(records)
        for path, reason in failures.items():
            warnings.warn(f"skipping {path}: {reason}", stacklevel=3)
        self.skipped = list(failures)
        return [r for r in records if r.path not in failures]

def check_folder(path: Path, what: str, hint: str | Callable[[], str] = "") -> Path:
    """Raise a DataError naming `path` when the folder is missing."""
    if not path.is_dir():
        extra = hint() if callable(hint) else hint
        raise DataError(f"{what} not found: {path}{' (' + extra + ')' if extra else ''}")
    return path
