"""The selection split of the one-class benches: train-split images for comparing settings.

The normal class's held-out part (label 0) against every other class's held-out part (label 1):
none of them is trained on, none is a test image, so a setting chosen on it is not chosen on the
test split.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from anomaly_models.data.common import RecordDataset
from anomaly_models.transforms import Preprocessing


def selection_set(dataset_class, root: Path, normal: str, classes: tuple[str, ...], pre: Preprocessing):
    """Held-out images of every class of `classes`, labelled anomalous unless of class `normal`."""
    records = []
    for cls in classes:
        held_out = dataset_class(root, cls, "val", pre).records
        records += [replace(r, label=int(cls != normal)) for r in held_out]
    return RecordDataset(records, pre, cache=True)
