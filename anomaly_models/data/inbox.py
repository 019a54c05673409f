"""New normal images arriving in an inbox folder: validate them, then add them to the training data,
all or nothing.

An image is accepted when it decodes, has the size and mode of the existing training images, and
is not already in the dataset (any split: a test image must never leak into training) or twice in
the inbox. One ingest is a transaction:

1. verify: every file is first decoded in a child process, so an image that crashes the decoder
   takes down only that child: a crash (SIGSEGV, SIGABRT, ...) is the evidence that quarantines it.
   A child stopped any other way (killed, interrupted with the whole ingest) proves nothing against
   the image: the ingest stops, nothing moved, and the next one reads the image again;
2. plan and move: a journal lists every move, then accepted files move into the normal training
   folder and rejected ones to `<inbox>/rejected/` under a name not used there before, beside a
   `reasons.json`;
3. version: the caller's `commit` (a DVC version of the data); only then is the journal removed.

A failure in 2 or 3 is rolled back at once, and a killed process is rolled back by the next ingest
(or `recover_inbox`) from the journal: every file is either where it was, or moved and versioned.

The inbox is where other people and machines drop files, so nothing in it is trusted: the journal
lives beside it (`.<inbox name>.ingest-journal.json` in its parent folder, a project folder such as
data/), a journal-named file dropped into the inbox is ignored like any file that is not an image,
and every path read back from the journal must lie directly in the inbox, in its rejected/ folder or
in the training folder (under a name an ingest gives) before anything is moved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from anomaly_models.config import DataConfig
from anomaly_models.data import data_root
from anomaly_models.data.common import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, list_images, load_image
from anomaly_models.errors import DataError
from anomaly_models.files import atomic_write_text, display_path, file_sha256

REJECTED = "rejected"
REASONS = "reasons.json"
JOURNAL_SUFFIX = ".ingest-journal.json"
CRASHED = "the image reader crashed on it (quarantined, not read again)"
LINKED = "a symbolic link, not a file (only files are taken from the inbox)"
ACCEPTED_NAME = re.compile(r"inbox_[0-9a-f]{16}\.[a-z]+")  # what an accepted image is renamed to
# Signals of a decoder that crashed on its input (not of a process stopped from outside).
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL}
# The child that decodes every inbox file first: PIL only (starts in a fraction of a second), one
# line per file it got through; images above the pixel limit are left to load_image to refuse.
DECODE_CHECK = """
import json, sys
from PIL import Image
limit = int(sys.argv[1])
for index, path in enumerate(json.load(sys.stdin)):
    try:
        with Image.open(path) as image:
            if image.width * image.height <= limit:
                image.load()
    except Exception:
        pass
    print(index, flush=True)
