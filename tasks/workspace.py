"""The shared workspace of a project checkout and the runs that use it (DESIGN.md, "Runs and the
workspace"): run ids and folders, the one lock that publishing and data ingestion take, and
publishing a finished run's outputs to what DVC tracks.

Runs that overlap (a schedule tick, a retrain, a manual `anomaly run`, sweep cells) each work in
their own folder `runs/<run id>/`; only the steps that change what DVC tracks (`data/<dataset>`,
`models/`, `metrics/`, `plots/`, `settings.yaml`) or call DVC take `workspace_lock`, so they queue
instead of failing on DVC's own lock or mixing each other's files. Training never holds it; it
holds `training_lock`, one per registered model, so two doors never train the same model at once.

Publish rule: the workspace holds what `dvc repro` of params.yaml would produce, from the newest
data. A finished run publishes when its settings are params.yaml's own (no `--profile`/`--set`
that the file does not say) and no run that read newer data (or the same data later) has published
already; otherwise its outputs stay in `runs/<run id>/` and in MLflow, and it says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import time
from contextlib import chdir, contextmanager
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from anomaly_models.errors import AnomalyError
from anomaly_models.files import atomic_write_text

LOCK_FILE = ".anomaly-workspace.lock"  # in the project root, git-ignored
LOCK_TIMEOUT_SECONDS = 3600.0  # a publish or ingest takes seconds; an hour means a stuck holder
RUNS_FOLDER = "runs"  # git- and DVC-ignored: runs/<run id>/ per run
PUBLISHED_RECORD = "runs/published.json"  # which run the workspace holds, and from what
CODE_PACKAGES = ("anomaly_models", "tasks", "flows")  # what a run's code version covers

# A run folder's files -> where they go in the workspace (the outputs of dvc.yaml's stages).
RUN_FILES = {
    "model.pt": "models/model.pt",
    "metrics.json": "metrics/metrics.json",
    "evaluation.json": "metrics/evaluation.json",
    "register.json": "metrics/register.json",
    "plots": "plots",
    "settings.yaml": "settings.yaml",
}
IN_PROGRESS_LOCK = ".in-progress.lock"  # in a run folder, locked while its run works
PARTIAL_CHECKPOINT = "model.pt.partial"  # what training writes after each epoch (runs.train_model)
RUN_MANIFEST = "manifest.json"  # published as data/manifest.json with paths relative to the project
WORKSPACE_MANIFEST = "data/manifest.json"


def new_run_id(prefix: str) -> str:
    """`<prefix>-<UTC time>-<6 hex>`: readable, sortable by time, unique across processes."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def current_run_id(prefix: str) -> str:
    """The id a run's folder and MLflow run are named by: the Prefect flow-run name inside a flow
    (what the Prefect UI shows), else a new one."""
    try:
        from prefect.runtime import flow_run

        name = flow_run.name
    except ImportError:
        name = None
    return str(name) if name else new_run_id(prefix)


def run_folder(workdir: str | Path, run_id: str) -> Path:
    """runs/<run id>/ of the project, created; a run writes only there until it publishes."""
    folder = Path(workdir) / RUNS_FOLDER / run_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def run_in_progress(run_dir: Path) -> Iterator[None]:
    """Mark a run folder as in use while its run works (an OS file lock, freed when the run ends or
    is killed): `prune_run_folders` never deletes it, however many newer folders there are."""
    with FileLock(str(Path(run_dir) / IN_PROGRESS_LOCK)):
        yield


def prune_run_folders(workdir: str | Path, keep: int) -> list[Path]:
    """Delete the run folders beyond the `keep` newest (by modification time) whose run is not in
    progress, and return them. Unattended, every trained run leaves a checkpoint there (~17 MB for
    PatchCore) that MLflow holds too; without this, runs/ only grows."""
    runs = Path(workdir) / RUNS_FOLDER
    if not runs.is_dir():
        return []
    folders = sorted((path for path in runs.iterdir() if path.is_dir()), key=_modified, reverse=True)
    removed = []
    for folder in folders[keep:]:
        lock = FileLock(str(folder / IN_PROGRESS_LOCK))
        try:
            lock.acquire(timeout=0)
        except (Timeout, OSError):  # its run still works, another prune removed it, or unwritable
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            lock.release()
        removed.append(folder)
    return removed


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


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


