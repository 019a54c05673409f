"""One-class protocol on a labelled classification dataset (CIFAR-10, MNIST, your own classes).

One class is "normal": training uses only its training images (minus a seeded validation part);
the test set is every test image, label 0 for the normal class and 1 for all others. This is the
standard protocol of Deep SVDD, MemAE and Mean-Shifted Contrastive (train: the 5,000 images of the
normal class; test: all 10,000 CIFAR-10 test images).

Two layouts are read:
    <root>/{train,test}/<class>/*.{png,jpg}      class folders (any classes)
    <root>/cifar-10-batches-py/                  the official CIFAR-10 python pickles
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np

from anomaly_models.data.common import (
    ImageRecord, RecordDataset, check_folder, class_folders, list_images, split_normal,
)
from anomaly_models.data.kinds import DatasetKind, register_dataset
from anomaly_models.errors import DataError
from anomaly_models.transforms import Preprocessing

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_BATCHES = "cifar-10-batches-py"
Split = Literal["train", "val", "test"]


class OneClassDataset(RecordDataset):
    """One-class split of labelled records; subclasses only say where the records come from."""

    classes: tuple[str, ...]

    def __init__(
        self,
        train_records: list[ImageRecord],
        test_records: list[ImageRecord],
        classes: tuple[str, ...],
        normal_class: str | int,
        split: Split,
        preprocessing: Preprocessing | None,
        val_fraction: float,
        seed: int,
        on_bad_image: Literal["error", "skip"],
        cache: bool,
    ):
        self.classes = classes
        self.normal_class = resolve_class(normal_class, classes)
        if split in ("train", "val"):
            normal = [r for r in train_records if r.defect_type == self.normal_class]
            if not normal:
                raise DataError(f"no training images of normal class {self.normal_class!r}")
            train, val = split_normal(normal, val_fraction, seed)
            chosen = train if split == "train" else val
        elif split == "test":
            chosen = test_records
        else:
            raise DataError(f"unknown split {split!r} (allowed: train, val, test)")
        records = [
            ImageRecord(r.path, int(r.defect_type != self.normal_class), r.defect_type, None, r.pixels)
            for r in chosen
        ]
        super().__init__(records, preprocessing or Preprocessing(), on_bad_image, False, cache)


class OneClassImageFolder(OneClassDataset):
    """Class-folder layout `<root>/{train,test}/<class>/*`: the classes are the folder names."""

    def __init__(
        self,
        root: str | Path,
        normal_class: str | int,
        split: Split,
        preprocessing: Preprocessing | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        on_bad_image: Literal["error", "skip"] = "error",
        cache: bool = False,
        classes: tuple[str, ...] | None = None,
    ):
        root = Path(root)
        train_dir = check_folder(root / "train", "class-folder training set")
        classes = classes or class_folders(train_dir)
        super().__init__(
            _folder_records(train_dir, classes),
            _folder_records(check_folder(root / "test", "class-folder test set"), classes)
            if split == "test" else [],
            classes, normal_class, split, preprocessing, val_fraction, seed, on_bad_image, cache,
        )


class OneClassCIFAR10(OneClassDataset):
    """One-class CIFAR-10 from the official python pickles or from class folders of images."""

    def __init__(
        self,
        root: str | Path,
        normal_class: str | int,
        split: Split,
        preprocessing: Preprocessing | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        on_bad_image: Literal["error", "skip"] = "error",
        cache: bool = False,
    ):
        root = Path(root)
        batches = _find_batches(root)
        if batches is not None:
            train = _pickle_records(batches, [f"data_batch_{i}" for i in range(1, 6)])
            test = _pickle_records(batches, ["test_batch"]) if split == "test" else []
        elif (root / "train").is_dir():
            train_dir = root / "train"
            train = _folder_records(train_dir, CIFAR10_CLASSES)
            test = _folder_records(check_folder(root / "test", "CIFAR-10 test folder"), CIFAR10_CLASSES) \
                if split == "test" else []
        else:
            raise DataError(
                f"no CIFAR-10 found in {root}: expected {root / CIFAR10_BATCHES}/ (official python "
                f"version) or {root}/train/<class>/ and {root}/test/<class>/ image folders"
            )
        super().__init__(
            train, test, CIFAR10_CLASSES, normal_class, split, preprocessing, val_fraction, seed,
            on_bad_image, cache,
        )


def resolve_class(name: str | int, classes: tuple[str, ...]) -> str:
    """Accept a class name or its index (as int or digit string); name the allowed ones otherwise."""
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit() and name not in classes):
        index = int(name)
        if 0 <= index < len(classes):
            return classes[index]
    elif name in classes:
        return name
    raise DataError(f"unknown class {name!r} (allowed: {', '.join(classes)})")


def _folder_records(split_dir: Path, classes: tuple[str, ...]) -> list[ImageRecord]:
    records = []
    for name in classes:
        folder = check_folder(split_dir / name, f"class folder {name!r}")
        records += [ImageRecord(str(p), 0, name) for p in list_images(folder)]
    return records


def _find_batches(root: Path) -> Path | None:
    for candidate in (root / CIFAR10_BATCHES, root):
        if (candidate / "data_batch_1").is_file():
            return candidate
    return None


def _pickle_records(folder: Path, names: list[str]) -> list[ImageRecord]:
    records = []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = batch[b"labels"]
        except FileNotFoundError:
            raise DataError(f"CIFAR-10 batch file not found: {path}") from None
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
            raise DataError(f"cannot read CIFAR-10 batch {path}: {error}") from None
        records += [
            ImageRecord(f"{path}#{i}", 0, CIFAR10_CLASSES[label], None, pixels)
            for i, (pixels, label) in enumerate(zip(data, labels))
        ]
    return records


@register_dataset
class FolderKind(DatasetKind):
    """`<root>/{train,test}/<class>/*`, one class normal (MNIST, your own classes)."""

    name = "folder"
    folder = "."
    subject_key = "normal_class"

    def build(self, root, config, split, preprocessing, clip_length=None) -> OneClassImageFolder:
        return OneClassImageFolder(root, config.normal_class, split, preprocessing, config.val_fraction,
                                   config.split_seed, config.on_bad_image, config.cache_images)

    def is_present(self, root, config) -> bool:
        return (Path(root) / "train").is_dir()

    def normal_train_folder(self, root, config) -> Path:
        folder = Path(root) / "train"
        return folder / resolve_class(config.normal_class, class_folders(check_folder(folder, "training set")))


@register_dataset
class CIFAR10Kind(FolderKind):
    """CIFAR-10 as class folders or the official pickles (which take no new images)."""

    name = "cifar10"
    folder = "cifar10"

    def build(self, root, config, split, preprocessing, clip_length=None) -> OneClassCIFAR10:
        return OneClassCIFAR10(root, config.normal_class, split, preprocessing, config.val_fraction,
                               config.split_seed, config.on_bad_image, config.cache_images)

    def is_present(self, root, config) -> bool:
        return (Path(root) / "train").is_dir() or _find_batches(Path(root)) is not None

    def fetch(self, root, config) -> Path:
        from anomaly_models.data.download import download_dataset

        download_dataset("cifar10", root)
        return Path(root)

    def normal_train_folder(self, root, config) -> Path:
        if not (Path(root) / "train").is_dir():
            raise DataError(f"cannot add images to {root}: the CIFAR-10 pickles take no new images "
                            "(use the class-folder layout)")
        return Path(root) / "train" / resolve_class(config.normal_class, CIFAR10_CLASSES)
