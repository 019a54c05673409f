"""Prefect tasks, one per pipeline step, each a thin call into `anomaly_models` (plus MLflow and DVC
in `track` and `version_data`).

download -> version-data -> prepare -> pretrain -> train -> evaluate -> track. Tasks take the typed
`Params`; they never contain model or metric code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from anomaly_models import load_model
from anomaly_models.base import MODELS
from anomaly_models.config import Params
from anomaly_models.data.inbox import InboxReport, ingest_inbox
from anomaly_models.data.prepare import write_manifest
from anomaly_models.pretrain import pretrain_backbone
from anomaly_models.runs import train_model, write_evaluation
from tasks.dvc import commit_data_version, data_folder, materialise_data
from tasks.tracking import record_run


@task(name="download", retries=2, retry_delay_seconds=10)
def download(params: Params, workdir: Path) -> Params:
    """Fill data/<dataset> from the configured source or the official download (kept when there:
    retraining adds to it); returns the params that read it."""
    return materialise_data(params, workdir)


@task(name="version-data")
def version_data(params: Params, workdir: Path) -> str | None:
    """Record data/<dataset> as a DVC version (a no-op when unchanged); DVC's md5 of it."""
    version = commit_data_version(workdir, data_folder(params, workdir))
    if version:
        print(f"data version {version} ({data_folder(params, workdir)})")
    return version


@task(name="prepare")
def prepare(params: Params, manifest_path: Path) -> dict[str, Any]:
    """Check every image, fix the splits and record per-file hashes; returns the manifest."""
    return write_manifest(params.data, manifest_path)


@task(name="pretrain")
def pretrain(params: Params, out_dir: Path) -> str | None:
    """With `pretrain.enabled`, supervised backbone pretraining to `pretrain.out` (skipped when that
    file is up to date); otherwise the method's own pretraining stage, if it has one."""
    if params.pretrain.enabled:
        result = pretrain_backbone(params.pretrain, params.data)
        state = "up to date" if result.skipped else f"val accuracy {result.summary['val_accuracy']}"
        print(f"pretrained backbone {result.path} ({state})")
        return str(result.path)
    stage = getattr(MODELS[params.model.method], "pretrain", None)
    if stage is None:
        return None
    return str(stage(params, out_dir))


@task(name="train")
def train(params: Params, out: Path, data_hash: str) -> tuple[str, bool]:
    """Train (resuming an interrupted run, skipping a finished identical one); (path, skipped)."""
    result = train_model(params, out, resume=True, data_hash=data_hash)
    return str(result.path), result.skipped


@task(name="evaluate")
def evaluate(params: Params, checkpoint: Path, metrics_path: Path, plots_dir: Path) -> tuple[dict, list[str]]:
    """Metrics on the fixed test split, the curves, overlays and report; (metrics, files written)."""
    result, files = write_evaluation(load_model(checkpoint), params, metrics_path, plots_dir)
    return result.metrics, [str(path) for path in files.values()]


@task(name="track")
def track(params: Params, checkpoint: Path, metrics: dict, files: list[str], data_version: str | None,
          train_skipped: bool, run_name: str | None = None) -> dict:
    """The run's MLflow record and the registry gate (the same function as the DVC register stage)."""
    return record_run(params, Path(checkpoint), metrics, [Path(f) for f in files], data_version,
                      train_skipped, run_name)


@task(name="ingest")
def ingest(params: Params, inbox: Path, known_hashes: set[str], workdir: Path) -> InboxReport:
    """Validate new normal images, move them into the training folder (rejects kept aside) and
    record that as a DVC version, all or nothing: a failure anywhere puts every file back."""
    report = ingest_inbox(inbox, params.data, known_hashes,
                          commit=lambda: commit_data_version(workdir, data_folder(params, workdir)))
    for name, reason in report.rejected.items():
        print(f"rejected {name}: {reason}")
    print(f"{len(report.accepted)} new normal image(s) added, {len(report.rejected)} rejected")
    return report
