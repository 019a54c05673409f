"""MLflow setup shared by the tasks: where runs are stored, and what every run is tagged with.

Default store: `mlruns/mlflow.db` (sqlite: runs and the model registry) with artifacts under
`mlruns/artifacts`, relative to the working directory. `MLFLOW_TRACKING_URI` points elsewhere
(a server, another database) and wins.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from anomaly_models.gate import TEST_SET_KEY
from tasks.dvc import NOT_VERSIONED

DEFAULT_STORE = Path("mlruns")
PARAMS_PER_BATCH = 100  # MLflow's limits for one log_batch call
METRICS_PER_BATCH = 1000
TEST_SET_TAG = TEST_SET_KEY  # the evaluation metrics' key (anomaly_models.gate), also a run tag
DATA_VERSION_TAG = "dvc_data_version"  # DVC's md5 of data/<dataset>, or "none (...)" outside DVC


def configure(experiment: str) -> str:
    """Point MLflow at the configured store and make sure `experiment` exists; return its id."""
    uri = configure_uri()
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return client.create_experiment(experiment, artifact_location=artifacts)


def configure_uri() -> str:
    """Set MLflow's tracking URI: $MLFLOW_TRACKING_URI, else the sqlite store under mlruns/."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri()
    if uri == default_uri():
        DEFAULT_STORE.mkdir(exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def default_uri() -> str:
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the sqlite store under mlruns/."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def check_store() -> None:
    """Fail with one line naming the file when the configured sqlite store (mlruns/mlflow.db by
    default) is not a readable database, before any work: MLflow's own error is hundreds of lines,
    and comes only after training. Other stores (a server, a folder) are left to MLflow."""
    import sqlite3

    from anomaly_models.errors import ConfigError

    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.exists():
        return  # a new store: MLflow creates it
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            state = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as error:
        state = str(error)
    if state != "ok":
        raise ConfigError(f"MLflow store {path} is damaged ({state}): restore it from a backup, or move it "
                          "aside to start a new one (MLFLOW_TRACKING_URI picks another)")


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 0.001}: MLflow params are flat strings."""
    if isinstance(value, dict):
        items: dict[str, Any] = {}
        for key, inner in value.items():
            items.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return items
    return {prefix: value}


def git_commit() -> str:
    """The code version a run used ('unknown' outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_params(params) -> dict[str, str]:
    """The settings that shaped this run, flat: its effective settings (anomaly_models.config.
    effective_settings: profile applied, the active method's section only, image_size resolved,
    no key the method ignores), the same that the DVC stages depend on."""
    from anomaly_models.config import effective_settings

    return {key: str("null" if value is None else value)
            for key, value in flatten("", effective_settings(params)).items()}


def unique_run_name(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def start_run(params, data_hash: str, run_name: str | None = None, tags: dict | None = None) -> str:
    """Open an MLflow run tagged with the code and data version, holding the run's params.
    Names are unique (the registered name and the time), so runs can be told apart in the UI."""
    experiment_id = configure(params.register.experiment)
    client = MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=run_name or unique_run_name(params.registered_name()),
        tags={"git_commit": git_commit(), "data_hash": data_hash, "method": params.model.method,
              **(tags or {})},
    )
    logged = [Param(key, value) for key, value in run_params(params).items()]
    for first in range(0, len(logged), PARAMS_PER_BATCH):  # one store call per batch, not per key
        client.log_batch(run.info.run_id, params=logged[first:first + PARAMS_PER_BATCH])
    return run.info.run_id


def record_run(
    params, checkpoint: Path, metrics: dict, files: list[Path], data_version: str | None,
    train_skipped: bool | None = None, run_name: str | None = None,
    metrics_source: str = "the evaluation metrics",
) -> dict:
    """The one MLflow record of a trained, evaluated model, for every door (the Prefect flow's
    track step and the DVC `register` stage): params, code and data versions, history, threshold,
    metrics, evaluation files and report, the datasets, the model and the registry gate's decision.

    `metrics` must be this checkpoint's on the current test split (their model_fingerprint and
    test_set_sha256 are checked before anything is logged; `metrics_source` names them in the
    refusal). `data_version` is DVC's md5 of the data folder; `train_skipped` None (DVC, which
    skips stages itself) means: this checkpoint file was already recorded by an earlier run.
    """
    from anomaly_models import load_model
    from anomaly_models.files import file_sha256
    from anomaly_models.gate import check_evidence
    from tasks.registry import register_model_version

    model = load_model(checkpoint)
    check_evidence(model, params.data, metrics, metrics_source)  # before any run or version exists
    checkpoint_sha = file_sha256(checkpoint)
    experiment_id = configure(params.register.experiment)
    if train_skipped is None:
        earlier = MlflowClient().search_runs(
            [experiment_id], f"tags.checkpoint_sha256 = '{checkpoint_sha}'", max_results=1)
        train_skipped = bool(earlier)
    run_name = run_name or unique_run_name(params.registered_name())  # a flow passes its run id
    run_id = start_run(params, model.metadata.get("data_hash") or "unknown", run_name, tags={
        DATA_VERSION_TAG: data_version or NOT_VERSIONED,
        "model_fingerprint": model.fingerprint(), "checkpoint_sha256": checkpoint_sha,
        "train_skipped": str(train_skipped).lower(),
    })
    client = MlflowClient()
    try:
        log_history(run_id, model.history, model.metadata.get("train_seconds"))
        threshold = [Param(f"threshold.{key}", str(value)) for key, value in (model.threshold or {}).items()]
        count = model.metadata.get("num_train_images")
        extra = [Metric("num_train_images", float(count), _milliseconds(), 0)] if count is not None else []
        client.log_batch(run_id, params=threshold, metrics=extra)
        log_evaluation(run_id, metrics, files)
        log_datasets(run_id, params, model.metadata.get("data_hash"), data_version, metrics.get(TEST_SET_TAG))
        decision = register_model_version(params, checkpoint, metrics, run_id, model.fingerprint())
        client.log_text(run_id, json.dumps(decision, indent=2), "register_decision.json")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, **decision}


