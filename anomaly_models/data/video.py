"""Frame-folder video datasets (UCSD Ped1/Ped2, CUHK Avenue, ShanghaiTech layout) as clips.

    <root>/train/<video>/<frame>.{tif,jpg,png}    normal training videos
    <root>/test/<video>/<frame>.{tif,jpg,png}     test videos
    <root>/test_frame_labels.csv                  columns video,frame,label (frame = file stem, 1 = anomalous)
    <root>/test_gt/<video>/<frame>.png            optional pixel masks, same stems as the frames

A sample is a clip of `clip_length` consecutive frames (C, T, H, W), starting every `stride` frames
(official MemAE: 16 frames, stride 1 for training and testing); its label, mask and path are those
of the clip's centre frame (index clip_length // 2, the frame the official evaluation scores), so
the first clip_length // 2 and last clip_length // 2 - 1 frames of a video are not scored.
Frames are read through a RecordDataset, so each is decoded and preprocessed once and shared by
every clip that contains it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from anomaly_models.data.common import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    RecordDataset,
    Sample,
    check_folder,
    list_images,
    split_normal,
)
from anomaly_models.data.kinds import DatasetKind, register_dataset
from anomaly_models.errors import ConfigError, DataError
from anomaly_models.metrics import image_auroc
from anomaly_models.transforms import Preprocessing

FRAME_LABELS_FILE = "test_frame_labels.csv"
MASKS_FOLDER = "test_gt"
NORMAL, ANOMALOUS = "good", "anomalous"


def video_preprocessing(image_size: int = 256) -> Preprocessing:
    """Official MemAE video input: grayscale frames resized to a square, scaled to [-1, 1]."""
    return Preprocessing(image_size=image_size, color_mode="L", mean=(0.5,), std=(0.5,))


class VideoFrameDataset(Dataset):
    """Clips of consecutive frames from a frame-folder video dataset."""

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "val", "test"],
        preprocessing: Preprocessing | None = None,
        clip_length: int = 16,
        stride: int = 1,
        val_fraction: float = 0.1,
        seed: int = 0,
        videos: tuple[str, ...] | None = None,
        labels_file: str = FRAME_LABELS_FILE,
        cache: bool = True,
    ):
        root = Path(root)
        if clip_length < 1 or stride < 1:
            raise DataError(f"clip_length and stride must be >= 1, got {clip_length} and {stride}")
        if split not in ("train", "val", "test"):
            raise DataError(f"unknown split {split!r} (allowed: train, val, test)")
        folder = check_folder(root / ("test" if split == "test" else "train"), f"{split} video folder")
        video_dirs = sorted(d for d in folder.iterdir() if d.is_dir())
        if videos is not None:
            missing = sorted(set(videos) - {d.name for d in video_dirs})
            if missing:
                raise DataError(f"video {missing[0]!r} not found in {folder}")
            video_dirs = [d for d in video_dirs if d.name in videos]
        if not video_dirs:
            raise DataError(f"no video folders in {folder}")
        if split != "test":
            train, val = split_normal(video_dirs, val_fraction, seed)
            video_dirs = train if split == "train" else val
        frames = {d.name: _frames(d, clip_length) for d in video_dirs}
        if split == "test":
            labels = _read_labels(root / labels_file, frames, videos is not None)
            masks = root / MASKS_FOLDER
        else:
            labels = {name: [0] * len(paths) for name, paths in frames.items()}
            masks = None
        has_masks = masks is not None and masks.is_dir()

        records: list[ImageRecord] = []
        self.clips: list[int] = []  # index in `records` of each clip's first frame
        self.clip_videos: list[str] = []  # video name of each clip
        for name, paths in frames.items():
            first = len(records)
            for path, label in zip(paths, labels[name]):
                mask = _mask_path(masks / name, path.stem) if has_masks else None
                records.append(ImageRecord(str(path), label, ANOMALOUS if label else NORMAL, mask))
            starts = range(first, first + len(paths) - clip_length + 1, stride)
            self.clips += starts
            self.clip_videos += [name] * len(starts)
        self.clip_length = clip_length
        self.preprocessing = preprocessing or video_preprocessing()
        self.has_masks = has_masks
        self.frames = RecordDataset(records, self.preprocessing, "error", has_masks, cache)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> Sample:
        first = self.clips[index]
        frames = [self.frames[i].image for i in range(first, first + self.clip_length)]
        centre = self.frames[first + self.clip_length // 2]
        return Sample(torch.stack(frames, dim=1), centre.label, centre.mask, centre.path, centre.defect_type)

    @property
    def records(self) -> list[ImageRecord]:
        """Every frame of the split (scored or not), for data manifests and test-set hashes."""
        return self.frames.records

    def unreadable(self) -> dict[str, str]:
        """{path: reason} for each frame or mask that cannot be decoded (the `prepare` check)."""
        return self.frames.unreadable()

    @property
    def scored_records(self) -> list[ImageRecord]:
        """The centre frame of each clip: the frames the metrics are over (test-set hashes)."""
        offset = self.clip_length // 2
        return [self.frames.records[i + offset] for i in self.clips]

    @property
    def labels(self) -> np.ndarray:
        """Label of each clip (of its centre frame)."""
        return np.array([r.label for r in self.scored_records], dtype=np.int64)


def _frame_key(stem: str) -> int | str:
    return int(stem) if stem.isdigit() else stem


def _frames(video_dir: Path, clip_length: int) -> list[Path]:
    """The video's frames in temporal order (numeric stems sort as numbers: 2 before 10)."""
    paths = sorted(list_images(video_dir), key=lambda p: (not p.stem.isdigit(), _frame_key(p.stem)))
    if len(paths) < clip_length:
        raise DataError(
            f"video {video_dir.name} ({video_dir}) has {len(paths)} frames, fewer than the "
            f"clip length {clip_length}"
        )
    return paths


