"""Registry promotion with aliases: every new version is `challenger`; `champion` moves only after
an evaluation on the same test set shows the challenger strictly better on the gate metric.

The champion's number is its logged one only when its run was evaluated on the same test set
(equal content hash of images, masks and labels) with the same evaluation settings; otherwise the
champion is re-evaluated on the current test split, so a change of test data cannot promote a
model unfairly. The alias move is one registry call at the very end: a failure anywhere before it
leaves the champion where it was.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import anomaly_models
from anomaly_models import load_model
from anomaly_models.config import Params
from anomaly_models.errors import CheckpointError, ConfigError
from anomaly_models.runs import evaluate_model
from tasks import pyfunc
from tasks.dvc import data_version
from tasks.tracking import TEST_SET_TAG, record_run

CHECKPOINT_ARTIFACT = "checkpoint"
# The library travels inside the logged model, so it is served from any folder or machine.
LIBRARY = Path(anomaly_models.__file__).parent
FINGERPRINT_TAG = "fingerprint"  # model version tag: the settings and data it was trained from


def register_model_version(
    params: Params, checkpoint: Path, metrics: dict, run_id: str, fingerprint: str | None = None,
) -> dict:
    """Register the run's model as challenger and promote it if it passes the gate; a model with
    the fingerprint (settings and data) of an existing version is not registered again."""
    client = MlflowClient()
    name = params.registered_name()
    metric = params.register.gate_metric
    challenger_value = metrics.get(metric)
    if challenger_value is None:
        raise ConfigError(f"register.gate_metric {metric!r} is not available for this dataset")
    identical = _version_with_fingerprint(client, name, fingerprint)
    if identical is not None:
        client.set_tag(run_id, "registered_version", f"{identical.version} (identical, not registered again)")
        print(f"{name}: identical to v{identical.version} (same settings and data); not registered again")
        return {"model_name": name, "version": int(identical.version), "registered": False,
                "identical_to": int(identical.version), "gate_metric": metric,
                "challenger": challenger_value, "promoted": False}

    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # The signature is declared; an input example would make MLflow load and run the model here.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        mlflow.log_artifact(str(checkpoint), CHECKPOINT_ARTIFACT)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=pyfunc.__file__, signature=pyfunc.SIGNATURE,
            artifacts={"checkpoint": str(checkpoint)}, code_paths=[str(LIBRARY)],
            pip_requirements=pyfunc.requirements(),
        )
    version = mlflow.register_model(info.model_uri, name, tags={FINGERPRINT_TAG: fingerprint or ""})
    client.set_registered_model_alias(name, "challenger", version.version)
    client.set_tag(run_id, "registered_version", str(version.version))

    champion = _champion(client, name)
    decision = {
        "model_name": name, "version": int(version.version), "registered": True, "gate_metric": metric,
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


def _version_with_fingerprint(client: MlflowClient, name: str, fingerprint: str | None):
    if not fingerprint:
        return None
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get(FINGERPRINT_TAG) == fingerprint), None)


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


def register_trained(params: Params, checkpoint: Path, metrics_path: Path, files: list[Path],
                     data_dir: Path | None = None, details: Path | None = None) -> dict:
    """Track and register a model trained outside a flow (the DVC `register` stage): the same
    record as the flow's, with the data version DVC holds for `data_dir`; `details` is the
    evaluation's details file (default: the one `anomaly evaluate` writes beside the metrics)."""
    from anomaly_models.runs import read_metrics

    metrics = read_metrics(metrics_path, details)
    version = data_version(Path.cwd(), data_dir) if data_dir else None
    return record_run(params, checkpoint, metrics, [Path(metrics_path), *files], version)


def download_checkpoint(model_uri: str) -> Path:
    """The checkpoint file behind an MLflow model URI (models:/NAME@alias, models:/NAME/3, runs:/...)."""
    from tasks.tracking import configure_uri

    configure_uri()
    try:
        local = Path(mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/artifacts"))
    except MlflowException as error:  # unknown name, alias, version or run: one line, not a traceback
        raise ConfigError(f"cannot load {model_uri} from {mlflow.get_tracking_uri()}: "
                          f"{error.message.splitlines()[0]}{_registered(model_uri)}") from None
    found = sorted(local.rglob("*.pt"))
    if not found:
        raise CheckpointError(f"no checkpoint in {model_uri}")
    return found[0]


def _registered(model_uri: str) -> str:
    """What the registry holds under the URI's model name, so a mistyped name or alias is easy to fix."""
    if not model_uri.startswith("models:/"):
        return ""
    client, name = MlflowClient(), model_uri.removeprefix("models:/").split("/")[0].split("@")[0]
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=20)]
        return f" (registered models: {', '.join(names) or 'none'})"
    return f" (aliases of {name}: {', '.join(f'{a} -> v{v}' for a, v in aliases.items()) or 'none'})"
