"""Atomic writes (a temp file in the target's folder, then a rename, so a crash never leaves half a
file), file digests, and the checks and names that let an error line name a file."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch

from anomaly_models.errors import CheckpointError, ConfigError


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Write to a binary handle; the file appears at `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
        os.chmod(temp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    with atomic_open(path) as file:
        torch.save(obj, file)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as file:
        file.write(text.encode())
    return Path(path)


def read_torch_file(path: str | Path, what: str, missing_hint: str = "", damaged_hint: str = "") -> Any:
    """torch.load of tensors only (no code runs); a missing, damaged or foreign file is one error
    line naming it (torch's own message is many lines, and suggests the unsafe weights_only=False)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}{missing_hint}")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol note: a second line before ours
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(f"cannot read {what} {path}: damaged, or not written by torch.save "
                              f"with tensors only{damaged_hint}") from None


def display_path(path: str | os.PathLike) -> str:
    """A path as it can be printed and written to JSON or CSV: bytes of a name that are not UTF-8
    (Python keeps them as lone surrogates, which crash any UTF-8 encoder) shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_writable(path: str | Path, key: str, folder: bool = False) -> Path:
    """Fail before any work, naming `key`, when `path` (a file, or with `folder` a directory) could
    not be written: a file where a folder is needed or the other way round, or no write access."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{key}: {path} is {'a file' if folder else 'a folder'}; expected "
                          f"{'a folder' if folder else 'a file'} path")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise ConfigError(f"{key}: cannot create {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"{key}: cannot write to {existing} (permission denied)")
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file_sha256(weights: str | None) -> str | None:
    """sha256 of a weights file named by a method's `weights` setting; None for the named weights
    (imagenet, none) or a file not there (yet). Part of a model's fingerprint, so a file rewritten
    at the same path (e.g. by a re-run pretrain stage) never passes for the same training run."""
    if weights in (None, "imagenet", "none") or not Path(weights).is_file():
        return None
    return file_sha256(weights)
