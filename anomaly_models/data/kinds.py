"""Dataset kinds: each layout the project reads is one class here, registered under its name.

A kind knows everything callers used to switch on `data.dataset` for: its folder in a data
directory, what a run is about (its subject: an MVTec category, a normal class, a video set), the
sub-folder that holds that subject's files (what is copied into the DVC-tracked `data/<dataset>`),
how to build a split, how to fetch it from its official source, where new normal images go, what
it gives (images or clips) and any metrics of its own protocol. Adding a dataset is one module that
defines a kind and decorates it with `register_dataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from anomaly_models.errors import DataError

if TYPE_CHECKING:
    from anomaly_models.config import DataConfig
    from anomaly_models.transforms import Preprocessing

DATASETS: dict[str, "DatasetKind"] = {}


class DatasetKind:
    """One folder layout. Subclasses set the class attributes and `build`; the rest has defaults."""

    name: ClassVar[str]
    folder: ClassVar[str]  # its sub-folder of a data directory ($ANOMALY_DATA_DIR, ../shared/data)
    subject_key: ClassVar[str]  # the DataConfig key naming what a run is about
    gives: ClassVar[str] = "images"  # or "clips": which methods can read it (AnomalyModel.input)
    refuses_new_images: ClassVar[str | None] = None  # why the retrain inbox cannot feed it, if it cannot

    def default_folder(self, config: "DataConfig | None" = None) -> str:
        """Where this dataset lies in a data directory when no data.root is given."""
        return self.folder

    def subject(self, config: "DataConfig") -> str:
        return str(getattr(config, self.subject_key))

    def subject_folder(self, config: "DataConfig") -> str:
        """The part of the dataset's root a run reads ('.' = all of it): what is copied or fetched."""
        return "."

    def build(self, root: Path, config: "DataConfig", split: str, preprocessing: "Preprocessing",
              clip_length: int | None = None) -> Any:
        raise NotImplementedError

    def is_present(self, root: Path, config: "DataConfig") -> bool:
        return (root / self.subject_folder(config)).is_dir()

    def fetch(self, root: Path, config: "DataConfig") -> Path:
        """Download the subject's files into `root` from the official source, if there is one."""
        raise DataError(f"no {self.name} data in {root / self.subject_folder(config)}, and no official "
                        f"source to download it from: point data.root (or --data-root) at it")

    def normal_train_folder(self, root: Path, config: "DataConfig") -> Path:
        """The folder of normal training images, where the retrain inbox adds new ones."""
        self.check_new_images()
        raise DataError(f"cannot add images to {root}: {self.name} data takes no new training images")

    def check_new_images(self) -> None:
        """Refuse the retrain inbox before any work when this layout cannot take new normal images."""
        if self.refuses_new_images:
            raise DataError(f"data.dataset {self.name}: {self.refuses_new_images}")

    def check(self, config: "DataConfig") -> None:
        """Refuse settings this layout cannot honour (called when params are validated)."""

    def protocol_metrics(self, predictions: Any, test_set: Any) -> dict[str, float]:
        """Metrics of this dataset's own evaluation protocol, beside the common ones."""
        return {}


def register_dataset(cls: type[DatasetKind]) -> type[DatasetKind]:
    """Class decorator adding a dataset kind to the registry under its `name`."""
    DATASETS[cls.name] = cls()
    return cls


def dataset_kind(name: str) -> DatasetKind:
    from anomaly_models import data  # noqa: F401  (importing the package registers every kind)

    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (allowed: {', '.join(sorted(DATASETS))})")
    return DATASETS[name]
