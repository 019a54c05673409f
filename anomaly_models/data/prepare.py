"""The `prepare` step: check every image of a dataset once and write a manifest with per-file hashes.

The manifest pins exactly which files each split holds (train/val carved from normal images, test
fixed) and their SHA-256, so a run can say which data it saw (`data_hash`) and DVC / Prefect can
tell when the data changed. Unreadable files are listed (or stop the step, per `on_bad_image`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from anomaly_models.config import DataConfig, to_dict
from anomaly_models.data import build_dataset
from anomaly_models.errors import DataError
from anomaly_models.files import atomic_write_text, display_path, file_sha256
from anomaly_models.transforms import Preprocessing

SPLITS = ("train", "val", "test")


def build_manifest(config: DataConfig) -> dict[str, Any]:
    """Decode every image (and mask) of every split; return the manifest as a dict."""
    manifest: dict[str, Any] = {"data": to_dict(config), "splits": {}, "skipped": {}}
    strict = dataclasses.replace(config, on_bad_image="error", cache_images=False)  # list every file
    for split in SPLITS:
        dataset = build_dataset(strict, split, Preprocessing(image_size=8))
        failures = check_images(dataset, split, config.on_bad_image)
        manifest["skipped"].update({display_path(path): reason for path, reason in failures.items()})
        kept = [r for r in dataset.records if r.path not in failures]
        manifest["splits"][split] = _entries(tqdm(kept, desc=f"hash {split}", leave=False, disable=None))
    manifest["data_hash"] = manifest_hash(manifest)
    return manifest


def check_images(dataset, split: str, on_bad_image: str = "error") -> dict[str, str]:
    """Decode every image (and mask) of a split once: {path: reason} of the unreadable ones, or with
    `on_bad_image` "error" a DataError counting them and naming the first. Training checks its
    splits this way too, before the first epoch: a batch dropped at the end of an epoch is never
    read, so a damaged image there would otherwise go unnoticed."""
    failures = dataset.unreadable()
    if failures and on_bad_image == "error":
        first = next(iter(failures.values()))
        raise DataError(f"{len(failures)} unreadable file(s) in the {split} split, e.g. {first}")
    return failures


def data_hash(config: DataConfig) -> str:
    """The manifest's data_hash of `config`'s data, from the files' contents without decoding them
    (equal to `anomaly prepare`'s when it skipped no image): what a model was trained on, for the
    "up to date" check of a training run given no manifest."""
    strict = dataclasses.replace(config, on_bad_image="error", cache_images=False)
    splits = {}
    for split in SPLITS:
        try:
            splits[split] = _entries(build_dataset(strict, split, Preprocessing(image_size=8)).records)
        except DataError:
            if split != "test":  # training never needs the test split; without it, it hashes as empty
                raise
            splits[split] = []
    return manifest_hash({"splits": splits})


def manifest_hash(manifest: dict[str, Any]) -> str:
    """One hash over every split's contents: the data a model was trained on, wherever it lies
    (the same images in ../shared/data and in the DVC-tracked data/ folder hash the same)."""
    lines = [f"{split}\t{line}" for split in SPLITS for line in _content_lines(manifest["splits"][split])]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def content_hash(records) -> str:
    """What a set of images is, wherever it lies (a DVC copy or the original folder): their
    contents, masks and labels. Two evaluations with equal hashes scored the same test set."""
    return hashlib.sha256("\n".join(_content_lines(_entries(records))).encode()).hexdigest()


def _content_lines(entries) -> list[str]:
    """One sorted line per image: its bytes, archive member, mask and label, not its path."""
    return sorted(
        f"{entry['sha256']}\t{_member(entry['path'])}\t{entry.get('mask_sha256') or ''}\t{entry['label']}"
        for entry in entries
    )


def write_manifest(config: DataConfig, path: str | Path) -> dict[str, Any]:
    manifest = build_manifest(config)
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _member(path: str) -> str:
    """The member name of an archive-backed image ('<archive>#<member>'), else ''."""
    return path.split("#", 1)[1] if "#" in path else ""


def _entries(records) -> list[dict[str, Any]]:
    """One manifest entry per record; each file hashed once (archive-backed images share theirs)."""
    digests: dict[str, str] = {}

    def digest(path: str) -> str:
        if path not in digests:
            digests[path] = file_sha256(path)
        return digests[path]

    entries = []
    for record in records:
        entry = {"path": record.path, "sha256": digest(record.path.split("#")[0]), "label": record.label,
                 "defect_type": record.defect_type}
        if record.mask_path:
            entry["mask_sha256"] = digest(record.mask_path)
        entries.append(entry)
    return entries

