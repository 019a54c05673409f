"""Datasets: a registry of kinds (`kinds.py`), their default locations, and one factory for a split.

Importing the package registers every kind (mvtec, cifar10, folder, video).
"""

from __future__ import annotations

import os
from pathlib import Path

from anomaly_models.config import DataConfig
from anomaly_models.data.common import ImageRecord, RecordDataset, Sample, load_image
from anomaly_models.data.kinds import DATASETS, DatasetKind, dataset_kind, register_dataset
from anomaly_models.data.mvtec import MVTecAD
from anomaly_models.data.one_class import CIFAR10_CLASSES, OneClassCIFAR10, OneClassImageFolder
from anomaly_models.data.video import VideoFrameDataset
from anomaly_models.errors import DataError
from anomaly_models.transforms import Preprocessing

__all__ = [
    "CIFAR10_CLASSES", "DATASETS", "DatasetKind", "ImageRecord", "MVTecAD", "OneClassCIFAR10",
    "OneClassImageFolder", "RecordDataset", "Sample", "VideoFrameDataset", "build_dataset",
    "data_root", "dataset_kind", "default_data_root", "load_image", "register_dataset",
]

DATA_DIR_ENV = "ANOMALY_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_root(dataset: str, config: DataConfig | None = None) -> Path:
    """$ANOMALY_DATA_DIR/<folder>, else ../shared/data/<folder> beside the repository (or cwd)."""
    folder = dataset_kind(dataset).default_folder(config)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]) / folder
    for base in (REPO_ROOT, Path.cwd()):
        shared = base.parent / "shared" / "data"
        if shared.is_dir():
            return shared / folder
    raise DataError(
        f"no data directory: pass --data-root, set {DATA_DIR_ENV}, or put the data in ../shared/data"
    )


def data_root(config: DataConfig) -> Path:
    """The folder `config` reads: data.root, else the dataset's default location."""
    return Path(config.root) if config.root else default_data_root(config.dataset, config)


def build_dataset(
    config: DataConfig, split: str, preprocessing: Preprocessing, clip_length: int | None = None
) -> RecordDataset:
    """The dataset named by `config`, for one split, transformed with a model's preprocessing.

    Clip datasets (video) give clips of `clip_length` frames (the model's; None: the default), a
    VideoFrameDataset, which offers what runs use of a RecordDataset (records, labels, has_masks).
    """
    return dataset_kind(config.dataset).build(data_root(config), config, split, preprocessing, clip_length)
