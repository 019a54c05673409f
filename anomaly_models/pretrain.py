"""Supervised pretraining of a backbone, for users who bring no weights at all.

The backbone (random initialisation) plus a linear head on its penultimate features is trained
with cross-entropy to classify the images of a labelled class-folder dataset
(`<root>/train/<class>/*`, e.g. MNIST or CIFAR-10 class folders), with a seeded held-out part of
each class for accuracy. Only the backbone's state dict is saved (the head is thrown away), with
exactly the keys `build_backbone(name, path)` checks, so MSC or PatchCore load it like any other
weights file; `<out>.json` beside it records the classes, accuracy, settings and a fingerprint, so
a re-run with the same settings is skipped.

The pretraining data must not be the anomaly task's own: it never reads a `test/` folder, and it
refuses a dataset root that is the task's data while its classes include the normal class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from anomaly_models.backbones import Backbone, backbone_preprocessing, build_backbone, to_three_channels
from anomaly_models.config import DataConfig, PretrainConfig, to_dict
from anomaly_models.data import data_root
from anomaly_models.data.common import (
    ImageRecord, RecordDataset, check_folder, class_folders, list_images, split_normal,
)
from anomaly_models.errors import AnomalyError, ConfigError, DataError
from anomaly_models.files import atomic_torch_save, atomic_write_text, file_sha256
from anomaly_models.training import (
    EpochCheckpoint, TrainingDiverged, resolve_device, run_epochs, seed_everything, seeded,
)
from anomaly_models.transforms import Preprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledData:
    classes: tuple[str, ...]
    train: list[ImageRecord]  # label = class index
    val: list[ImageRecord]


class Classifier(nn.Module):
    """Backbone penultimate features -> linear head: the network pretraining optimises."""

    def __init__(self, backbone: Backbone, num_classes: int, image_size: int):
        super().__init__()
        self.backbone = backbone.eval()  # eval: BatchNorm takes the one-image probe below
        with torch.no_grad():  # the feature width, whatever the backbone
            width = self.features(torch.zeros(1, 3, image_size, image_size)).shape[1]
        self.head = nn.Linear(width, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        *_, (_, last) = self.backbone.stages(to_three_channels(images))
        return self.backbone.penultimate(last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class PretrainResult:
    path: Path  # the backbone state dict
    sidecar: Path  # <path>.json: classes, accuracy, settings, fingerprint
    summary: dict[str, Any]
    skipped: bool  # True when an identical finished pretraining was already there
    network: Classifier | None = None  # the trained classifier (None when skipped)


def sidecar_path(out: str | Path) -> Path:
    """`<out>.json`, the description written beside the weights file."""
    return Path(f"{out}.json")


def mark_disabled(out: str | Path) -> Path:
    """With `pretrain.enabled: false`, only a small `<out>.json` saying so (a pipeline stage's output)."""
    return atomic_write_text(sidecar_path(out), json.dumps({"enabled": False}, indent=2) + "\n")


def pretraining_preprocessing(config: PretrainConfig) -> Preprocessing:
    """The backbone's own transform (its statistics), resized to `image_size` when one is given."""
    preprocessing = backbone_preprocessing(config.backbone)
    if config.image_size is None:
        return preprocessing
    return replace(preprocessing, image_size=config.image_size, crop_size=None)


def labelled_data(config: PretrainConfig) -> LabelledData:
    """The chosen classes' training images, split per class into train and val; `test/` is never read."""
    train_dir = check_folder(Path(config.root) / "train", "pretrain.root: class-folder training set",
                             "expected <root>/train/<class>/ image folders")
    found = class_folders(train_dir)
    for key, names in (("classes", config.classes or ()), ("exclude_classes", config.exclude_classes)):
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ConfigError(f"pretrain.{key}: {unknown[0]!r} is not a class folder of {train_dir} "
                              f"(found: {', '.join(found) or 'none'})")
    classes = tuple(c for c in (config.classes or found) if c not in config.exclude_classes)
    if len(classes) < 2:
        raise ConfigError(f"pretrain.classes: a classifier needs at least 2 classes, {train_dir} gives "
                          f"{list(classes)} after pretrain.exclude_classes")
    rng = np.random.default_rng(config.seed)
    train, val = [], []
    for index, name in enumerate(classes):
        files = list_images(train_dir / name)
        if not files:
            raise DataError(f"class folder {train_dir / name} holds no images")
        if config.max_images_per_class and len(files) > config.max_images_per_class:
            keep = np.sort(rng.permutation(len(files))[:config.max_images_per_class])
            files = [files[i] for i in keep]
        records = [ImageRecord(str(path), index, name) for path in files]
        class_train, class_val = split_normal(records, config.val_fraction, config.seed)
        train += class_train
        val += class_val
    return LabelledData(classes, train, val)


def check_not_task_data(config: PretrainConfig, classes: tuple[str, ...], data: DataConfig) -> None:
    """Refuse to pretrain on the anomaly task's own dataset when that includes its normal class."""
    try:
        root = data_root(data)
    except DataError:  # no anomaly data configured on this machine: nothing to overlap with
        return
    task_root = root / data.kind.subject_folder(data)
    if Path(config.root).resolve() != task_root.resolve():
        return
    try:  # the folder name of its normal training images: MVTec's 'good', or the normal class
        normal = data.kind.normal_train_folder(root, data).name
    except DataError:
        normal = str(data.normal_class)
    if normal in classes:
        raise ConfigError(
            f"pretrain.root: {config.root} is the anomaly task's own data and the pretraining classes "
            f"include its normal class {normal!r}; add it to pretrain.exclude_classes or pretrain on "
            "another dataset"
        )
    log.warning("pretraining on the other classes of the task's dataset (%s): they are its test "
                "anomalies, so results are not comparable to the one-class protocol", config.root)


def fingerprint(config: PretrainConfig, data: LabelledData) -> str:
    """Hash of everything that defines the pretraining (settings, root, classes, images)."""
    settings = {k: v for k, v in to_dict(config).items() if k not in ("enabled", "out", "num_workers")}
    identity = {"settings": settings, "root": str(Path(config.root).resolve()), "classes": data.classes,
                "train": [r.path for r in data.train], "val": [r.path for r in data.val]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def pretrain_backbone(
    config: PretrainConfig, data: DataConfig, out: str | Path | None = None, resume: bool = True
) -> PretrainResult:
    """Train `config.backbone` as a classifier and save its state dict to `out` (default
    `config.out`); an up-to-date file with the same fingerprint is kept, not retrained.

    `data` is the anomaly task's data, checked not to be the pretraining set. Each epoch's state
    goes to `<out>.partial`, so a killed run resumes.
    """
    if not config.root:
        raise ConfigError("pretrain.root: set the labelled class-folder dataset to pretrain on")
    out = Path(out or config.out)
    sidecar = sidecar_path(out)
    labelled = labelled_data(config)
    check_not_task_data(config, labelled.classes, data)
    identity = fingerprint(config, labelled)
    if resume and _up_to_date(out, sidecar, identity):
        return PretrainResult(out, sidecar, json.loads(sidecar.read_text()), skipped=True)

    device = resolve_device(config.device, "pretrain.device")
    preprocessing = pretraining_preprocessing(config)
    size = preprocessing.output_size
    with seeded(config.seed):  # the same settings always start from the same weights
        backbone = build_backbone(config.backbone, "none").requires_grad_(True)  # nothing frozen
        classifier = Classifier(backbone, len(labelled.classes), size).to(device)
    train_set = RecordDataset(labelled.train, preprocessing)
    val_set = RecordDataset(labelled.val, preprocessing)
    train_loader = DataLoader(
        train_set, batch_size=config.batch_size, shuffle=True, generator=seed_everything(config.seed),
        num_workers=config.num_workers, drop_last=len(train_set) > config.batch_size,
    )
    val_loader = DataLoader(val_set, batch_size=config.batch_size, num_workers=config.num_workers)
    optimizer = _optimizer(config, classifier)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs)
                 if config.lr_schedule == "cosine" else None)
    augment = _augmentation(config, size)

    def step(batch: tuple[torch.Tensor, torch.Tensor]):
        images, labels = batch
        if classifier.training:
            images = torch.stack([augment(image) for image in images])
        logits = classifier(images)
        return F.cross_entropy(logits, labels), {"accuracy": _correct(logits, labels) / len(labels)}

    def val_accuracy(epoch: int, record: dict) -> None:
        if len(val_set):
            record["val_accuracy"] = accuracy(classifier, val_loader, device)

    print(f"pretraining {config.backbone} on {len(train_set)} images of {len(labelled.classes)} "
          f"classes ({len(val_set)} held out) from {config.root}")
    progress = EpochCheckpoint(f"{out}.partial", identity)
    started = time.perf_counter()
    try:
        history = run_epochs(
            classifier, optimizer, step, train_loader, val_loader, config.epochs, device,
            config.mixed_precision, scheduler, val_accuracy, progress if resume else None, "pretrain",
            step_input=lambda batch, dev: (batch.image.to(dev), batch.label.to(dev)),
        )
    except TrainingDiverged as error:
        raise AnomalyError(f"pretraining stopped: {error}") from None
    state = {key: value.detach().cpu().clone() for key, value in backbone.net.state_dict().items()}
    atomic_torch_save(state, out)
    summary = {
        "enabled": True, "fingerprint": identity, "weights_sha256": file_sha256(out),
        "backbone": config.backbone, "image_size": size, "classes": list(labelled.classes),
        "num_train": len(train_set), "num_val": len(val_set),
        "train_accuracy": history[-1].get("train_accuracy"), "val_accuracy": history[-1].get("val_accuracy"),
        "seconds": time.perf_counter() - started, "settings": to_dict(config), "history": history,
    }
    atomic_write_text(sidecar, json.dumps(summary, indent=2) + "\n")
    progress.remove()
    return PretrainResult(out, sidecar, summary, skipped=False, network=classifier.cpu().eval())


@torch.no_grad()
def accuracy(classifier: Classifier, loader: DataLoader, device: torch.device) -> float:
    """Fraction of a loader's images classified as their label, in eval mode."""
    classifier.eval()
    correct = total = 0
    for batch in loader:
        correct += _correct(classifier(batch.image.to(device)), batch.label.to(device))
        total += len(batch.label)
    return correct / total if total else float("nan")


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(dim=1) == labels).sum().item())


def _optimizer(config: PretrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(module.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _augmentation(config: PretrainConfig, size: int) -> v2.Compose:
    """Per-image random crops (and flips), applied to normalised tensors: geometry only."""
    steps: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=tuple(config.crop_scale), antialias=True)]
    if config.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def _up_to_date(out: Path, sidecar: Path, identity: str) -> bool:
    if not (out.is_file() and sidecar.is_file()):
        return False
    try:
        summary = json.loads(sidecar.read_text())
    except ValueError:
        return False
    return summary.get("fingerprint") == identity and summary.get("weights_sha256") == file_sha256(out)
