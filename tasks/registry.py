"""Registry promotion with aliases: every new version is `challenger`; `champion` moves only when
the gate (anomaly_models/gate.py: the gate metric, then the tie-break metrics, each by a margin)
says the challenger is better than the champion.

Both sides are compared on the same test split (equal content hash of images, masks and labels),
the same DVC data version and the same evaluation settings: the champion's logged numbers are used
only then; otherwise the champion is re-evaluated on the current test split, so a change of data
cannot promote a model unfairly. The rule and both sides' values for every metric compared are in
the decision (the run's `register_decision.json`). The alias move is one registry call at the very
end: a failure anywhere before it leaves the champion where it was.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import anomaly_models
from anomaly_models import load_model
from anomaly_models.config import Params
from anomaly_models.errors import CheckpointError, ConfigError
from anomaly_models.files import file_sha256
from anomaly_models.gate import comparisons_as_dicts, decide, rule_text
from anomaly_models.runs import evaluate_model
from tasks import pyfunc
from tasks.dvc import data_version
from tasks.tracking import DATA_VERSION_TAG, TEST_SET_TAG, record_run

# The library travels inside the logged model, so it is served from any folder or machine.
LIBRARY = Path(anomaly_models.__file__).parent
FINGERPRINT_TAG = "fingerprint"  # model version tag: the settings and data it was trained from
# Run tags copied onto each model version, so the registry alone says what a version is.
VERSION_TAGS_FROM_RUN = (DATA_VERSION_TAG, "git_commit", TEST_SET_TAG)


def register_model_version(
    params: Params, checkpoint: Path, metrics: dict, run_id: str, fingerprint: str | None = None,
) -> dict:
    """Register the run's model as challenger and promote it if it passes the gate; a model with
    the fingerprint (settings and data) of an existing version is not registered again. `metrics`
    are the checkpoint's own on the current test split (record_run checks that first)."""
    client = MlflowClient()
    name = params.registered_name()
    gate = params.register
    challenger_value = metrics.get(gate.gate_metric)
    if challenger_value is None:
        raise ConfigError(f"register.gate_metric {gate.gate_metric!r} is not available for this dataset")
    identical = _version_with_fingerprint(client, name, fingerprint)
    if identical is not None:
        client.set_tag(run_id, "registered_version", f"{identical.version} (identical, not registered again)")
        print(f"{name}: identical to v{identical.version} (same settings and data); not registered again")
        return {"model_name": name, "version": int(identical.version), "registered": False,
                "identical_to": int(identical.version), "gate_metric": gate.gate_metric,
                "challenger": challenger_value, "promoted": False}

    run_tags = client.get_run(run_id).data.tags
    info = _log_model(run_id, checkpoint)
    version = mlflow.register_model(info.model_uri, name, tags={
        FINGERPRINT_TAG: fingerprint or "", "checkpoint_sha256": file_sha256(checkpoint),
        "gate_metric": gate.gate_metric, gate.gate_metric: str(challenger_value),
        **{key: run_tags[key] for key in VERSION_TAGS_FROM_RUN if run_tags.get(key)},
    })
    _describe(client, name, params)
    client.set_registered_model_alias(name, "challenger", version.version)
    client.set_tag(run_id, "registered_version", str(version.version))

    champion = _champion(client, name)
    challenger_evidence = {"run_id": run_id, TEST_SET_TAG: metrics.get(TEST_SET_TAG),
                           DATA_VERSION_TAG: _data_version(run_tags)}
    decision = {
        "model_name": name, "version": int(version.version), "registered": True,
        "rule": rule_text(gate), "gate_metric": gate.gate_metric, "tie_break": list(gate.tie_break),
        "min_improvement": gate.min_improvement, "challenger": challenger_value, "champion_version": None,
        "champion": None, "champion_source": None, "challenger_evidence": challenger_evidence,
    }
    champion_metrics = None
    if champion is not None:
        champion_metrics, evidence = _champion_metrics(client, champion, params, challenger_evidence)
        decision.update(champion_version=int(champion.version), champion=champion_metrics.get(gate.gate_metric),
                        champion_source=evidence["source"], champion_evidence=evidence)
    promoted, comparisons, decided_by = decide(metrics, champion_metrics, gate)
    decision.update(comparisons=comparisons_as_dicts(comparisons), decided_by=decided_by, promoted=promoted)
    if promoted:
        client.set_registered_model_alias(name, "champion", version.version)
    client.set_model_version_tag(name, version.version, "gate", "promoted" if promoted else "kept")
    print(f"{name} v{version.version}: {_summary(decision, comparisons)}")
    return decision


def _log_model(run_id: str, checkpoint: Path):
    """The checkpoint inside the pyfunc model (signature and input example): logged once, since
    every version adds its size to the store (download_checkpoint reads it back)."""
    started = time.perf_counter()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=pyfunc.__file__, signature=pyfunc.SIGNATURE,
            input_example=pyfunc.input_example(), artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(LIBRARY)], pip_requirements=pyfunc.requirements(),
        )
        mlflow.log_metric("model_log_seconds", time.perf_counter() - started)
    return info


