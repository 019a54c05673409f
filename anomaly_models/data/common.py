"""What every dataset shares: the sample layout, safe image loading and the folder-backed dataset.

A dataset is a list of `ImageRecord`s (where an image comes from, its label, its mask) plus the
`Preprocessing` of the model that reads it. `load_image` is the one way every door (train,
prepare, predict, the retrain inbox, serving) reads an image; its errors name the file. With
`on_bad_image="skip"` every image is decoded once up front and the unreadable ones are left out
with a warning, so one bad file does not stop a run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from anomaly_models.errors import DataError
from anomaly_models.files import display_path
from anomaly_models.transforms import Preprocessing

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused before decoding, wherever they are read
EIGHT_BIT_MODES = ("1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N")
# PIL warns (a stray stderr line) about images between its own pixel limit and twice that, and
# raises above; both are far above ours, and both end as the same DataError. Set once, not per
# call: warnings.catch_warnings is not thread-safe, and predict decodes in threads.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
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


def load_image(source: str | Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Open and fully decode an image (a path, or a binary stream called `name` in messages).

    Every way this can fail is a DataError naming the image, never PIL's own exception: missing or
    unreadable, not an image, damaged or truncated, too large (refused from the header, before
    decoding: a decompression bomb), a pixel format that cannot become 8-bit without changing what
    it shows, or a file name that is not UTF-8 (it could not be written to a manifest or a CSV).
    16-bit grayscale keeps its high byte, as PIL does for 16-bit colour; the result is 8-bit.
    """
    if name is None:
        name = display_path(source)
        if name != str(source):
            raise DataError(f"file name is not valid UTF-8: {name} (rename the file)")
    try:
        with Image.open(source) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DataError(f"image {name} is {image.width}x{image.height}, above the limit of "
                                f"{MAX_IMAGE_PIXELS} pixels (a decompression bomb?)")
            image.load()
            return _eight_bit(image, name)
    except FileNotFoundError:
        raise DataError(f"image not found: {name}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image {name} is above the limit of {MAX_IMAGE_PIXELS} pixels "
                        "(a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {name}: not an image format PIL reads") from None
    except (IsADirectoryError, PermissionError) as error:
        raise DataError(f"cannot read image {name}: {error.strerror}") from None
    except DataError:
        raise
    except Exception as error:  # PIL's decoders raise many types (OSError, SyntaxError, ...) for damaged data
        raise DataError(f"cannot read image {name}: damaged or truncated ({error})") from None


def _eight_bit(image: Image.Image, name: str) -> Image.Image:
    """The decoded image in an 8-bit mode; formats PIL would clip or misread are refused."""
    if image.mode in SIXTEEN_BIT_GRAY:  # PIL's convert("L") clips these at 255
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode not in EIGHT_BIT_MODES:
        raise DataError(f"image {name} has pixel format {image.mode!r}, which cannot be converted to "
                        "8-bit without changing it: save it as 8- or 16-bit grayscale or colour")
    return image.copy()


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
