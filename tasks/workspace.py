"""The shared workspace of a project checkout and the runs that use it (DESIGN.md, "Runs and the
workspace"): run ids, and the one lock that publishing and data ingestion take.

Runs that overlap (a schedule tick, a retrain, a manual `anomaly run`, sweep cells) each work in
their own folder `runs/<run id>/`; only the steps that change what DVC tracks (`data/<dataset>`,
`models/`, `metrics/`, `plots/`) or call DVC take `workspace_lock`, so they queue instead of
failing on DVC's own lock or mixing each other's files. Training never holds it.
"""

from __future__ import annotations

import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from anomaly_models.errors import AnomalyError

LOCK_FILE = ".anomaly-workspace.lock"  # in the project root, git-ignored
LOCK_TIMEOUT_SECONDS = 3600.0  # a publish or ingest takes seconds; an hour means a stuck holder


def new_run_id(prefix: str) -> str:
    """`<prefix>-<UTC time>-<6 hex>`: readable, sortable by time, unique across processes."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


@contextmanager
def workspace_lock(workdir: str | Path, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
    """Hold the project's workspace lock (waiting for another run that holds it). The lock is an
    OS file lock, released when the holder exits or is killed, so a crash never leaves it held."""
    path = Path(workdir).resolve() / LOCK_FILE
    lock = FileLock(str(path), is_singleton=True)  # one per path: reentrant, so a holder may nest
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise AnomalyError(f"{path}: another run held the workspace lock for over {timeout:.0f} s; "
                           f"check for a stuck `anomaly run` or retrain") from None
    try:
        yield
    finally:
        lock.release()
