"""Registry promotion with aliases: every new version is `challenger`; `champion` moves only after
an evaluation on the same test set shows the challenger strictly better on the gate metric.

The champion's number is its logged one only when its run was evaluated on the same test set
(equal content hash of images, masks and labels) with the same evaluation settings; otherwise the
champion is re-evaluated on the current test split, so a change of test data cannot promote a
model unfairly. The alias move is one registry call at the very end: a failure anywhere before it
leaves the champion where it was.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from anomaly_models import load_model
from anomaly_models.config import Params
from anomaly_models.errors import ConfigError
from anomaly_models.runs import evaluate_model
from tasks import pyfunc
from tasks.tracking import TEST_SET_TAG, log_evaluation, log_history, start_run

CHECKPOINT_ARTIFACT = "checkpoint"


def register_model_version(params: Params, checkpoint: Path, metrics: dict, run_id: str) -> dict:
    client = MlflowClient()
    name = params.registered_name()
    metric = params.register.gate_metric
    challenger_value = metrics.get(metric)
    if challenger_value is None:
        raise ConfigError(f"register.gate_metric {metric!r} is not available for this dataset")

    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(checkpoint), CHECKPOINT_ARTIFACT)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=pyfunc.__file__, signature=pyfunc.SIGNATURE,
            artifacts={"checkpoint": str(checkpoint)}, pip_requirements=pyfunc.PIP_REQUIREMENTS,
        )
    version = mlflow.register_model(info.model_uri, name)
    client.set_registered_model_alias(name, "challenger", version.version)

    champion = _champion(client, name)
    decision = {
        "model_name": name, "version": int(version.version), "gate_metric": metric,
        "challenger": challenger_value, "champion_version": None, "champion": None, "champion_source": None,
    }
    if champion is not None:
        decision["champion_version"] = int(champion.version)
        decision["champion"], decision["champion_source"] = _champion_value(
            client, champion.run_id, params, metrics)
    decision["promoted"] = champion is None or challenger_value > decision["champion"]
    if decision["promoted"]:
        client.set_registered_model_alias(name, "champion", version.version)
    client.set_model_version_tag(name, version.version, "gate", "promoted" if decision["promoted"] else "kept")
    against = "none" if champion is None else (
        f"v{champion.version} {decision['champion']:.4f}, {decision['champion_source']}")
    outcome = "promoted to champion" if decision["promoted"] else "champion kept"
    print(f"{name} v{version.version}: {metric} {challenger_value:.4f} vs champion {against} -> {outcome}")
    return decision


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def _champion_value(client: MlflowClient, run_id: str, params: Params, metrics: dict) -> tuple[float, str]:
    """The champion's gate metric on the challenger's test set, and where the number came from."""
    metric = params.register.gate_metric
    run = client.get_run(run_id).data
    test_set = metrics.get(TEST_SET_TAG)
    same_test_set = test_set is not None and run.tags.get(TEST_SET_TAG) == test_set
    same_settings = run.params.get("evaluate.fpr_limit") == str(params.evaluate.fpr_limit)
    if same_test_set and same_settings and metric in run.metrics:
        return run.metrics[metric], "logged (same test set)"
    return _evaluate_version(client, run_id, params)[metric], "re-evaluated"


def _evaluate_version(client: MlflowClient, run_id: str, params: Params) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        local = client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, folder)
        checkpoint = next(Path(local).glob("*.pt"))
        return evaluate_model(load_model(checkpoint), params).metrics


def register_trained(params: Params, checkpoint: Path, metrics_path: Path, files: list[Path]) -> dict:
    """Track and register a model trained outside a flow (the DVC `register` stage)."""
    import json

    model = load_model(checkpoint)
    metrics = json.loads(Path(metrics_path).read_text())
    run_id = start_run(params, model.metadata.get("data_hash", "unknown"))
    try:
        log_history(run_id, model.history, model.metadata.get("train_seconds"))
        log_evaluation(run_id, metrics, [Path(metrics_path), *files])
        decision = register_model_version(params, checkpoint, metrics, run_id)
    except BaseException:
        MlflowClient().set_terminated(run_id, "FAILED")
        raise
    MlflowClient().set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, **decision}


def download_checkpoint(model_uri: str) -> Path:
    """The checkpoint file behind an MLflow model URI (models:/NAME@alias, models:/NAME/3, runs:/...)."""
    from tasks.tracking import configure_uri

    configure_uri()
    local = Path(mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/artifacts"))
    found = sorted(local.rglob("*.pt"))
    if not found:
        raise FileNotFoundError(f"no checkpoint in {model_uri}")
    return found[0]
