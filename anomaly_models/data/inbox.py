"""New normal images arriving in an inbox folder: validate them, then add them to the training data.

An image is accepted when it decodes, has the size and channels of the existing training images,
and is not already in the dataset (any split: a test image must never leak into training) or
twice in the inbox. Accepted files move into the normal training folder; rejected ones move to
`<inbox>/rejected/` beside a `reasons.json`, so nothing is lost.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from anomaly_models.config import DataConfig
from anomaly_models.data import data_root
from anomaly_models.data.common import list_images, load_image
from anomaly_models.files import file_sha256
from anomaly_models.errors import DataError

REJECTED = "rejected"


@dataclass
class InboxReport:
    accepted: list[Path] = field(default_factory=list)  # where the accepted images now are
    rejected: dict[str, str] = field(default_factory=dict)  # original name -> reason


def normal_train_folder(config: DataConfig) -> Path:
    """The folder holding the normal training images that `config` reads."""
    return config.kind.normal_train_folder(data_root(config), config)


def ingest_inbox(inbox: str | Path, config: DataConfig, known_hashes: set[str]) -> InboxReport:
    """Validate every image in `inbox` and move it into the training folder or to rejected/."""
    inbox = Path(inbox)
    report = InboxReport()
    if not inbox.is_dir():
        return report
    target = normal_train_folder(config)
    reference = load_image(list_images(target)[0])
    seen = set(known_hashes)
    for path in list_images(inbox):
        reason = _problem(path, reference, seen)
        if reason:
            report.rejected[path.name] = reason
            _move(path, inbox / REJECTED / path.name)
            continue
        digest = file_sha256(path)
        seen.add(digest)
        report.accepted.append(_move(path, target / f"inbox_{digest[:16]}{path.suffix.lower()}"))
    if report.rejected:
        reasons = inbox / REJECTED / "reasons.json"
        previous = json.loads(reasons.read_text()) if reasons.is_file() else {}
        reasons.write_text(json.dumps({**previous, **report.rejected}, indent=2) + "\n")
    return report


def _problem(path: Path, reference, seen: set[str]) -> str | None:
    try:
        image = load_image(path)
    except DataError as error:
        return f"not a readable image: {error}"
    if image.size != reference.size:
        return f"size {image.size[0]}x{image.size[1]}, training images are {reference.size[0]}x{reference.size[1]}"
    if image.mode != reference.mode:
        return f"mode {image.mode}, training images are {reference.mode}"
    if file_sha256(path) in seen:
        return "duplicate of an image already in the dataset or inbox"
    return None


def _move(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))
    return target
