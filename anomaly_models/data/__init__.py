"""Datasets, their default locations, and one factory that builds any of them from a DataConfig."""

from __future__ import annotations

import os
from pathlib import Path

from anomaly_models.config import DataConfig
from anomaly_models.data.common import ImageRecord, RecordDataset, Sample, load_image
from anomaly_models.data.mvtec import MVTecAD
from anomaly_models.data.one_class import CIFAR10_CLASSES, OneClassCIFAR10, OneClassImageFolder
from anomaly_models.errors import DataError
from anomaly_models.transforms import Preprocessing

__all__ = [
    "CIFAR10_CLASSES", "ImageRecord", "MVTecAD", "OneClassCIFAR10", "OneClassImageFolder",
    "RecordDataset", "Sample", "build_dataset", "default_data_root", "load_image",
]

DATA_DIR_ENV = "ANOMALY_DATA_DIR"
# Sub-folder of the data directory that holds each dataset (the layout of ../shared/data).
DATASET_FOLDERS = {"mvtec": "mvtec_ad", "cifar10": "cifar10", "folder": ".", "video": "ucsd_ped2"}
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_root(dataset: str) -> Path:
    """$ANOMALY_DATA_DIR/<folder>, else ../shared/data/<folder> beside the repository (or cwd)."""
    if dataset not in DATASET_FOLDERS:
        raise DataError(f"unknown dataset {dataset!r} (allowed: {', '.join(DATASET_FOLDERS)})")
    folder = DATASET_FOLDERS[dataset]
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]) / folder
    for base in (REPO_ROOT, Path.cwd()):
        shared = base.parent / "shared" / "data"
        if shared.is_dir():
            return shared / folder
    raise DataError(
        f"no data directory: pass --data-root, set {DATA_DIR_ENV}, or put the data in ../shared/data"
    )


def build_dataset(
    config: DataConfig, split: str, preprocessing: Preprocessing, clip_length: int | None = None
) -> RecordDataset:
    """The dataset named by `config`, for one split, transformed with a model's preprocessing.

    Video data gives clips of `clip_length` frames (the model's; None: VideoFrameDataset's default),
    a VideoFrameDataset, which offers what runs use of a RecordDataset (records, labels, has_masks).
    """
    root = Path(config.root) if config.root else default_data_root(config.dataset)
    common = dict(
        split=split, preprocessing=preprocessing, val_fraction=config.val_fraction,
        seed=config.split_seed, on_bad_image=config.on_bad_image, cache=config.cache_images,
    )
    if config.dataset == "mvtec":
        return MVTecAD(root, config.category, **common)
    if config.dataset == "cifar10":
        return OneClassCIFAR10(root, config.normal_class, **common)
    if config.dataset == "folder":
        return OneClassImageFolder(root, config.normal_class, **common)
    if config.dataset == "video":
        from anomaly_models.memae.video_data import VideoFrameDataset  # memae imports this package

        stride = config.clip_stride_test if split == "test" else config.clip_stride_train
        length = {} if clip_length is None else {"clip_length": clip_length}
        return VideoFrameDataset(root, split, preprocessing, stride=stride, val_fraction=config.val_fraction,
                                 seed=config.split_seed, cache=config.cache_images, **length)
    raise DataError(f"unknown dataset {config.dataset!r} (allowed: {', '.join(DATASET_FOLDERS)})")