"""


@dataclass
class InboxReport:
    accepted: list[Path] = field(default_factory=list)  # where the accepted images now are
    rejected: dict[str, str] = field(default_factory=dict)  # original name -> reason
    version: Any = None  # what `commit` returned (the data version)


def normal_train_folder(config: DataConfig) -> Path:
    """The folder holding the normal training images that `config` reads."""
    return config.kind.normal_train_folder(data_root(config), config)


def journal_path(inbox: str | Path) -> Path:
    """Where an ingest of `inbox` keeps its journal: beside the inbox, never in it."""
    inbox = Path(inbox).absolute()
    return inbox.parent / f".{inbox.name}{JOURNAL_SUFFIX}"


def ingest_inbox(inbox: str | Path, config: DataConfig, known_hashes: set[str],
                 commit: Callable[[], Any] = lambda: None,
                 screen: Callable[[list[Path]], Mapping[Path, str | None]] | None = None) -> InboxReport:
    """Validate every image in `inbox`, move each into the training folder or to rejected/, and
    `commit` (version) the result; on any failure every file goes back where it was.

    `screen` (e.g. the champion's scores, anomaly_models/screening.py) sees only the images that
    passed every check, decoder-crash check included, and returns {path: reason to reject, or None}."""
    inbox = Path(inbox)
    target = normal_train_folder(config)
    recover_inbox(inbox, target)
    report = InboxReport()
    if not inbox.is_dir():
        return report
    _check_rejected_folder(inbox)
    training = list_images(target) if target.is_dir() else []
    if not training:
        raise DataError(f"no training images in {target} to compare the inbox images with")
    reference = load_image(training[0])
    paths = list_images(inbox)
    crashed = _decode_in_child(paths)
    seen, checked = set(known_hashes), []
    for path in paths:
        if path.is_symlink():
            reason, digest = LINKED, None
        elif path in crashed:
            reason, digest = CRASHED, None
        else:
            reason, digest = _verify(path, reference, seen)
        if reason is None and (target / f"inbox_{digest[:16]}{path.suffix.lower()}").exists():
            reason = "duplicate of an image already in the training folder"
        if reason is None:
            seen.add(digest)
        checked.append((path, reason, digest))
    if screen is not None:
        verdicts = screen([path for path, reason, _ in checked if reason is None])
        checked = [(path, reason or verdicts.get(path), digest) for path, reason, digest in checked]
    moves, reasons = [], {}
    for path, reason, digest in checked:
        if reason:
            destination = _unused(inbox / REJECTED, path.name, {d for _, d in moves})
            report.rejected[display_path(path.name)] = reason
            reasons[destination.name] = reason
        else:
            destination = target / f"inbox_{digest[:16]}{path.suffix.lower()}"
            report.accepted.append(destination)
        moves.append((path, destination))
    if not moves:
        return report
    journal = journal_path(inbox)
    atomic_write_text(journal, json.dumps({"target": str(target.absolute()),
                                           "moves": [[str(s), str(d)] for s, d in moves]}))
    try:
        for source, destination in moves:
            _move(source, destination)
        _write_reasons(inbox / REJECTED, reasons)
        if report.accepted:
            report.version = commit()
    except BaseException:
        recover_inbox(inbox, target)
        raise
    journal.unlink()
    return report


def recover_inbox(inbox: str | Path, target: Path | None = None) -> dict[str, str]:
    """Undo an ingest that did not finish (its journal is still there): move every file back to
    the inbox. The journal's paths are checked first (see the module's docstring; `target`, when
    known, is the training folder it must name); one outside those places stops with nothing moved.
    Returns {name: reason} of files quarantined while recovering: none (only a verified crash
    quarantines, and that is decided during the ingest, not from a journal)."""
    inbox = Path(inbox)
    journal = journal_path(inbox)
    if not journal.is_file():
        return {}
    for source, destination in reversed(_journal_moves(journal, inbox, target)):
        if source.exists():
            destination.unlink(missing_ok=True)  # an unfinished copy across file systems
        elif destination.exists():
            _move(destination, source)
    _write_reasons(inbox / REJECTED, {})  # drop the reasons of rejects that were moved back
    journal.unlink()
    return {}


def _journal_moves(journal: Path, inbox: Path, target: Path | None) -> list[tuple[Path, Path]]:
    """The journal's moves, each checked to stay within the inbox, its rejected/ folder and the
    training folder: anything else is refused with one line naming the journal, before any move."""
    try:
        state = json.loads(journal.read_text())
        recorded = Path(state["target"]).absolute()
        moves = [(Path(source), Path(destination)) for source, destination in state["moves"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"ingest journal {journal} is damaged ({type(error).__name__}: {error}); "
                        "nothing moved: check the inbox and the training folder, then remove it") from None
    if target is not None and _real(recorded) != _real(target):
        raise DataError(f"ingest journal {journal} names the training folder {recorded}, not {target}; "
                        "nothing moved")
    inbox_folder, rejected = _real(inbox), _real(inbox / REJECTED)
    for source, destination in moves:
        back_from = _real(destination.parent)
        source_ok = _real(source.parent) == inbox_folder and source.suffix.lower() in IMAGE_EXTENSIONS
        destination_ok = back_from == rejected or (back_from == _real(recorded)
                                                   and ACCEPTED_NAME.fullmatch(destination.name))
        if not (source_ok and destination_ok):
            outside = source if not source_ok else destination
            raise DataError(f"ingest journal {journal} names {display_path(outside)}, outside the inbox "
                            f"and the training folder: not trusted, nothing moved")
    return moves


def _real(path: Path) -> str:
    return os.path.realpath(path)


def check_inbox_state(inbox: str | Path) -> None:
    """What an ingest of `inbox` would refuse, checked before any work (a flow reports it as one
    line): a journal naming paths outside the inbox and training folder, a rejected/ that is not a
    real folder."""
    inbox = Path(inbox)
    if journal_path(inbox).is_file():
        _journal_moves(journal_path(inbox), inbox, None)
    _check_rejected_folder(inbox)


def _check_rejected_folder(inbox: Path) -> None:
    """rejected/ is written to: a link (or a file) in its place could send rejects anywhere."""
    rejected = inbox / REJECTED
    if rejected.is_symlink() or (rejected.exists() and not rejected.is_dir()):
        raise DataError(f"{rejected} is {'a link' if rejected.is_symlink() else 'a file'}, not a folder: "
                        "rejected images are only moved into a real folder in the inbox; nothing moved")


def _decode_in_child(paths: list[Path]) -> set[Path]:
    """The files whose decoding crashed a child process (DECODE_CHECK), each decoded once. A child
    ended any other way is no evidence against a file: DataError, nothing quarantined."""
    crashed: set[Path] = set()
    remaining = [p for p in paths if not p.is_symlink()]
    while remaining:
        done = subprocess.run([sys.executable, "-c", DECODE_CHECK, str(MAX_IMAGE_PIXELS)],
                              input=json.dumps([str(p) for p in remaining]), capture_output=True, text=True)
        checked = len(done.stdout.split())
        if done.returncode == 0 and checked == len(remaining):
            break
        culprit = remaining[checked] if checked < len(remaining) else remaining[-1]
        if done.returncode < 0 and signal.Signals(-done.returncode) in CRASH_SIGNALS:
            crashed.add(culprit)
            remaining = remaining[checked + 1:]
            continue
        how = (f"signal {signal.Signals(-done.returncode).name}" if done.returncode < 0
               else f"exit code {done.returncode}")
        raise DataError(f"the inbox image check stopped ({how}) while reading {display_path(culprit)}, "
                        "which is no evidence against it: nothing moved; run the ingest again")
    return crashed


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
