"""Prefect tasks, one per pipeline step, each a thin call into `anomaly_models` plus MLflow tracking.

download -> prepare -> pretrain -> train -> evaluate -> register. Tasks take the typed `Params`
and an MLflow run id; they never contain model or metric code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import task

from anomaly_models.base import MODELS
from anomaly_models.config import Params
from anomaly_models.data.download import ensure_dataset
from anomaly_models.data.prepare import write_manifest
from anomaly_models.runs import evaluate_model, train_model
from tasks.registry import register_model_version
from tasks.tracking import log_evaluation, log_history


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
    """Run the method's feature pretraining / fine-tuning stage, if it has one."""
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
    MlflowClient().set_tag(run_id, "train_skipped", str(result.skipped).lower())
    return str(result.path)


@task(name="evaluate")
def evaluate(params: Params, checkpoint: Path, metrics_path: Path, plots_dir: Path, run_id: str) -> dict:
    """Metrics on the fixed test split, written to JSON and logged with the curves and overlays."""
    from anomaly_models import load_model

    result = evaluate_model(load_model(checkpoint), params, metrics_path, plots_dir)
    log_evaluation(run_id, result.metrics, [Path(metrics_path), *result.plots.values()])
    return result.metrics


@task(name="register")
def register(params: Params, checkpoint: Path, metrics: dict, run_id: str) -> dict:
    """Log the model as pyfunc, register it as challenger, and promote it if it passes the gate."""
    decision = register_model_version(params, checkpoint, metrics, run_id)
    MlflowClient().log_text(run_id, json.dumps(decision, indent=2), "register_decision.json")
    return decision
