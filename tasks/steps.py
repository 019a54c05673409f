"""Prefect tasks, one per pipeline step, each a thin call into `anomaly_models` (plus MLflow and DVC
in `track`, `version_data` and `publish`).

download -> version-data -> prepare -> settings -> pretrain -> train -> evaluate -> track -> publish.
Tasks take the typed `Params`; they never contain model or metric code. A run writes into its own
folder (runs/<run id>/); the steps that write what DVC tracks (download, version-data, ingest,
publish) hold the workspace lock, so overlapping runs queue there instead of failing on DVC's lock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from anomaly_models import load_model
from anomaly_models.base import MODELS
from anomaly_models.config import Params, effective_settings, settings_text
from anomaly_models.data.inbox import InboxReport, ingest_inbox
from anomaly_models.data.prepare import write_manifest
from anomaly_models.files import atomic_write_text
from anomaly_models.pretrain import mark_disabled, pretrain_backbone
from anomaly_models.runs import train_model, write_evaluation
from tasks import workspace
from tasks.dvc import commit_data_version, data_folder, materialise_data
from tasks.prefect_runs import TRANSIENT_RETRIES, TRANSIENT_RETRY_DELAY_SECONDS
from tasks.screening import Screen
from tasks.tracking import configure, record_run


@task(name="download", retries=TRANSIENT_RETRIES, retry_delay_seconds=TRANSIENT_RETRY_DELAY_SECONDS)
def download(params: Params, workdir: Path) -> Params:
    """Fill data/<dataset> from the configured source or the official download (kept when there:
    retraining adds to it), under the workspace lock; returns the params that read it."""
    return materialise_data(params, workdir)


@task(name="version-data", retries=TRANSIENT_RETRIES, retry_delay_seconds=TRANSIENT_RETRY_DELAY_SECONDS)
def version_data(params: Params, workdir: Path) -> tuple[str | None, float]:
    """Record data/<dataset> as a DVC version (a no-op when unchanged), under the workspace lock so
    overlapping runs wait instead of failing on DVC's lock; (DVC's md5 of it, when it was read:
    the order in which runs saw the data, which decides who publishes)."""
    with workspace.workspace_lock(workdir):
        version = commit_data_version(workdir, data_folder(params, workdir))
        read_at = time.time()
    if version:
        print(f"data version {version} ({data_folder(params, workdir)})")
    return version, read_at


@task(name="tracking-store")
def tracking_store(params: Params, workdir: Path) -> None:
    """Create the MLflow store and experiment if missing, under the workspace lock: runs starting
    together on a fresh store would otherwise race to create its tables."""
    with workspace.workspace_lock(workdir):
        configure(params.register.experiment)


@task(name="prepare")
def prepare(params: Params, manifest_path: Path) -> dict[str, Any]:
    """Check every image, fix the splits and record per-file hashes; returns the manifest."""
    return write_manifest(params.data, manifest_path)


@task(name="settings")
def settings(params: Params, out: Path, profile: str | None = None) -> dict[str, Any]:
    """The run's effective settings (what ran, only the active method's section) as YAML: the file
    the DVC stages depend on once published, and the MLflow params."""
    atomic_write_text(out, settings_text(params, profile))
    return effective_settings(params)


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
def evaluate(params: Params, checkpoint: Path, run_dir: Path) -> tuple[dict, list[str]]:
    """Metrics on the fixed test split (metrics.json: numbers; evaluation.json: what was measured),
    the curves, overlays and report in plots/; (metrics, files written)."""
    result, files = write_evaluation(load_model(checkpoint), params, run_dir / "metrics.json", run_dir / "plots",
                                     details=run_dir / "evaluation.json")
    return result.metrics, [str(path) for path in files.values()]


@task(name="track", retries=TRANSIENT_RETRIES, retry_delay_seconds=TRANSIENT_RETRY_DELAY_SECONDS)
def track(params: Params, checkpoint: Path, metrics: dict, files: list[str], data_version: str | None,
          train_skipped: bool, run_name: str | None = None) -> dict:
    """The run's MLflow record and the registry gate (the same function as the DVC register stage);
    the decision also goes to register.json beside the checkpoint."""
    decision = record_run(params, Path(checkpoint), metrics, [Path(f) for f in files], data_version,
                          train_skipped, run_name)
    atomic_write_text(Path(checkpoint).parent / "register.json", json.dumps(decision, indent=2) + "\n")
    return decision


@task(name="publish")
def publish(params: Params, workdir: Path, run_dir: Path, record: dict[str, Any]) -> bool:
    """Put the run's outputs where the DVC stages write theirs and record them in dvc.lock, under
    the workspace lock (tasks/workspace.py says when a run publishes); whether it did."""
    if not params.pretrain.enabled:  # the pretrain stage's output, as `anomaly pretrain` writes it
        mark_disabled(Path(workdir) / params.pretrain.out)
    done, why_not = workspace.publish(workdir, run_dir, record)
    where = f"runs/{record['run_id']}"
    print(f"published {where} to the workspace (models/, metrics/, plots/, settings.yaml; dvc.lock)" if done
          else f"not published ({why_not}); its outputs stay in {where}")
    return done


@task(name="ingest", cache_policy=NO_CACHE)  # moves files: never a cached result; its screen holds a model
def ingest(params: Params, inbox: Path, known_hashes: set[str], workdir: Path,
           screen: Screen | None = None) -> InboxReport:
    """Validate new normal images, move them into the training folder (rejects kept aside) and
    record that as a DVC version, all or nothing: a failure anywhere puts every file back.
    `screen`: the champion's verdicts on the images that passed the checks (tasks/screening.py)."""
    with workspace.workspace_lock(workdir):  # data ingestion: no run reads a half-added folder's version
        report = ingest_inbox(inbox, params.data, known_hashes,
                              commit=lambda: commit_data_version(workdir, data_folder(params, workdir)),
                              screen=screen)
    for name, reason in report.rejected.items():
        print(f"rejected {name}: {reason}")
    print(f"{len(report.accepted)} new normal image(s) added, {len(report.rejected)} rejected")
    return report