def _describe(client: MlflowClient, name: str, params: Params) -> None:
    """The registered model's description: what it is, how to call it, how the gate moves it."""
    description = (
        f"{params.model.method} anomaly detector for {params.data.dataset} {params.data.subject}. "
        "Input: a DataFrame with an `image` column of base64 PNG/JPEG images; output per image: score, "
        "and label (1 = anomalous) and normalized_score when the model has a threshold. Aliases: "
        "`challenger` is the latest version registered, `champion` the one to serve "
        f"(models:/{name}@champion). Gate: {rule_text(params.register)}; on the same test split and "
        "data version (the champion is re-evaluated otherwise)."
    )
    if client.get_registered_model(name).description != description:
        client.update_registered_model(name, description=description)


def _summary(decision: dict, comparisons) -> str:
    """One line: each metric compared and the outcome."""
    if decision["champion_version"] is None:
        return f"{decision['gate_metric']} {decision['challenger']:.4f}, no champion yet -> promoted to champion"
    compared = "; ".join(f"{c.metric} {_number(c.challenger)} vs {_number(c.champion)} ({c.outcome})"
                         for c in comparisons)
    outcome = "promoted to champion" if decision["promoted"] else "champion kept"
    why = decision["champion_evidence"].get("why")
    source = f"{decision['champion_source']}{f' ({why})' if why else ''}"
    return f"{compared} against champion v{decision['champion_version']}, {source} -> {outcome}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


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


def _data_version(tags: dict) -> str | None:
    """A run's DVC data version; None outside a DVC project (record_run tags that as 'none (...)')."""
    value = tags.get(DATA_VERSION_TAG)
    return None if not value or value.startswith("none") else value


def _champion_metrics(client: MlflowClient, champion, params: Params, challenger: dict) -> tuple[dict, dict]:
    """The champion's metrics on the challenger's test split and data version, and their evidence:
    its logged numbers when its run was evaluated on the same test split, data version and
    settings, else a re-evaluation of its checkpoint on the current test split."""
    run_id = champion.run_id
    run = client.get_run(run_id).data
    evidence = {"run_id": run_id, TEST_SET_TAG: run.tags.get(TEST_SET_TAG),
                DATA_VERSION_TAG: _data_version(run.tags)}
    differs = [what for what, same in (
        ("test split", challenger[TEST_SET_TAG] is not None and run.tags.get(TEST_SET_TAG) == challenger[TEST_SET_TAG]),
        ("data version", evidence[DATA_VERSION_TAG] == challenger[DATA_VERSION_TAG]),
        ("evaluation settings", run.params.get("evaluate.fpr_limit") == str(params.evaluate.fpr_limit)),
    ) if not same]
    if not differs:
        return dict(run.metrics), {**evidence, "source": "logged (same test set)"}
    metrics = _evaluate_version(f"models:/{champion.name}/{champion.version}", params)
    evidence.update({TEST_SET_TAG: metrics.get(TEST_SET_TAG), DATA_VERSION_TAG: challenger[DATA_VERSION_TAG],
                     "source": "re-evaluated", "why": f"{' and '.join(differs)} differ{'s' if len(differs) == 1 else ''}"})
    return metrics, evidence


def _evaluate_version(model_uri: str, params: Params) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        return evaluate_model(load_model(download_checkpoint(model_uri, folder)), params).metrics


def register_trained(params: Params, checkpoint: Path, metrics_path: Path, files: list[Path],
                     data_dir: Path | None = None, details: Path | None = None) -> dict:
    """Track and register a model trained outside a flow (the DVC `register` stage): the same
    record as the flow's, with the data version DVC holds for `data_dir`; `details` is the
    evaluation's details file (default: the one `anomaly evaluate` writes beside the metrics). The
    metrics must be this checkpoint's evaluation on the current test split (refused naming the file
    otherwise)."""
    from anomaly_models.runs import read_metrics

    metrics = read_metrics(metrics_path, details)
    version = data_version(Path.cwd(), data_dir) if data_dir else None
    return record_run(params, checkpoint, metrics, [Path(metrics_path), *files], version,
                      metrics_source=str(metrics_path))


def champion_checkpoint(params: Params) -> tuple[Path, int] | None:
    """The checkpoint of the registered model's current champion and its version; None when the
    model has no champion yet (nothing registered, or no version promoted)."""
    from tasks.tracking import configure_uri

    configure_uri()
    name = params.registered_name()
    champion = _champion(MlflowClient(), name)
    if champion is None:
        return None
    return download_checkpoint(f"models:/{name}/{champion.version}"), int(champion.version)


def download_checkpoint(model_uri: str, folder: str | None = None) -> Path:
    """The checkpoint file behind an MLflow model URI (models:/NAME@alias, models:/NAME/3,
    runs:/RUN/model), downloaded into `folder` (default: a new temporary folder)."""
    from tasks.tracking import configure_uri

    configure_uri()
    try:
        local = Path(mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/artifacts", dst_path=folder))
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
