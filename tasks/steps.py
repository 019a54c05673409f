"""Prefect tasks, one per pipeline step, each a thin call into `anomaly_models` plus MLflow tracking.

download -> prepare -> pretrain -> train -> evaluate -> register. Tasks take the typed `Params`
and an MLflow run id; they never contain model or metric code.
"""

from __future__ import annotations

import json
from contextlib import chdir
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient
from prefect import task

from anomaly_models import load_model
from anomaly_models.base import MODELS
from anomaly_models.config import Params
from anomaly_models.data.download import ensure_dataset
from anomaly_models.data.inbox import InboxReport, ingest_inbox
from anomaly_models.data.prepare import write_manifest
from anomaly_models.pretrain import pretrain_backbone
from anomaly_models.report import write_report
from anomaly_models.runs import evaluate_model, train_model
from tasks.registry import register_model_version
from tasks.tracking import log_evaluation, log_history


VISUAL_CHECK_IMAGES = 4


@task(name="download", retries=2, retry_delay_seconds=10)
def download(params: Params) -> str:
    """Make sure the dataset is on disk (fetching it from its official source if not)."""
    return str(ensure_dataset(params.data))


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
        print(f"{params.model.method} has no pretrain stage")
        return None
    return str(stage(params, out_dir))


@task(name="train")
def train(params: Params, out: Path, data_hash: str, run_id: str) -> str:
    """Train (resuming an interrupted run, skipping a finished identical one) and log the history."""
    result = train_model(params, out, resume=True, data_hash=data_hash)
    log_history(run_id, result.model.history, result.model.metadata.get("train_seconds"))
    client = MlflowClient()
    client.set_tag(run_id, "train_skipped", str(result.skipped).lower())
    for key, value in (result.model.threshold or {}).items():
        client.log_param(run_id, f"threshold.{key}", value)
    return str(result.path)


@task(name="evaluate")
def evaluate(params: Params, checkpoint: Path, metrics_path: Path, plots_dir: Path, run_id: str) -> dict:
    """Metrics on the fixed test split, written to JSON and logged with the curves and overlays."""
    model = load_model(checkpoint)
    result = evaluate_model(model, params, metrics_path, plots_dir)
    files = write_report(model, result, plots_dir)  # curves, histogram, worst mistakes, report.html
    if hasattr(model, "visual_check"):  # methods with a training picture worth looking at (ssae)
        anomalous = [i for i, label in enumerate(result.predictions.labels) if label == 1][:VISUAL_CHECK_IMAGES]
        samples = [result.test_set[i] for i in anomalous]
        if samples:
            files["visual_check"] = model.visual_check(
                torch.stack([s.image for s in samples]), Path(plots_dir) / "visual_check.png",
                torch.stack([s.mask for s in samples]))
    log_evaluation(run_id, result.metrics, [Path(metrics_path), *files.values()])
    return result.metrics


@task(name="register")
def register(params: Params, checkpoint: Path, metrics: dict, run_id: str) -> dict:
    """Log the model as pyfunc, register it as challenger, and promote it if it passes the gate."""
    decision = register_model_version(params, checkpoint, metrics, run_id)
    MlflowClient().log_text(run_id, json.dumps(decision, indent=2), "register_decision.json")
    return decision


@task(name="ingest")
def ingest(params: Params, inbox: Path, known_hashes: set[str]) -> InboxReport:
    """Validate new normal images and move them into the training folder (rejects kept aside)."""
    report = ingest_inbox(inbox, params.data, known_hashes)
    for name, reason in report.rejected.items():
        print(f"rejected {name}: {reason}")
    print(f"{len(report.accepted)} new normal image(s) added, {len(report.rejected)} rejected")
    return report


@task(name="version-data")
def version_data(workdir: Path, data_dir: Path) -> str | None:
    """Record the changed data folder as a new DVC version (and push it when a remote is set)."""
    from dvc.repo import Repo

    if not (workdir / ".dvc").is_dir():
        print(f"{workdir} is not a DVC project: the new data is not versioned")
        return None
    target = str(data_dir.relative_to(workdir))
    with chdir(workdir):  # DVC resolves stage paths against the working directory
        repo = Repo(".")
        stages = [s for s in repo.index.stages if any(str(o.def_path) == target for o in s.outs)]
        if stages:
            repo.commit(stages[0].addressing, force=True)
            address = stages[0].addressing
        else:
            address = repo.add(target)[0].addressing
        stage = next(s for s in Repo(".").index.stages if s.addressing == address)
        digest = next(o.hash_info.value for o in stage.outs if str(o.def_path) == target)
        if repo.config.get("core", {}).get("remote"):
            repo.push()
    print(f"data version {digest} recorded for {target}")
    return digest
