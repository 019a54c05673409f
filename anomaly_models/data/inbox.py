"""New normal images arriving in an inbox folder: validate them, then add them to the training data,
all or nothing.

An image is accepted when it decodes, has the size and mode of the existing training images, and
is not already in the dataset (any split: a test image must never leak into training) or twice in
the inbox. One ingest is a transaction, recorded in a journal file in the inbox:

1. verify: every file is read; the journal names the file being read, so when the reader takes the
   whole process down, the next ingest knows which file did it and quarantines it;
2. plan and move: the journal lists every move, then accepted files move into the normal training
   folder and rejected ones to `<inbox>/rejected/` under a name not used there before, beside a
   `reasons.json`;
3. version: the caller's `commit` (a DVC version of the data); only then is the journal removed.

A failure in 2 or 3 is rolled back at once, and a killed process is rolled back by the next ingest
(or `recover_inbox`) from the journal: every file is either where it was, or moved and versioned.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from anomaly_models.config import DataConfig
from anomaly_models.data import data_root
from anomaly_models.data.common import list_images, load_image
from anomaly_models.errors import DataError
from anomaly_models.files import atomic_write_text, display_path, file_sha256

REJECTED = "rejected"
REASONS = "reasons.json"
JOURNAL = ".ingest-journal.json"  # not an image extension: never taken for an inbox image
CRASHED = "the image reader crashed on it during an earlier ingest (quarantined, not read again)"


@dataclass
class InboxReport:
    accepted: list[Path] = field(default_factory=list)  # where the accepted images now are
    rejected: dict[str, str] = field(default_factory=dict)  # original name -> reason
    version: Any = None  # what `commit` returned (the data version)


def normal_train_folder(config: DataConfig) -> Path:
    """The folder holding the normal training images that `config` reads."""
    return config.kind.normal_train_folder(data_root(config), config)


def ingest_inbox(inbox: str | Path, config: DataConfig, known_hashes: set[str],
                 commit: Callable[[], Any] = lambda: None,
                 screened: Mapping[str, str | None] | None = None) -> InboxReport:
    """Validate every image in `inbox`, move each into the training folder or to rejected/, and
    `commit` (version) the result; on any failure every file goes back where it was.

    `screened` ({sha256: reason to reject, or None}, anomaly_models/screening.py): a valid image
    it gives a reason for is rejected with it, and one it does not know (arrived after the
    screening) stays in the inbox for the next ingest."""
    inbox = Path(inbox)
    report = InboxReport(rejected=recover_inbox(inbox))
    if not inbox.is_dir():
        return report
    target = normal_train_folder(config)
    training = list_images(target) if target.is_dir() else []
    if not training:
        raise DataError(f"no training images in {target} to compare the inbox images with")
    reference = load_image(training[0])
    journal = inbox / JOURNAL
    seen, moves, reasons = set(known_hashes), [], {}
    for path in list_images(inbox):
        atomic_write_text(journal, json.dumps({"reading": str(path)}))
        reason, digest = _verify(path, reference, seen)
        if reason is None and (target / f"inbox_{digest[:16]}{path.suffix.lower()}").exists():
            reason = "duplicate of an image already in the training folder"
        if reason is None and screened is not None:
            if digest not in screened:
                continue
            reason = screened[digest]
        if reason:
            destination = _unused(inbox / REJECTED, path.name, {d for _, d in moves})
            report.rejected[display_path(path.name)] = reason
            reasons[destination.name] = reason
        else:
            seen.add(digest)
            destination = target / f"inbox_{digest[:16]}{path.suffix.lower()}"
            report.accepted.append(destination)
        moves.append((path, destination))
    if not moves:
        journal.unlink(missing_ok=True)
        return report
    atomic_write_text(journal, json.dumps({"moves": [[str(s), str(d)] for s, d in moves]}))
    try:
        for source, destination in moves:
            _move(source, destination)
        _write_reasons(inbox / REJECTED, reasons)
        if report.accepted:
            report.version = commit()
    except BaseException:
        recover_inbox(inbox)
        raise
    journal.unlink()
    return report


def recover_inbox(inbox: str | Path) -> dict[str, str]:
    """Undo an ingest that did not finish (its journal is still there): move every file back to
    the inbox, and quarantine the file it was reading when it died, if any; {name: reason} of that."""
    inbox = Path(inbox)
    journal = inbox / JOURNAL
    if not journal.is_file():
        return {}
    state = json.loads(journal.read_text())
    for source, destination in reversed(state.get("moves", [])):
        source, destination = Path(source), Path(destination)
        if source.exists():
            destination.unlink(missing_ok=True)  # an unfinished copy across file systems
        elif destination.exists():
            _move(destination, source)
    quarantined = {}
    reading = state.get("reading")
    if reading and Path(reading).exists():
        destination = _move(Path(reading), _unused(inbox / REJECTED, Path(reading).name, set()))
        quarantined[display_path(Path(reading).name)] = CRASHED
        _write_reasons(inbox / REJECTED, {destination.name: CRASHED})
    else:
        _write_reasons(inbox / REJECTED, {})  # drop the reasons of rejects that were moved back
    journal.unlink()
    return quarantined


def _verify(path: Path, reference, seen: set[str]) -> tuple[str | None, str | None]:
    """(why `path` is rejected or None, its sha256)."""
    try:
        image = load_image(path)
    except DataError as error:
        return f"not a readable image: {error}", None
    if image.size != reference.size:
        return f"size {image.size[0]}x{image.size[1]}, training images are {reference.size[0]}x{reference.size[1]}", None
    if image.mode != reference.mode:
        return f"mode {image.mode}, training images are {reference.mode}", None
    digest = file_sha256(path)
    if digest in seen:
        return "duplicate of an image already in the dataset or inbox", None
    return None, digest


def _unused(folder: Path, name: str, planned: set[Path]) -> Path:
    """`folder/name`, or `folder/<stem>.<n><suffix>` with the first n not taken: a reject never
    replaces an earlier one."""
    candidate, stem, suffix, n = folder / name, Path(name).stem, Path(name).suffix, 1
    while candidate.exists() or candidate in planned:
        candidate, n = folder / f"{stem}.{n}{suffix}", n + 1
    return candidate


def _write_reasons(folder: Path, new: dict[str, str]) -> None:
    """reasons.json: why each file in rejected/ is there, for the files that are there."""
    path = folder / REASONS
    previous = json.loads(path.read_text()) if path.is_file() else {}
    reasons = {name: why for name, why in {**previous, **new}.items() if (folder / name).exists()}
    if reasons or path.is_file():
        atomic_write_text(path, json.dumps(reasons, indent=2) + "\n")


def _move(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))
    return target