def _read_labels(path: Path, frames: dict[str, list[Path]], subset: bool) -> dict[str, list[int]]:
    """Per-frame labels of every video, checked against its frame files."""
    if not path.is_file():
        raise DataError(f"frame label file not found: {path} (columns video,frame,label)")
    table: dict[str, dict[int | str, int]] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"video", "frame", "label"} <= set(reader.fieldnames or []):
            raise DataError(f"{path}: expected columns video,frame,label, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if row["label"] not in ("0", "1"):
                raise DataError(f"{path}, line {line}: label must be 0 or 1, got {row['label']!r}")
            table.setdefault(row["video"], {})[_frame_key(row["frame"])] = int(row["label"])
    unknown = sorted(set(table) - set(frames))
    if unknown and not subset:
        raise DataError(f"{path} has labels for video {unknown[0]} but there is no such frame folder")
    labels = {}
    for name, paths in frames.items():
        if name not in table:
            raise DataError(f"{path} has no labels for video {name}")
        on_disk = [_frame_key(p.stem) for p in paths]
        unlabelled = [k for k in on_disk if k not in table[name]]
        frameless = sorted(set(table[name]) - set(on_disk), key=str)
        if unlabelled or frameless:
            raise DataError(
                f"{path} does not match the frames of video {name}: {len(unlabelled)} frame(s) "
                f"without a label{f' (first: {unlabelled[0]})' if unlabelled else ''}, "
                f"{len(frameless)} label(s) without a frame{f' (first: {frameless[0]})' if frameless else ''}"
            )
        labels[name] = [table[name][k] for k in on_disk]
    return labels


def _mask_path(folder: Path, stem: str) -> str:
    for ext in IMAGE_EXTENSIONS:
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return str(candidate)
    raise DataError(f"mask not found: {folder / (stem + '.png')}")


def regularity(errors: np.ndarray, videos: list[str]) -> np.ndarray:
    """Official per-video regularity s = 1 - (e - min e) / (max e - min e), in dataset order."""
    errors = np.asarray(errors, dtype=np.float64)
    names = np.asarray(videos)
    result = np.ones_like(errors)
    for name in np.unique(names):
        chosen = names == name
        shifted = errors[chosen] - errors[chosen].min()
        peak = shifted.max()
        result[chosen] = 1.0 - (shifted / peak if peak > 0 else shifted)
    return result


def frame_level_auc(errors: np.ndarray, labels: np.ndarray, videos: list[str]) -> float:
    """Official frame-level AUC: 1 - regularity of every scored frame, pooled over the videos."""
    return image_auroc(labels, 1.0 - regularity(errors, videos))


@register_dataset
class VideoKind(DatasetKind):
    """Frame folders (UCSD Ped2 layout) as clips, for the clip methods (memae_video)."""

    name = "video"
    folder = "ucsd_ped2"
    subject_key = "video_set"
    gives = "clips"
    refuses_new_images = ("the retrain inbox takes single images, but a video model learns from clips of "
                          "consecutive frames: put a new normal video's frames in data/video/train/<video>/ "
                          "and run `anomaly run --profile video`, which records them as a new data version")

    def default_folder(self, config=None) -> str:
        return config.video_set if config is not None else self.folder

    def build(self, root, config, split, preprocessing, clip_length=None) -> VideoFrameDataset:
        stride = config.clip_stride_test if split == "test" else config.clip_stride_train
        length = {} if clip_length is None else {"clip_length": clip_length}
        return VideoFrameDataset(root, split, preprocessing, stride=stride, val_fraction=config.val_fraction,
                                 seed=config.split_seed, cache=config.cache_images, **length)

    def is_present(self, root, config) -> bool:
        return (Path(root) / "train").is_dir()

    def check(self, config) -> None:
        if config.on_bad_image == "skip":
            raise ConfigError("data.on_bad_image: skip is not possible for video (a left-out frame "
                              "would join frames that are not consecutive into a clip); use error")

    def protocol_metrics(self, predictions, test_set) -> dict[str, float]:
        """The official per-video normalised frame-level AUC (image_auroc stays the pooled raw one)."""
        return {"frame_auc": frame_level_auc(predictions.scores, predictions.labels, test_set.clip_videos)}
