"""Errors the library raises for bad input: each message names the file, folder or key at fault.

The CLI turns these into a one-line message and exit code 2 instead of a traceback.
"""


class AnomalyError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class DataError(AnomalyError):
    """A dataset folder, image, mask or archive is missing, unreadable or inconsistent."""


class DownloadError(AnomalyError):
    """A download failed, or its checksum did not match, or an archive was unsafe."""


class ConfigError(AnomalyError):
    """A configuration key is unknown or its value is not allowed."""


class CheckpointError(AnomalyError):
    """A model checkpoint is missing, unreadable or was written by another method."""