def log_datasets(run_id: str, params, data_hash: str | None, data_version: str | None,
                 test_set: str | None) -> None:
    """The run's inputs as MLflow datasets (the run page's "Datasets used"): the training images and
    the test split, named by dataset and subject, sourced from the data folder, with the content
    hashes as digests (the manifest's data hash, the test split's hash) and the DVC data version."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    from anomaly_models.data import data_root

    source = LocalArtifactDatasetSource(str(Path(data_root(params.data)).resolve()))
    with mlflow.start_run(run_id=run_id):
        for split, context, digest in (("train", "training", data_hash), ("test", "testing", test_set)):
            if digest:  # MLflow keeps 36 characters of a digest; the tag holds all of it
                dataset = MetaDataset(source, f"{params.data.dataset}-{params.data.subject}-{split}", digest[:36])
                mlflow.log_input(dataset, context, tags={
                    DATA_VERSION_TAG: data_version or NOT_VERSIONED, "sha256": digest})


def log_history(run_id: str, history: list[dict], train_seconds: float | None) -> None:
    """Per-epoch losses and statistics as stepped metrics."""
    now = _milliseconds()
    metrics = [
        Metric(key, float(value), now, int(record["epoch"]))
        for record in history for key, value in record.items() if key != "epoch"
    ]
    if train_seconds is not None:
        metrics.append(Metric("train_seconds", float(train_seconds), now, 0))
    _log_metrics(run_id, metrics)


def log_evaluation(run_id: str, metrics: dict, files: list[Path]) -> None:
    """Final metrics plus the metrics JSON, curves and overlays as artifacts; the test set's
    content hash as a tag (the registry gate compares runs on equal test sets by it)."""
    client = MlflowClient()
    now = _milliseconds()
    _log_metrics(run_id, [Metric(k, v, now, 0) for k, v in metrics.items() if isinstance(v, float)])
    if metrics.get(TEST_SET_TAG):
        client.set_tag(run_id, TEST_SET_TAG, metrics[TEST_SET_TAG])
    for path in files:
        client.log_artifact(run_id, str(path), "evaluation")


def _log_metrics(run_id: str, metrics: list[Metric]) -> None:
    client = MlflowClient()
    for first in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[first:first + METRICS_PER_BATCH])


def _milliseconds() -> int:
    return int(time.time() * 1000)