@contextmanager
def training_lock(workdir: str | Path, model_name: str) -> Iterator[None]:
    """One run at a time reads the data, trains and publishes a given registered model, whichever
    door started it (a schedule tick, a retrain, `anomaly run`); the others wait their turn. The
    one that waited then reads the data as it is by then and finds the first run's result
    published (nothing changed: it stops) instead of training the same model side by side on the
    same 2 cores. No time limit: how long training takes is the method's business. An OS file
    lock, so a killed holder frees it."""
    path = Path(workdir).resolve() / RUNS_FOLDER / f".training-{model_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"another run is training {model_name}: waiting for it to finish ({path})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def adopt_unfinished_training(workdir: str | Path, run_dir: Path) -> Path | None:
    """Let a run resume what a killed run was training: the newest `runs/*/model.pt.partial` of
    another run (a finished training removes its own) is copied into `run_dir`; the library resumes
    from it only when its fingerprint (settings and data) is this model's, and ignores it otherwise.
    Copied, not moved: the run that writes it may still be training. Returns the source, or None."""
    mine = Path(run_dir) / PARTIAL_CHECKPOINT
    if mine.exists():
        return None
    found = []
    for path in (Path(workdir) / RUNS_FOLDER).glob(f"*/{PARTIAL_CHECKPOINT}"):
        try:
            found.append((path.stat().st_mtime, path))
        except FileNotFoundError:  # that run just finished
            continue
    if not found:
        return None
    newest = max(found)[1]
    try:
        shutil.copy2(newest, mine)
    except FileNotFoundError:  # that run just finished
        return None
    return newest


def code_version() -> str:
    """sha256 over the source of the code that runs (anomaly_models, tasks, flows): a changed
    line anywhere is another code version, committed or not."""
    import anomaly_models

    root = Path(anomaly_models.__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(f"{path.relative_to(root)}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def last_published(workdir: str | Path) -> dict[str, Any] | None:
    """The record of the run the workspace holds (None: nothing published yet, or unreadable)."""
    path = Path(workdir) / PUBLISHED_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def unchanged_since(workdir: str | Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The published run with the same data, settings and code as `record`, if there is one:
    running again would train, evaluate and log the same model."""
    last = last_published(workdir)
    keys = ("data_version", "data_hash", "settings_sha256", "code_version")
    if last and all(last.get(key) == record.get(key) for key in keys):
        return last
    return None


def publish(workdir: str | Path, run_dir: Path, record: dict[str, Any]) -> tuple[bool, str]:
    """Copy a finished run's outputs into the workspace and record them in dvc.lock, under the
    workspace lock; (published, why not). `record` holds the run id, data version and
    `data_read_at` (when it read the data version, under the same lock), settings and code digests."""
    workdir = Path(workdir)
    with workspace_lock(workdir):
        last = last_published(workdir)
        if last and last.get("data_read_at", 0) > record["data_read_at"]:
            return False, (f"the workspace already holds {last['run_id']}, which read the data after "
                           f"this run did")
        for name, target in RUN_FILES.items():
            if (run_dir / name).exists():
                _replace(run_dir / name, workdir / target)
        if (run_dir / RUN_MANIFEST).is_file():
            manifest = relative_manifest(json.loads((run_dir / RUN_MANIFEST).read_text()), workdir)
            atomic_write_text(workdir / WORKSPACE_MANIFEST, json.dumps(manifest, indent=1) + "\n")
        commit_stages(workdir)
        atomic_write_text(workdir / PUBLISHED_RECORD, json.dumps(record, indent=2) + "\n")
    return True, ""


def relative_manifest(manifest: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The manifest as `anomaly prepare --data-root data/<dataset>` (the DVC stage) writes it:
    paths relative to the project, not to where this process happened to run."""
    base = f"{Path(workdir).resolve()}/"

    def relative(path: Any) -> Any:
        return path.removeprefix(base) if isinstance(path, str) else path

    data = {**manifest["data"], "root": relative(manifest["data"].get("root"))}
    splits = {split: [{**entry, "path": relative(entry["path"])} for entry in entries]
              for split, entries in manifest["splits"].items()}
    skipped = {relative(path): reason for path, reason in manifest.get("skipped", {}).items()}
    return {**manifest, "data": data, "splits": splits, "skipped": skipped}


def commit_stages(workdir: Path) -> None:
    """Record every dvc.yaml stage's deps, params and outputs as they are now in dvc.lock (what
    `dvc commit -f` does), so `dvc status` is clean and `dvc repro` has nothing to redo. Call it
    under the workspace lock. Outside a DVC project (or without dvc.yaml) it does nothing."""
    workdir = Path(workdir).resolve()
    if not (workdir / ".dvc").is_dir() or not (workdir / "dvc.yaml").is_file():
        return
    from dvc.repo import Repo

    with quiet_dvc(), chdir(workdir):
        repo = Repo(".")
        missing = sorted({str(item) for stage in repo.index.stages for item in [*stage.deps, *stage.outs]
                          if not item.exists})
        if missing:
            print(f"not recorded in dvc.lock (missing: {', '.join(missing)}); `dvc repro` will make them")
            return
        repo.commit(None, force=True)


@contextmanager
def quiet_dvc() -> Iterator[None]:
    """DVC's own notes (lock files, 'to track the changes with git') go to Prefect's log twice;
    warnings still show."""
    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _replace(source: Path, target: Path) -> None:
    """Put `source` at `target`, replacing what is there in one rename (a folder: copied beside
    it first), so a reader never sees half of one run and half of another."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.publishing")
    if staged.exists():
        shutil.rmtree(staged) if staged.is_dir() else staged.unlink()
    if source.is_dir():
        shutil.copytree(source, staged)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staged.rename(target)
            shutil.rmtree(old)
        else:
            staged.rename(target)
    else:
        shutil.copy2(source, staged)
        staged.replace(target)
